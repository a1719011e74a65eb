"""The official configuration: the speed and memory baseline of ``asmlp-min bench``.

A copy of a model with the same parameters that runs as the official code: the plain reference modules
(``fast.enable(model, False)``: NCHW tensors, nn.Conv2d 1x1 convs, nn.GroupNorm, nn.GELU, the whole batch through
every stage, where ours cuts it into pieces during CPU inference), plus two twins for what those do otherwise: the
Algorithm 1 shift and a concatenating merge. :func:`official_configuration` builds it.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

# the model's modules that the twins replace; the rest of asmlp_min.bench imports only its registry from backbone
from ..backbone import ASMLP, PatchMerging, pad_to_multiple
from ..block import AxialShiftMix
from ..fast import enable
from ..shift import reference_shift


class OfficialAxialShiftMix(AxialShiftMix):
    """The token mixing with the paper's Algorithm 1 for the shift (pad, chunk, roll, cat, narrow)."""

    def shift(self, z: Tensor, dim: int) -> Tensor:
        return reference_shift(z, self.shift_size, dim)


class OfficialPatchMerging(PatchMerging):
    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, 2)
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.reduction(self.norm(x))


def _official_twin(module: nn.Module) -> nn.Module | None:
    """The official-style replacement of one of our modules (same parameters), or None to keep it."""
    if isinstance(module, AxialShiftMix) and not isinstance(module, OfficialAxialShiftMix):
        return OfficialAxialShiftMix(module.conv1.in_channels, module.shift_size, connection=module.connection,
                                     bias=module.conv1.bias is not None)
    if isinstance(module, PatchMerging) and not isinstance(module, OfficialPatchMerging):
        return OfficialPatchMerging(module.reduction.in_channels // 4)
    return None


def official_configuration(model: ASMLP) -> ASMLP:
    """A copy of ``model`` with the same weights, run the way the official code runs it (see the twins above).
    The speed and memory baseline of ``asmlp-min bench``; its outputs equal ours up to float rounding."""
    if any(isinstance(m, AxialShiftMix) and (m.dilation != 1 or m.padding != "zeros") for m in model.modules()):
        raise ValueError("the official code has no dilation and only zero padding: build the model with the "
                         "default shift options to compare it with the official configuration")
    official = copy.deepcopy(model)
    enable(official, False)  # the reference modules: NCHW, nn.Conv2d, nn.GroupNorm, nn.GELU
    _swap_in_twins(official, next(model.parameters()))
    return official


def _swap_in_twins(parent: nn.Module, like: torch.Tensor) -> None:
    """Each module that has an official twin replaced by it, on ``like``'s device and in its dtype (a float64
    model's weights would otherwise be rounded to the twin's float32)."""
    for name, child in list(parent.named_children()):
        twin = _official_twin(child)
        if twin is not None:
            twin.to(like.device, like.dtype).train(child.training).load_state_dict(child.state_dict())
            setattr(parent, name, twin)
            child = twin
        _swap_in_twins(child, like)  # also reaches the modules inside a new twin
