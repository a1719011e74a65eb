"""Parameters and multiply-accumulates (MACs), measured and by formula, beside the paper's numbers.

The paper's "FLOPs" (like Swin's and timm's) are multiply-adds, so we report **GMACs**:
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC, hence the division by 2.
The analytic count is the official code's formula (``flops()`` of svip-lab/AS-MLP's model):
per block 12 N d^2 + 5 N d (N = h * w tokens), per merge N d + (N/4) 8 d^2.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbone import MODEL_CONFIGS, create_model

# Paper / official README values: params (M), FLOPs (G, = GMACs) at 224^2, ImageNet top-1.
PAPER = {
    "asmlp_tiny": dict(params=28, gmacs=4.4, top1=81.3),
    "asmlp_small": dict(params=50, gmacs=8.5, top1=83.1),
    "asmlp_base": dict(params=88, gmacs=15.2, top1=83.3),
    "asmlp_mobile": dict(params=9.6, gmacs=None, top1=None),  # config unconfirmed, see backbone.MODEL_CONFIGS
}
# The official code's own analytic counts (its flops() method), more precise than the rounded table.
OFFICIAL_ANALYTIC_GMACS = {"asmlp_tiny": 4.359, "asmlp_small": 8.525, "asmlp_base": 15.143}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (with ``trainable_only``, those that require a gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gmacs(model: nn.Module, input_size: int | tuple[int, int, int] = (3, 224, 224)) -> float:
    """Measured GMACs of one forward pass at ``input_size`` (c, h, w), or an int s for (3, s, s): FlopCounterMode
    FLOPs / 2 / 1e9."""
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def stage_resolutions(image_size: int | tuple[int, int], num_stages: int = 4, patch_size: int = 4):
    """Token-map (h, w) of each stage: ceil(H/patch_size), then halved (rounded up) at every merge."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    h, w = math.ceil(h / patch_size), math.ceil(w / patch_size)
    sizes = []
    for _ in range(num_stages):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


def analytic_gmacs(name: str, image_size: int | tuple[int, int] = 224, num_classes: int = 1000,
                   in_chans: int = 3) -> float:
    """The official ``flops()`` formula for a registered variant ``name`` (norms count one MAC per element); for a
    model, measure with :func:`count_gmacs`."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"analytic_gmacs takes a variant name, one of {sorted(MODEL_CONFIGS)}, got "
                         f"{name if isinstance(name, str) else type(name).__name__!r}; count_gmacs(model) measures a "
                         "model")
    cfg = MODEL_CONFIGS[name]
    sizes = stage_resolutions(image_size, len(cfg.depths), cfg.patch_size)
    n0 = sizes[0][0] * sizes[0][1]
    macs = n0 * cfg.embed_dim * in_chans * cfg.patch_size ** 2 + n0 * cfg.embed_dim  # stem conv + norm
    for i, depth in enumerate(cfg.depths):
        d, n = cfg.embed_dim * 2 ** i, sizes[i][0] * sizes[i][1]
        macs += depth * (12 * n * d * d + 5 * n * d)
        if i < len(cfg.depths) - 1:
            macs += n * d + sizes[i + 1][0] * sizes[i + 1][1] * 4 * d * 2 * d  # merge: norm(4d) + 4d -> 2d
    d_last = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
    # Final norm + head. The official flops() (inherited from Swin) counts the final norm over
    # n0 / 2^num_stages tokens rather than the n0 / 4^(num_stages-1) that stage 3 really has; we keep
    # that term so the totals match the official 4.359 / 8.525 / 15.143.
    macs += n0 // 2 ** len(cfg.depths) * d_last + d_last * num_classes
    return macs / 1e9


def info_table(name: str, image_size: int = 224) -> str:
    """Markdown table for ``asmlp-min info NAME``: measured vs analytic vs paper, and per-stage shapes."""
    model = create_model(name)
    params = count_params(model)
    measured = count_gmacs(model, (3, image_size, image_size))
    analytic = analytic_gmacs(name, image_size)
    paper = PAPER[name]
    fmt = lambda v, unit: "n/a" if v is None else f"{v}{unit}"  # noqa: E731
    rows = [
        f"## {name} at {image_size}x{image_size}, 1000 classes",
        "",
        "| quantity | asmlp_min | paper (at 224x224) |",
        "|---|---|---|",
        f"| parameters | {params:,} ({params / 1e6:.2f}M) | {fmt(paper['params'], 'M')} |",
        f"| GMACs, measured (FlopCounterMode / 2) | {measured:.3f} | {fmt(paper['gmacs'], '')} |",
        f"| GMACs, analytic (the official code's flops() formula) | {analytic:.3f} | "
        + (f"{OFFICIAL_ANALYTIC_GMACS[name]} (official code's total, not in the paper) |"
           if name in OFFICIAL_ANALYTIC_GMACS else "n/a |"),
        f"| ImageNet-1K top-1 (paper) | - | {fmt(paper['top1'], '%')} |",
        "",
        "| stage | blocks | output (c, h, w) | stride |",
        "|---|---|---|---|",
    ]
    cfg = MODEL_CONFIGS[name]
    for i, ((h, w), depth) in enumerate(zip(stage_resolutions(image_size, len(cfg.depths)), cfg.depths)):
        rows.append(f"| {i} | {depth} | ({cfg.embed_dim * 2 ** i}, {h}, {w}) | {cfg.patch_size * 2 ** i} |")
    rows += ["", "The paper gives GMACs to one decimal; the formula counts one MAC per norm element, the measurement "
                 "counts the matrix products and convolutions only."]
    if image_size != 224:
        rows += ["", f"GMACs grow with the number of pixels: the paper's column is for 224x224, ours for "
                     f"{image_size}x{image_size}."]
    if name == "asmlp_mobile":
        rows += ["", "Note: the paper's mobile configuration was not released; C=64, depths (2,2,2,2) is a guess "
                     "that matches its ~9.6M parameters."]
    return "\n".join(rows)
