"""Using a model outside the training loop: :func:`evaluate` on a validation set, :func:`predict` on one image,
:func:`load_trained` from a run's checkpoint."""
from __future__ import annotations

import os
import sys

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Subset
from tqdm.auto import tqdm

from .config import TrainConfig
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
    # paper-style seg evaluation rescales each image by its own aspect ratio: one image per batch, as mmseg
    batch_size = 1 if cfg.task == "seg" and cfg.augment == "paper" else cfg.batch_size
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
