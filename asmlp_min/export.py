"""ONNX export of a classifier or a ``features_only`` backbone: ``torch.onnx.export(..., dynamo=True)``, one file per
input size, any batch size, written atomically. Needs ``onnx`` and ``onnxscript`` (``pip install -e ".[dev]"``).

Height and width are fixed in each file: torch.export specialises the traced graph on them (it guards on size
expressions such as ``w // 32``), and a file exported with free height/width (``Dim.AUTO``) gave wrong
outputs at sizes outside the traced range instead of an error. With fixed sizes onnxruntime refuses any other size.
TorchScript (``torch.jit``) is deprecated in PyTorch, so it is not offered.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .backbone import ASMLP
from .files import atomic_write


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int]) -> Path:
    """Write ``model`` (an :class:`~asmlp_min.ASMLP`) to ``path`` as ONNX taking ``images`` (batch, in_chans, h, w)
    for any batch and the given (h, w); outputs ``logits``, or ``stage{i}`` for each of a backbone's ``out_indices``."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript "
                         "(or pip install -e \".[dev]\")")
    if not isinstance(model, ASMLP):  # a detector or segmenter: its post-processing is not exported
        inner = " (export its .backbone)" if isinstance(getattr(model, "backbone", None), ASMLP) else ""
        raise TypeError(f"export_onnx writes an AS-MLP classifier or backbone (asmlp_min.ASMLP), not a "
                        f"{type(model).__name__}{inner}")
    if torch.__version__ < "2.5":  # TorchVersion compares as a version
        raise ValueError(f"ONNX export needs torch >= 2.5, whose torch.onnx.export(dynamo=True) it uses; this is "
                         f"torch {torch.__version__}: pip install -U torch torchvision")
    height, width = image_size  # sizes >= 1: checked by the CLI
    was_training = model.training
    example = torch.randn(2, model.in_chans, height, width)  # 2, not 1: a size-1 batch would be traced as fixed
    outputs = [f"stage{i}" for i in model.out_indices] if model.features_only else ["logits"]
    try:  # exported in eval mode (no drop path); the caller's model is handed back in its own mode
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["images"],
                                    output_names=outputs, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    finally:
        model.train(was_training)
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())
    return Path(path)


# ---------------------------------------------------------------- asmlp-min export

def add_export_parser(sub) -> None:
    """The ``export`` subcommand of ``asmlp-min`` (cli.py), beside the function it runs."""
    from .backbone import list_models
    from .train_flags import depths_type
    ex = sub.add_parser("export", help="write a classifier or backbone as ONNX (any batch, one image size)",
                        description="torch.onnx.export(dynamo=True) of a variant with its weights, written "
                                    "atomically; the batch size is free, height and width are fixed (export one "
                                    "file per size). Needs onnx and onnxscript.")
    ex.add_argument("--model", choices=list_models(), help="variant (default: asmlp_tiny)")
    ex.add_argument("--weights", help="official .pth, mmdet/mmseg, or a training run's checkpoint.pt, which "
                                      "brings its own architecture (default: random weights)")
    ex.add_argument("--features-only", action="store_true", help="the backbone's stage maps, not logits (from a "
                                                                  "det/seg run: its trained backbone)")
    ex.add_argument("--num-classes", type=int, help="classifier outputs (default: 1000)")
    ex.add_argument("--image-size", type=int, nargs="+", default=[224], metavar="SIZE",
                    help="height [width] of the input (default: 224)")
    ex.add_argument("--embed-dim", type=int, help="override the variant's channel width C")
    ex.add_argument("--depths", type=depths_type, help="override blocks per stage, e.g. 1,1,2,1")
    ex.add_argument("--shift-size", type=int, help="override the axial shift size")
    ex.add_argument("--output", help="the .onnx file to write (default: MODEL.onnx)")
    ex.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .cli import writable_file
    from .engine.runs import is_run_checkpoint
    if len(args.image_size) > 2 or min(args.image_size) < 1:
        raise ValueError(f"--image-size takes one size or two (height width), each >= 1, got {args.image_size}")
    checkpoint = load_checkpoint(args.weights) if args.weights else None
    build = _model_of_a_run if is_run_checkpoint(checkpoint) else _variant_with_weights
    model, name = build(args, checkpoint)
    output = writable_file(args.output or f"{name}.onnx", "output", f"{name}.onnx",
                            reads=[args.weights] if args.weights else [])
    height, width = (args.image_size * 2)[:2]  # one size: a square
    replaced = " (replaced an older file)" if output.exists() else ""
    print(f"tracing {name} at {height}x{width} for ONNX (torch.export: a minute or two on a CPU) ...",
          file=sys.stderr, flush=True)
    export_onnx(model, output, (height, width))
    if args.features_only:
        outputs = "stage maps " + ", ".join(f"stage{i}" for i in model.out_indices)
    elif model.num_classes:
        outputs = f"logits (batch, {model.num_classes})"
    else:  # no head (num_classes 0): the pooled features
        outputs = f"pooled features (batch, {model.head_hidden_size})"
    print(f"{output}: images (batch, {model.in_chans}, {height}, {width}) -> {outputs}{replaced}")
    return 0


