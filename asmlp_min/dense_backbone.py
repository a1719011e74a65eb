"""The AS-MLP feature extractor shared by the dense-prediction models (detection, segmentation).

    image (b, 3, H, W) -> ``features_only`` AS-MLP -> the maps of stages ``out_indices``,
    stage i: (b, 2^i C, H / 2^(i+2), W / 2^(i+2)), each through its own ``norm{i}`` = GroupNorm(1, 2^i C)
    (the official code's: one group, so it normalises each image over channels and positions together).

Built, loaded (official classification ``.pth``, mmdet/mmseg ``{"state_dict": {"backbone.…"}}`` or a project
checkpoint) and partly frozen here, so the detector and the segmenter check a backbone name once.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from .backbone import ASMLP, MODEL_CONFIGS, create_model
from .checkpoint import LoadReport, load_backbone_checkpoint


def build_backbone(name: str, out_indices: Sequence[int] | slice | None, pretrained_backbone=None,
                   frozen_stages: int = -1, /, **backbone_kwargs) -> tuple[ASMLP, LoadReport | None]:
    """A ``features_only`` AS-MLP with ``out_indices`` (None: every stage), its weights loaded and its first stages
    frozen. ``backbone_kwargs``: what the detector or segmenter was given beyond its own arguments, for
    :func:`create_model`; a misspelt argument of theirs lands here, so the message names both."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown backbone {name!r}: choose from {sorted(MODEL_CONFIGS)}")
    if set_here := sorted({"features_only", "num_classes", "out_indices"} & set(backbone_kwargs)):
        raise ValueError(f"{', '.join(set_here)}: set by the detector or segmenter itself; leave out" + (
            " (the detector's stages are its 'levels' argument)" if "out_indices" in set_here else ""))
    if unknown := sorted(set(backbone_kwargs) - set(inspect.signature(ASMLP).parameters) - {"fast", "pretrained"}):
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}: neither the detector's or "
                        "segmenter's own nor one of the AS-MLP backbone's (create_model), to which it passes the rest; "
                        "check the spelling")
    backbone = create_model(name, features_only=True, out_indices=out_indices, **backbone_kwargs)
    if not -1 <= frozen_stages <= len(backbone.layers):
        raise ValueError(f"frozen_stages must be in [-1, {len(backbone.layers)}], got {frozen_stages}: "
                         "-1 trains everything, 0 freezes the patch embedding, k also freezes stages 0..k-1")
    report = None if pretrained_backbone is None else load_backbone_checkpoint(backbone, pretrained_backbone)
    freeze_stages(backbone, frozen_stages)
    return backbone, report


def freeze_stages(backbone: ASMLP, frozen_stages: int) -> None:
    """mmdet's ResNet convention: -1 nothing, 0 the patch embedding, k >= 1 also ``layers[0..k-1]``.

    Frozen parts get no gradient and stay in eval mode (no drop path), so call this again after ``.train()``
    (the detector and the segmenter do). The official AS-MLP mmdet/mmseg backbone counts as Swin does, one more:
    its ``frozen_stages=k`` (k >= 1) freezes the patch embedding and ``layers[0..k-2]``, this function's k - 1.
    Every official config trains everything (-1).
    """
    for module in [backbone.patch_embed, *backbone.layers][:frozen_stages + 1]:
        module.eval()
        module.requires_grad_(False)
