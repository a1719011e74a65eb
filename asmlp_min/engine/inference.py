"""Using a model outside the training loop: :func:`evaluate` on a validation set, :func:`predict` on one image,
:func:`load_trained` from a run's checkpoint, :func:`load_released` from official weights with their head."""
from __future__ import annotations

import os
import re
import sys

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Subset
from tqdm.auto import tqdm

from .config import FOLDER_IMAGE_SIZE, SIZE_FIELD, TrainConfig
from .data import TaskData, _loaded, _loader, task_transforms
from .distributed import DistEnv, _autocast
from .runs import _model_for, _read_engine_checkpoint, _saved_config
from .tasks import make_task


def _progress(total: int, desc: str, env: DistEnv):
    """A tqdm bar on rank 0 when stderr is a terminal; silent in logs, CI and notebooks under test."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (env.is_main and sys.stderr.isatty()))


@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, data: TaskData, env: DistEnv | None = None) -> dict:
    """Metrics of ``model`` on ``data.val``: cls val_loss/top1/top5, det the 12 COCO box stats, seg mIoU/aAcc/mAcc.

    Each rank scores a disjoint share (every world_size-th image, no padding) and the results are reduced.
    """
    env = env or DistEnv(device=next(model.parameters()).device)
    task = make_task(cfg, data)
    shard = Subset(data.val, range(env.rank, len(data.val), env.world_size))
    # seg scores the logits at each mask's own size, and folders mix sizes: one image per batch, as mmseg tests
    batch_size = 1 if cfg.task == "seg" and (cfg.augment == "paper" or cfg.data != "shapes") else cfg.batch_size
    batches = list(BatchSampler(range(len(shard)), batch_size, drop_last=False))
    was_training = model.training
    model.eval()
    bar = _progress(len(batches), "evaluate", env)

    def prepared():
        for batch in _loaded(_loader(shard, batches, task.collate_fn, cfg.workers, 0, env.device)):
            yield task.prepare(batch, env.device, cfg.channels_last)
            bar.update(1)
    try:
        return task.evaluate(model, prepared(), env, lambda: _autocast(env.device, cfg.amp))
    finally:
        bar.close()
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, cfg: TrainConfig, image: Tensor):
    """One image (3, h, w), uint8 or float in [0, 1], through the validation transform and the model.

    Returns cls: class probabilities (num_classes,); det: ``{"boxes" (k, 4) xyxy in the image's pixels,
    "scores", "labels"}``; seg: the (h, w) int64 class map at the image's own size (the model runs at the eval
    transform's size, as ``evaluate`` scores it).
    """
    from torchvision import tv_tensors

    from ..segmentation import class_map
    device = next(model.parameters()).device
    inputs = task_transforms(cfg.task, cfg.augment, False, cfg.input_size)(tv_tensors.Image(image)).to(device)
    model.eval()
    with _autocast(device, cfg.amp):
        if cfg.task == "cls":
            return model(inputs[None]).float().softmax(-1)[0].cpu()
        if cfg.task == "det":
            return {k: v.cpu() for k, v in model([inputs])[0].items()}
        logits = model(inputs[None]).float()
    return class_map(logits, image.shape[-2:])[0].cpu()


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu",
                 loaded: dict | None = None) -> tuple[nn.Module, TrainConfig, dict]:
    """(model in eval mode, its TrainConfig, the checkpoint) from a ``checkpoint.pt`` written by :class:`Trainer`;
    ``loaded``: the file's contents, when the caller has read it already with ``load_checkpoint``."""
    checkpoint = _read_engine_checkpoint(path, loaded=loaded)
    cfg = _saved_config(checkpoint, path)
    model = _model_for(checkpoint, cfg, path)
    return model.to(device).eval(), cfg, checkpoint


