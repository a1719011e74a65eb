"""ONNX export of a classifier or a ``features_only`` backbone: ``torch.onnx.export(..., dynamo=True)``, one file per
input size, any batch size, written atomically. Needs ``onnx`` and ``onnxscript`` (``pip install -e .[dev]``).

Height and width are fixed in each file: torch.export specialises the traced graph on them (it guards on size
expressions such as ``w // 32``), and a file exported with free height/width (``Dim.AUTO``) gave wrong
outputs at sizes outside the traced range instead of an error. With fixed sizes onnxruntime refuses any other size.
TorchScript (``torch.jit``) is deprecated in PyTorch, so it is not offered.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int]) -> Path:
    """Write ``model`` (an :class:`~asmlp_min.ASMLP`) to ``path`` as ONNX taking ``images`` (batch, in_chans, h, w)
    for any batch and the given (h, w); outputs ``logits``, or ``stage{i}`` for each of a backbone's ``out_indices``."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript (or pip install -e .[dev])")
    height, width = image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be two sizes >= 1 (height, width), got {tuple(image_size)}")
    model = model.eval()
    example = torch.randn(2, model.in_chans, height, width)  # 2, not 1: a size-1 batch would be traced as fixed
    outputs = [f"stage{i}" for i in model.out_indices] if model.features_only else ["logits"]
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=outputs,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())
    return Path(path)
