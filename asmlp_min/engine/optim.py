"""AdamW with the official parameter groups and the per-iteration learning-rate schedules (warm-up, then cosine,
poly or step)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, task: str = "cls") -> list[dict]:
    """Two AdamW groups, the parameters that decay and those that do not, split as the official configs split them.

    cls: every 1-D tensor and bias is exempt (the skip list of the Swin/AS-MLP ImageNet code). det, seg: the
    parameters whose name contains "norm" (mmdet/mmseg's ``paramwise_cfg`` ``custom_keys={"norm":
    dict(decay_mult=0.)}``), so biases decay there, and so do the heads' BatchNorms, which mmseg names ``bn``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or name.endswith(".bias") if task == "cls" else "norm" in name
        if param.requires_grad:
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 1e-3,
              min_ratio: float = 0.0, power: float = 1.0, milestones: Iterable[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps (per iteration, as mmcv and timm step them).

    main(t):  cosine  min + (1 - min) (1 + cos(pi t / T)) / 2
              poly    min + (1 - min) (1 - t / T) ** power
              step    gamma ** (number of milestones <= t)
    warm-up (t < W): cosine, as timm's CosineLRScheduler (the official ImageNet code): r + (1 - r) t / W, a ramp
    that reaches the base lr; poly and step, mmcv's linear rule: main(t) * (r + (1 - r) t / W).
    """
    t = min(step, total_steps)
    if schedule == "cosine" and step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    if schedule == "cosine":
        main = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t / total_steps))
    elif schedule == "poly":
        main = min_ratio + (1 - min_ratio) * (1 - t / total_steps) ** power
    else:  # step (TrainConfig checks the name)
        main = gamma ** sum(t >= m for m in milestones)
    if step < warmup_steps:
        main *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return main


def build_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW (betas 0.9/0.999, eps 1e-8) and a per-iteration LambdaLR implementing :func:`lr_factor`.

    ``fused=True``: one pass updates every parameter (PyTorch's fused CPU/CUDA kernel, the same arithmetic), where the
    default loops over the tensors with several small ops each.
    """
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.task), lr=cfg.lr, betas=(0.9, 0.999),
                                  eps=1e-8, fused=True)
    total = cfg.epochs * steps_per_epoch
    # COCO 1x: lr x0.1 after epochs 8 and 11 of 12, kept at the same fractions for other lengths.
    milestones = [round(total * 8 / 12), round(total * 11 / 12)]
    schedule = dict(schedule=cfg.schedule, total_steps=total, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                    warmup_ratio=cfg.warmup_ratio, min_ratio=cfg.min_lr_ratio, milestones=milestones)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))
    return optimizer, scheduler