def load_released(path: str | os.PathLike, device: str | torch.device = "cpu",
                  loaded: dict | None = None) -> tuple[nn.Module, TrainConfig, dict]:
    """(model in eval mode, a TrainConfig to evaluate it with, ``{"classes": ["class 0", ...]}``) from released
    weights that carry their head: an official classification ``.pth`` (``head.*``, the ImageNet classifier) or an
    official mmseg UperNet checkpoint (``backbone.*``, ``decode_head.*``). The width and the blocks per stage are
    read off the tensors' shapes (a registered variant where they match one), an mmseg file's shift size off its
    config; the weights then load strictly. ``loaded``: the file's contents, if already read."""
    from ..backbone import MODEL_CONFIGS
    from ..checkpoint import (CheckpointError, _saved_shift_size, extract_state_dict, load_checkpoint,
                              load_official_checkpoint)
    from ..files import shell_word
    from .tasks import build_model
    checkpoint = load_checkpoint(path) if loaded is None else loaded
    sd = extract_state_dict(checkpoint, whole_model=True)
    task = "cls" if "head.weight" in sd else "seg" if "decode_head.conv_seg.weight" in sd else None
    prefix = "backbone." if task == "seg" else ""
    blocks = [re.match(rf"{prefix}layers\.(\d+)\.blocks\.(\d+)\.", key) for key in sd]
    if task is None or f"{prefix}patch_embed.proj.weight" not in sd or not any(blocks):
        raise CheckpointError(f"{path} is neither a training run's checkpoint.pt nor released AS-MLP weights with "
                              "their head (an official classification .pth with head.weight, or an mmseg UperNet "
                              "with decode_head): evaluate and predict need one of those; backbone weights start a "
                              f"training instead: asmlp-min train --pretrained {shell_word(path)}")
    found = [(int(m[1]), int(m[2])) for m in blocks if m]   # (stage, block)
    depths = tuple(1 + max(j for i, j in found if i == stage) for stage in range(1 + max(i for i, _ in found)))
    embed_dim = sd[f"{prefix}patch_embed.proj.weight"].shape[0]
    variant = next((name for name, c in MODEL_CONFIGS.items() if (c.embed_dim, c.depths) == (embed_dim, depths)),
                   None)
    head = sd["head.weight"] if task == "cls" else sd["decode_head.conv_seg.weight"]
    cfg = TrainConfig(task=task, model=variant or "asmlp_tiny", num_classes=head.shape[0],
                      embed_dim=None if variant else embed_dim, depths=None if variant else depths,
                      shift_size=_saved_shift_size(checkpoint), augment="paper",   # the paper's eval transforms
                      head_channels=sd["decode_head.bottleneck.conv.weight"].shape[0] if task == "seg" else None,
                      **{SIZE_FIELD[task]: FOLDER_IMAGE_SIZE[task]}).resolved()    # at the paper's input size
    model = build_model(**cfg.model_kwargs())
    if task == "seg":
        _fit_auxiliary_head(model, sd)
    load_official_checkpoint(model, checkpoint)       # strict: a CheckpointError names what does not fit
    return model.to(device).eval(), cfg, {"classes": [f"class {k}" for k in range(cfg.num_classes)]}


def _fit_auxiliary_head(model: nn.Module, sd: dict) -> None:
    """The segmenter's training-only auxiliary head as the mmseg file has it: none (a config with
    ``auxiliary_head=None``), or as wide as its weights, so that the strict load checks everything else."""
    from ..segmentation import FCNHead
    weight = sd.get("auxiliary_head.convs.0.conv.weight")
    if weight is None:
        model.auxiliary_head = None
    elif weight.ndim == 4 and weight.shape[0] != (conv := model.auxiliary_head.convs[0].conv).out_channels:
        model.auxiliary_head = FCNHead(conv.in_channels, weight.shape[0], model.num_classes)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """:func:`load_trained` for a run's checkpoint.pt, :func:`load_released` for anything else."""
    from ..checkpoint import load_checkpoint
    from .runs import is_run_checkpoint
    loaded = load_checkpoint(path)
    return (load_trained if is_run_checkpoint(loaded) else load_released)(path, device, loaded=loaded)