def _variant_with_weights(args: argparse.Namespace, checkpoint: dict | None) -> tuple[nn.Module, str]:
    """The variant the flags describe, with the official, mmdet/mmseg or backbone ``checkpoint`` loaded (a backbone
    takes the backbone's keys of any checkpoint; a classifier all of them), or random weights without one."""
    from .backbone import create_model
    from .checkpoint import CheckpointError, load_backbone_checkpoint, load_official_checkpoint, shown_keys
    name = args.model or "asmlp_tiny"
    overrides = dict(embed_dim=args.embed_dim, depths=args.depths, shift_size=args.shift_size)
    model = create_model(name, num_classes=1000 if args.num_classes is None else args.num_classes,
                         features_only=args.features_only, **{k: v for k, v in overrides.items() if v is not None})
    if checkpoint is None:
        print("no --weights: exporting randomly initialised weights", file=sys.stderr)
        return model, name
    try:
        report = (load_backbone_checkpoint if args.features_only else load_official_checkpoint)(model, checkpoint)
    except CheckpointError as err:  # its advice names Python arguments; say which flags of export set them
        raise CheckpointError(f"{err}\nHere: --model, --embed-dim, --depths and --shift-size give the variant, "
                              "--features-only takes the backbone of a detection or segmentation checkpoint, "
                              "--num-classes the classifier's size") from None
    kept = (f"; not in it, so left at their initial values: {shown_keys(report.missing, 4)} (a classifier "
            "checkpoint has no per-stage norms: export a detection or segmentation backbone for trained ones)"
            if report.missing else "")
    print(f"--weights {args.weights}: loaded {len(report.loaded)} tensors{kept}", file=sys.stderr)
    return model, name


def _model_of_a_run(args: argparse.Namespace, checkpoint: dict) -> tuple[nn.Module, str]:
    """The network of an ``asmlp-min train`` checkpoint, built from its own config: the classifier, or with
    ``--features-only`` the backbone (with its trained per-stage norms, for a det/seg run)."""
    from .backbone import create_model
    from .checkpoint import load_backbone_checkpoint
    from .engine import load_trained
    given = [flag for flag, value in (("--model", args.model), ("--num-classes", args.num_classes),
                                      ("--embed-dim", args.embed_dim), ("--depths", args.depths),
                                      ("--shift-size", args.shift_size)) if value is not None]
    if given:
        raise ValueError(f"{args.weights} is a training run's checkpoint, which sets the architecture itself: "
                         f"leave out {', '.join(given)}")
    net, cfg, _ = load_trained(args.weights, loaded=checkpoint)   # the checks evaluate and predict make
    if cfg.task != "cls" and not args.features_only:
        raise ValueError(f"{args.weights} holds a {cfg.task} model; the ONNX export covers classifiers and "
                         f"backbones: add --features-only to export its trained backbone")
    if cfg.task != "cls":
        model = net.backbone
    elif args.features_only:
        model = create_model(cfg.model, features_only=True, **cfg.backbone_kwargs())
        load_backbone_checkpoint(model, checkpoint, name=cfg.model)
    else:
        model = net
    print(f"--weights {args.weights}: the {cfg.task} run's {cfg.model}"
          + (" backbone" if args.features_only else "") + " with its trained weights", file=sys.stderr)
    return model, cfg.model
