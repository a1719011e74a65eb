"""One training / evaluation loop for classification, detection and segmentation.

    config -> seed -> data (shapes or a folder) -> model (cls / det / seg) -> AdamW + warm-up schedule
      -> epochs of: per-iteration lr, autocast, backward (accumulated), clip, step
         -> evaluate -> metrics.jsonl + curves.png + checkpoint.pt (atomic)

The recipes are the official ones (../shared/PAPER.md Sec. 8 and 11): AdamW without weight decay on
norms and biases; linear warm-up then cosine (ImageNet), poly (ADE20K) or steps at 8/12 and 11/12 of
training (COCO 1x); gradient clipping at 5 for classification. Learning rates default to values that
train the small models on the built-in shapes data from scratch; the paper's values are in ``--help``.

Reproducibility. All randomness is torch's global generator (dropout, drop path, augmentation,
mixup) plus a per-epoch seeded data order (``DistributedSampler(seed, epoch)``, used with one process
too). A checkpoint holds every rank's generator state and how many batches of the current epoch are
done, so ``--resume`` continues bit-for-bit on CPU, from an epoch boundary or from a Ctrl-C mid-epoch.

Distributed. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA), each rank reads its own share of the same permutation, so N processes of
batch b see exactly the batches one process of batch N*b would. Losses and metrics are reduced over
ranks; only rank 0 writes files. BatchNorm in the heads becomes SyncBatchNorm on CUDA (PyTorch has no
CPU SyncBatchNorm; on gloo each process keeps its own statistics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from .backbone import MODEL_CONFIGS, create_model
from .checkpoint import (CheckpointError, WriteError, atomic_write, compare_state_dicts, load_checkpoint,
                         non_finite_keys, remove_stale_temp_files, save_checkpoint, shown_keys)

TASKS = ("cls", "det", "seg")
CHECKPOINT_NAME = "checkpoint.pt"
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "curves.png")  # what a run writes into its folder
CHECKPOINT_FORMAT = "asmlp_min.engine/1"

# Per-task recipe (../shared/PAPER.md Sec. 8, 11). lr and image_size are tuned for shapes from scratch;
# the paper uses 1e-3 @ batch 1024 (cls), 1e-4 @ 16 (det, from ImageNet weights), 6e-5 @ 16 (seg).
# On a dataset folder image_size defaults to the paper's instead (FOLDER_IMAGE_SIZE).
TASK_DEFAULTS = {
    "cls": dict(lr=1e-3, weight_decay=0.05, clip_grad=5.0, schedule="cosine", warmup_ratio=1e-3, min_lr_ratio=0.01,
                image_size=64, main_metric="top1"),
    "det": dict(lr=1e-3, weight_decay=0.05, clip_grad=0.0, schedule="step", warmup_ratio=1e-3, min_lr_ratio=0.0,
                image_size=128, main_metric="AP"),
    "seg": dict(lr=1e-3, weight_decay=0.01, clip_grad=0.0, schedule="poly", warmup_ratio=1e-6, min_lr_ratio=0.0,
                image_size=128, main_metric="mIoU"),
}
# The paper's input sizes (Sec. 8, 11): ImageNet crops 224 (eval: resize 256, centre crop), COCO short side 800
# (long side <= 1333, DET_MAX_SIZE_RATIO), ADE20K training crops 512.
FOLDER_IMAGE_SIZE = {"cls": 224, "det": 800, "seg": 512}
DET_MAX_SIZE_RATIO = 1333 / 800


class NonFiniteLossError(RuntimeError):
    """The loss, the validation loss or the weights became nan/inf; training stopped without writing a checkpoint."""


class DataError(ValueError):
    """A sample could not be read or transformed (a truncated image, a mask value out of range); the message is the
    reader's, which names the file."""


# ---------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Everything a run depends on; stored as a plain dict in the checkpoint so evaluate/predict rebuild it.

    ``None`` means "the task's default" (``TASK_DEFAULTS``, the model registry); :meth:`resolved` fills them.
    ``batch_size`` is per process: the global batch is ``batch_size * world_size * accum_steps``.
    ``image_size``: cls the square input (paper: the crop); det the short side the detector resizes every image
    to, in training and evaluation (long side <= 1333/800 of it); seg the training crop. Default:
    ``TASK_DEFAULTS`` on shapes, ``FOLDER_IMAGE_SIZE`` (the paper's) on a folder.
    """

    task: str = "cls"
    model: str = "asmlp_tiny"
    data: str = "shapes"
    output: str = "runs/train"
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    warmup_ratio: float | None = None
    min_lr_ratio: float | None = None
    schedule: str | None = None
    clip_grad: float | None = None
    drop_path: float | None = None
    label_smoothing: float = 0.1
    class_weight: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: bool = False
    channels_last: bool = False
    accum_steps: int = 1
    seed: int = 0
    image_size: int | None = None
    train_size: int = 2000
    val_size: int = 400
    augment: str = "auto"
    workers: int = 0
    device: str = "auto"
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    shift_size: int | None = None
    head_channels: int | None = None
    pretrained: str | None = None
    num_classes: int | None = None
    eval_every: int = 1
    stop_at_epoch: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with task defaults filled in, after checking every value (ValueError saying what to fix)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(MODEL_CONFIGS)}")
        defaults = TASK_DEFAULTS[self.task]
        filled = {k: defaults[k] for k in ("lr", "weight_decay", "clip_grad", "schedule", "warmup_ratio",
                                           "min_lr_ratio") if getattr(self, k) is None}
        if self.image_size is None:  # sizes for the small shapes scenes; the paper's for real data
            filled["image_size"] = defaults["image_size"] if self.data == "shapes" else FOLDER_IMAGE_SIZE[self.task]
        if self.augment == "auto":  # the paper's crops on real data; flips only on the small shapes scenes
            filled["augment"] = "light" if self.data == "shapes" else "paper"
        cfg = dataclasses.replace(self, **filled)
        if cfg.depths is not None:
            cfg.depths = tuple(int(d) for d in cfg.depths)
        for name in ("epochs", "batch_size", "accum_steps", "image_size", "train_size", "val_size", "eval_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.task == "det" and cfg.image_size < 32:
            raise ValueError(f"det: image_size is the short side the detector resizes images to and must be >= 32, "
                             f"got {cfg.image_size}")
        if cfg.task != "det" and cfg.image_size < PATCH_SIZE:
            raise ValueError(f"{cfg.task}: image_size must be >= {PATCH_SIZE}, got {cfg.image_size}: the model cuts the "
                             f"image into {PATCH_SIZE}x{PATCH_SIZE} patches, and a smaller image has none")
        if cfg.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 loads data in the main process), got {cfg.workers}")
        if not _DEVICE.fullmatch(cfg.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {cfg.device!r}")
        if cfg.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {cfg.augment!r}")
        for name in ("lr", "weight_decay", "warmup_epochs", "clip_grad", "label_smoothing", "mixup", "cutmix",
                     "warmup_ratio", "min_lr_ratio"):
            if not math.isfinite(getattr(cfg, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(cfg, name)}")
            if getattr(cfg, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        if not 0 <= cfg.label_smoothing < 1 or not 0 < cfg.warmup_ratio <= 1 or not 0 <= cfg.min_lr_ratio <= 1:
            raise ValueError("need 0 <= label_smoothing < 1, 0 < warmup_ratio <= 1 and 0 <= min_lr_ratio <= 1")
        if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:  # also refuses nan
            raise ValueError(f"drop_path must be in [0, 1), got {cfg.drop_path}")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
        if (cfg.mixup or cfg.cutmix) and cfg.task != "cls":
            raise ValueError("mixup/cutmix apply to classification only")
        if cfg.class_weight is not None:
            if cfg.task != "seg":
                raise ValueError("class_weight applies to segmentation only")
            if cfg.class_weight != "balanced":
                _parse_class_weight(cfg.class_weight)
        if cfg.stop_at_epoch is not None and not 1 <= cfg.stop_at_epoch <= cfg.epochs:
            raise ValueError(f"stop_at_epoch must be in [1, epochs={cfg.epochs}], got {cfg.stop_at_epoch}")
        return cfg

    def backbone_kwargs(self) -> dict:
        """Overrides of the registered variant (only those given), e.g. a small model for the demo."""
        kwargs = dict(embed_dim=self.embed_dim, depths=self.depths, shift_size=self.shift_size,
                      drop_path_rate=self.drop_path)
        return {k: v for k, v in kwargs.items() if v is not None}

    def to_dict(self) -> dict:
        """Plain types only (tuples -> lists), so ``torch.load(weights_only=True)`` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; a value of the wrong type (``epochs: "ten"``) raises TypeError naming it."""
        if not isinstance(values, dict):
            raise TypeError(f"a config must be a dict, got {type(values).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        wrong = [f"{k}: {v!r} (expected {fields[k]})" for k, v in values.items()
                 if k in fields and not _has_type(v, fields[k])]
        if wrong:
            raise TypeError("config values of the wrong type: " + "; ".join(wrong))
        return cls(**{k: tuple(v) if k == "depths" and v is not None else v for k, v in values.items() if k in fields})


def _has_type(value, annotation: str) -> bool:
    """Whether ``value`` fits a TrainConfig annotation such as ``'float | None'`` (ints count as floats)."""
    kinds = annotation.split(" | ")
    if value is None:
        return "None" in kinds
    is_int = isinstance(value, int) and not isinstance(value, bool)
    checks = {"int": is_int, "float": is_int or isinstance(value, float), "str": isinstance(value, str),
              "bool": isinstance(value, bool),
              "tuple[int, ...]": isinstance(value, (list, tuple))
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)}
    return any(checks.get(kind, False) for kind in kinds)


def _parse_class_weight(text: str) -> list[float]:
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"class_weight must be 'balanced' or positive numbers separated by commas, one per class "
                         f"(e.g. 1,4.8,4.2,6.1), got {text!r}")
    return weights


PATCH_SIZE = 4  # the backbone's patch embedding (../shared/PAPER.md Sec. 3)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# Fields that must match for --resume: they define the model and the data order.
_RESUME_MUST_MATCH = ("task", "model", "embed_dim", "depths", "shift_size", "head_channels", "num_classes",
                      "image_size", "seed", "batch_size", "accum_steps")
# ... and the learning-rate schedule, which the checkpoint's optimiser and scheduler state continue (their saved
# lr and weight decay would silently win over new values).
_RESUME_SCHEDULE = ("lr", "weight_decay", "schedule", "warmup_epochs", "warmup_ratio", "min_lr_ratio")


# ---------------------------------------------------------------- processes, seeds, devices

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU); pick the device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        values = values.to(env.device)
        dist.all_reduce(values)
    return values.cpu()


def _gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_state(env: DistEnv) -> dict[str, Tensor]:
    """Every rank's torch generator state, stacked (world_size, n) uint8, so each rank resumes its own stream."""
    states = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(env.device)
    return {name: torch.stack([s.cpu() for s in _gather_objects(state, env)]) for name, state in states.items()}


def set_rng_state(states: dict[str, Tensor], env: DistEnv) -> None:
    """This rank's row of :func:`rng_state`, copied: torch 2.14 crashes (SIGSEGV) on a state tensor with a storage
    offset, which every row but the first has."""
    torch.set_rng_state(states["cpu"][env.rank].clone())
    if "cuda" in states and env.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][env.rank].clone(), env.device)


# ---------------------------------------------------------------- optimiser and schedule

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights decay; norm parameters and biases (every 1-D tensor) do not (Swin/AS-MLP)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SCHEDULES = ("cosine", "poly", "step")


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 1e-3,
              min_ratio: float = 0.0, power: float = 1.0, milestones: Iterable[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps (per iteration, as mmcv and timm step them).

    main(t):  cosine  min + (1 - min) (1 + cos(pi t / T)) / 2
              poly    min + (1 - min) (1 - t / T) ** power
              step    gamma ** (number of milestones <= t)
    warm-up (t < W, mmcv's linear rule): main(t) * (r + (1 - r) t / W), so it starts at r * main(0).
    """
    t = min(step, total_steps)
    if schedule == "cosine":
        main = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t / total_steps))
    elif schedule == "poly":
        main = min_ratio + (1 - min_ratio) * (1 - t / total_steps) ** power
    elif schedule == "step":
        main = gamma ** sum(t >= m for m in milestones)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        main *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return main


def build_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW (betas 0.9/0.999, eps 1e-8) and a per-iteration LambdaLR implementing :func:`lr_factor`."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    total = cfg.epochs * steps_per_epoch
    # COCO 1x: lr x0.1 after epochs 8 and 11 of 12, kept at the same fractions for other lengths.
    milestones = [round(total * 8 / 12), round(total * 11 / 12)]
    schedule = dict(schedule=cfg.schedule, total_steps=total, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                    warmup_ratio=cfg.warmup_ratio, min_ratio=cfg.min_lr_ratio, milestones=milestones)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))
    return optimizer, scheduler


# ---------------------------------------------------------------- data

@dataclass
class TaskData:
    """Datasets plus what the model and the evaluation need to know about them."""
    train: Dataset | None
    val: Dataset
    num_classes: int
    classes: list[str] = field(default_factory=list)
    coco_gt: object = None  # detection: the validation ground truth for COCOeval (dict, path or COCO)
    category_ids: list[int] | None = None  # detection: label k is COCO category category_ids[k - 1]; None: k itself


AUGMENTATIONS = ("auto", "paper", "light", "none")
SHAPES_SIZE = 128  # det/seg scenes are drawn at their native size and resized by the transform


def _identity(*inputs):
    return inputs if len(inputs) > 1 else inputs[0]


def light_transforms(task: str, train: bool, size: int):
    """Resize to ``size`` (cls, seg; the detector sizes its own input) and, when training, a horizontal flip.

    ``--augment light``, the default on shapes: the paper's crops (RandomResizedCrop from 8% of the image,
    0.5-2x rescale) would cut the dominant shape out of a 64-pixel scene and relabel it.
    """
    from torchvision.transforms import v2
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
    ops = [v2.ToImage()]
    if task != "det":
        ops.append(v2.Resize((size, size), antialias=True))
    if train:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if task != "det":  # torchvision-style detectors normalise inside the model
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


def paper_transforms(task: str, train: bool, size: int):
    """The data pipelines of the paper's recipes (asmlp_min.data.transforms).

    det: flips only; the detector resizes every image to short side ``size`` itself (``build_model``), so
    training and evaluation see the same scale (COCO: 800, single scale; the paper trains at 480-800).
    """
    from .data import transforms as T
    if task == "cls":
        return T.classification_transforms(train, size)
    if task == "det":
        return T.detection_transforms(train)
    return T.segmentation_transforms(train, size if train else None)


def task_transforms(task: str, augment: str, train: bool, size: int):
    """The transform for one split; ``augment='none'`` is the eval transform for training too."""
    if augment == "paper":
        return paper_transforms(task, train, size)
    return light_transforms(task, train and augment == "light", size)


class CachedDataset(Dataset):
    """Keeps each untransformed sample after its first read (the shapes generator runs once per scene,
    not once per epoch), then applies ``transform``. The cache is per process and filled lazily."""

    def __init__(self, base: Dataset, transform: Callable, task: str):
        self.base, self.transform, self.task, self.cache = base, transform, task, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        if index not in self.cache:
            self.cache[index] = self.base[index]
        image, target = self.cache[index]
        if self.task == "cls":
            return self.transform(image), target
        return self.transform(image, target)


def build_data(cfg: TrainConfig, with_train: bool = True) -> TaskData:
    """``--data shapes`` (generated, deterministic, cached in memory) or a folder in the task's real layout.

    Folders: cls ``PATH/{train,val}/<class>/<image>`` (ImageFolder); det ``PATH/annotations/instances_{split}.json``
    with images in ``PATH/{split}/`` for split train/val or train2017/val2017 (COCO); seg
    ``PATH/{images,annotations}/{training,validation}`` (ADE20K: 150 classes, label 0 ignored) or ``.../{train,val}``
    (``--num-classes`` required, 0 is a class). This is also what ``export_shapes`` writes.
    ``train=False`` builds the validation split only (``TaskData.train`` is None), for evaluation.
    """
    train_tf, val_tf = (task_transforms(cfg.task, cfg.augment, train, cfg.image_size) for train in (True, False))
    if cfg.data == "shapes":
        return _shapes_data(cfg, train_tf, val_tf, with_train)
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {cfg.data!r}: no such folder (use --data shapes for the built-in data)")
    folder = {"cls": _folder_cls, "det": _folder_det, "seg": _folder_seg}[cfg.task]
    return folder(root, cfg, train_tf, val_tf, with_train)


def _shapes_data(cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from .data import shapes
    kind = {"cls": shapes.ShapesClassification, "det": shapes.ShapesDetection, "seg": shapes.ShapesSegmentation}
    dataset = kind[cfg.task]
    # cls: one whole shape on grey (a border-cut square can read as a triangle); det/seg: the default scenes
    scene = shapes.CLS_SCENE if cfg.task == "cls" else dict(image_size=SHAPES_SIZE)
    make = lambda n, split, tf: CachedDataset(  # noqa: E731
        dataset(n, seed=cfg.seed, split=split, transform=_identity, **scene), tf, cfg.task)
    val = make(cfg.val_size, "val", val_tf)
    classes = list(dataset.classes)
    return TaskData(make(cfg.train_size, "train", train_tf) if with_train else None, val, len(classes), classes,
                    coco_gt=val.base.coco_dict() if cfg.task == "det" else None)


def _existing(root: Path, candidates: Iterable[str], what: str) -> str:
    for candidate in candidates:
        if (root / candidate).exists():
            return candidate
    raise FileNotFoundError(f"{root}: no {what}; expected {' or '.join(str(root / c) for c in candidates)} "
                            "(see data/README.md)")


def _folder_cls(root: Path, cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from .data.datasets import ImageFolderClassification
    val = ImageFolderClassification(root / _existing(root, ["val"], "validation split"), transform=val_tf)
    train = None
    if with_train:
        train = ImageFolderClassification(root / _existing(root, ["train"], "training split"), transform=train_tf)
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise ValueError(f"{root}: train and val have different class folders (only in train: "
                             f"{', '.join(only_train) or 'none'}; only in val: {', '.join(only_val) or 'none'}); "
                             "every class needs a folder in both")
    return TaskData(train, val, len(val.classes), list(val.classes))


def _folder_det(root: Path, cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from .data.datasets import CocoDetection

    def split(names: list[str], tf) -> CocoDetection:
        ann = _existing(root, [f"annotations/instances_{n}.json" for n in names], "COCO annotation file")
        return CocoDetection(root / Path(ann).stem.removeprefix("instances_"), root / ann, transform=tf,
                             contiguous_labels=True)
    val = split(["val", "val2017"], val_tf)
    train = split(["train", "train2017"], train_tf) if with_train else None
    names = {c["id"]: c["name"] for c in val.coco.cats.values()}
    if train is not None:
        _check_same_categories(train, names, val.ann_file)
    # labels 1..K in the order of the category ids (COCO 2017: 80 ids in 1..90), mapped back for COCOeval
    return TaskData(train, val, len(names), [names[c] for c in val.category_ids], coco_gt=val.coco,
                    category_ids=val.category_ids)


def _check_same_categories(train, val_names: dict[int, str], val_file: Path) -> None:
    """Label k must mean one category in both splits: the same 'categories' (COCO 2017's are identical)."""
    train_names = {c["id"]: c["name"] for c in train.coco.cats.values()}
    if train_names != val_names:
        raise ValueError(f"{train.ann_file} and {val_file} list different 'categories' (only in train: "
                         f"{_only_in(train_names, val_names)}; only in val: {_only_in(val_names, train_names)}); "
                         "give both files the same categories")


def _only_in(names: dict[int, str], other: dict[int, str]) -> str:
    return ", ".join(f"id {i} {n!r}" for i, n in sorted(names.items()) if other.get(i) != n) or "none"


def _folder_seg(root: Path, cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from .data.datasets import ADE20KSegmentation
    val_split = Path(_existing(root, ["images/validation", "images/val"], "validation images")).name
    ade20k = val_split == "validation"
    num_classes = cfg.num_classes or (150 if ade20k else None)
    if num_classes is None:
        raise ValueError(f"{root}: pass --num-classes for a segmentation folder that is not ADE20K "
                         "(ADE20K is recognised by its images/training and images/validation folders)")
    kwargs = dict(num_classes=num_classes, reduce_zero_label=ade20k)
    val = ADE20KSegmentation(root, val_split, transform=val_tf, **kwargs)
    train = ADE20KSegmentation(root, "training" if ade20k else "train", transform=train_tf, **kwargs) \
        if with_train else None
    return TaskData(train, val, num_classes, [str(i) for i in range(num_classes)])


# ---------------------------------------------------------------- the three tasks

def build_model(task: str, model: str = "asmlp_tiny", num_classes: int = 3, head_channels: int | None = None,
                pretrained: str | None = None, image_size: int | None = None, **backbone_kwargs) -> nn.Module:
    """The one factory for every task (a checkpoint's config rebuilds the same model through it).

    cls: ``create_model(model, num_classes)``; det: ``SimpleFPNDetector`` (labels 1..num_classes, ``TaskData``);
    seg: ``SemanticSegmenter``. ``backbone_kwargs`` override the variant (embed_dim, depths, shift_size,
    drop_path_rate); ``head_channels`` shrinks the FPN (det) or UperNet (seg; auxiliary head half of it)
    channels; ``pretrained`` is a backbone checkpoint (official ``.pth``, mmdet/mmseg, or ours).
    ``image_size`` (det only; None keeps each image's size): the detector resizes every image to this short side,
    long side at most ``image_size * 1333 / 800``; the transforms size cls and seg images.
    """
    if task == "cls":
        net = create_model(model, num_classes=num_classes, **backbone_kwargs)
        if pretrained:
            from .checkpoint import load_backbone_checkpoint
            # kept on the model, as the detector and segmenter keep theirs
            net.backbone_load_report = load_backbone_checkpoint(net, pretrained, skip_head=True, name=model)
        return net
    if task == "det":
        from .detection import SimpleFPNDetector
        head = {} if head_channels is None else {"fpn_channels": head_channels}
        resize = {} if image_size is None else {"min_size": image_size,
                                                "max_size": round(image_size * DET_MAX_SIZE_RATIO)}
        return SimpleFPNDetector(backbone=model, num_classes=num_classes, pretrained_backbone=pretrained,
                                 **head, **resize, **backbone_kwargs)
    if task == "seg":
        from .segmentation import SemanticSegmenter
        head = {} if head_channels is None else {"channels": head_channels, "aux_channels": max(head_channels // 2, 1)}
        return SemanticSegmenter(backbone=model, num_classes=num_classes, pretrained_backbone=pretrained,
                                 **head, **backbone_kwargs)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """mean over the batch of -sum_k q_k log softmax(z)_k, for targets q that are distributions (mixup)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class ClassificationTask:
    """(image, label) batches; cross-entropy with label smoothing, optional mixup/cutmix; top-1/top-5."""

    collate_fn = None

    def __init__(self, cfg: TrainConfig, data: TaskData):
        self.num_classes, self.label_smoothing = data.num_classes, cfg.label_smoothing
        self.mix = None
        if cfg.mixup or cfg.cutmix:
            from torchvision.transforms import v2
            mixers = [mixer(alpha=alpha, num_classes=self.num_classes)
                      for mixer, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if alpha > 0]
            self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)  # per batch, 50/50 as timm

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, labels = batch
        return _to_device(images, device, channels_last), labels.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, labels = batch
        eps = self.label_smoothing
        if self.mix is None:
            return F.cross_entropy(model(images).float(), labels, label_smoothing=eps)
        images, soft = self.mix(images, labels)
        soft = soft * (1 - eps) + eps / self.num_classes  # smoothing is linear, so it commutes with mixing
        return soft_target_cross_entropy(model(images).float(), soft)

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits, n
        k = min(5, self.num_classes)
        for images, labels in batches:
            with autocast():
                logits = model(images).float()
            hits = logits.topk(k, dim=1).indices == labels[:, None]
            sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                                  hits[:, 0].sum().item(), hits.any(1).sum().item(), len(labels)], dtype=torch.float64)
        loss, top1, top5, n = _all_reduce_sum(sums, env).tolist()
        return {"val_loss": loss / n, "top1": top1 / n, "top5": top5 / n}


class DetectionTask:
    """(image list, target list) batches; the detector returns its losses; COCO box AP over all ranks."""

    def __init__(self, cfg: TrainConfig, data: TaskData):
        from .data.datasets import detection_collate
        self.collate_fn, self.coco_gt = detection_collate, data.coco_gt
        self.category_ids = None if data.category_ids is None else torch.tensor([0, *data.category_ids])

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]  # [0, 1]: the detector normalises
        # iscrowd travels with the boxes: the detector ignores crowd regions in training (as mmdet, torchvision)
        targets = [{**{k: t[k].to(device).as_subclass(Tensor) for k in ("boxes", "labels", "iscrowd") if k in t},
                    "image_id": t["image_id"]} for t in targets]
        return images, targets

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        from .metrics import coco_evaluate
        detections = []
        for images, targets in batches:
            with autocast():
                outputs = model(images)
            detections += [{"image_id": t["image_id"], "boxes": out["boxes"].float().cpu(),
                            "scores": out["scores"].float().cpu(), "labels": self._category_ids(out["labels"].cpu())}
                           for out, t in zip(outputs, targets)]
        everything = [d for part in _gather_objects(detections, env) for d in part]
        stats = dict(coco_evaluate(self.coco_gt, everything, "bbox")) if env.is_main else None
        return _broadcast_object(stats, env)

    def _category_ids(self, labels: Tensor) -> Tensor:
        """The detector's labels 1..K -> the data's COCO category ids."""
        return labels if self.category_ids is None else self.category_ids[labels]


class SegmentationTask:
    """(image, mask) batches; the segmenter returns its losses; mIoU from one confusion matrix over all ranks."""

    collate_fn = None

    def __init__(self, cfg: TrainConfig, data: TaskData):
        self.num_classes = data.num_classes

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, masks = batch
        return _to_device(images, device, channels_last), masks.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, masks = batch
        return sum(model(images, masks).values())

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        from .metrics import SegmentationMeter
        meter = SegmentationMeter(self.num_classes)
        for images, masks in batches:
            with autocast():
                logits = model(images)
            meter.update(logits.argmax(1), masks)
        meter.all_reduce()
        return meter.compute()


def _broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_task(cfg: TrainConfig, data: TaskData):
    """The task adapter: how a batch moves to the device, what the loss is, how to evaluate."""
    return {"cls": ClassificationTask, "det": DetectionTask, "seg": SegmentationTask}[cfg.task](cfg, data)


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 on CPU, float16 on CUDA (paired with a GradScaler); a no-op when not enabled."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _loader(dataset: Dataset, batches, collate_fn, workers: int, seed: int, device: torch.device) -> DataLoader:
    # worker seeds come from this generator, not the global one, so the worker count cannot shift the global stream
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")


def _loaded(loader: DataLoader):
    """The batches of ``loader``; a file that cannot be read (ValueError, OSError) is raised as :class:`DataError`
    with the reader's one-line message, whether it failed here (``--workers 0``) or in a worker process, which torch
    reports as the worker's whole traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ValueError, OSError) as err:  # how readers report a bad file; a bug elsewhere keeps its traceback
            raise DataError(_reader_message(err)) from None
        yield batch


_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _reader_message(err: Exception) -> str:
    """``str(err)``, or for an error that torch re-raised from a worker, the worker's own message: the text after
    the last line of its traceback that starts with the exception's name."""
    text = str(err)
    caught = _WORKER_ERROR.match(text)
    if caught is None:
        return text
    last = list(re.finditer(rf"^(?:[\w.]+\.)?{caught[1]}: ", text, re.MULTILINE))
    return text[last[-1].end():].strip() if last else text


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
    # paper-style seg evaluation keeps every image at its own size: one image per batch, as mmseg
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
    "scores", "labels"}``; seg: the (h, w) int64 class map at the image's own size.
    """
    from torchvision import tv_tensors
    device = next(model.parameters()).device
    inputs = task_transforms(cfg.task, cfg.augment, False, cfg.image_size)(tv_tensors.Image(image)).to(device)
    model.eval()
    with _autocast(device, cfg.amp):
        if cfg.task == "cls":
            return model(inputs[None]).float().softmax(-1)[0].cpu()
        if cfg.task == "det":
            return {k: v.cpu() for k, v in model([inputs])[0].items()}
        logits = model(inputs[None]).float()
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0].cpu()


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """(model in eval mode, its TrainConfig, the checkpoint) from a ``checkpoint.pt`` written by :class:`Trainer`."""
    checkpoint = _read_engine_checkpoint(path)
    cfg = _saved_config(checkpoint, path)
    model = _model_for(checkpoint, cfg, path)
    return model.to(device).eval(), cfg, checkpoint


# ---------------------------------------------------------------- the loop

class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit`; :meth:`evaluate` for one pass.

    ``model`` / ``data`` may be given instead of built (tests, notebooks); the config still describes them.
    ``resume``: a ``checkpoint.pt`` of an earlier run with the same settings, continued exactly.
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, data: TaskData | None = None,
                 env: DistEnv | None = None, resume: str | os.PathLike | None = None, log: Callable = print):
        cfg = config.resolved()
        checkpoint = _read_engine_checkpoint(resume, resume=True) if resume else None
        self.env = env or init_distributed(cfg.device)
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.output)
        if self.env.is_main:  # before data and model are built: an unusable or busy folder fails in a second
            prepare_output_folder(self.run_dir, "output")
            with run_folder_lock(self.run_dir):  # no live run writes here, so its temp files are stale
                stale = remove_stale_temp_files(self.run_dir, RUN_FILES)
            if stale:
                self.log(f"removed {len(stale)} temporary file(s) that a run killed while saving left in "
                         f"{self.run_dir}: {', '.join(p.name for p in stale)}")
        self.data = data or build_data(cfg)
        if checkpoint is not None:
            _check_label_set(checkpoint, self.data, resume)
        if cfg.num_classes is None:
            cfg.num_classes = self.data.num_classes
        elif cfg.num_classes != self.data.num_classes:
            raise ValueError(f"num_classes={cfg.num_classes} but the data has {self.data.num_classes} classes")
        if checkpoint is not None:
            _check_compatible(checkpoint, cfg, resume)
        self.cfg = cfg
        self._verified_epoch = None  # epoch of the checkpoint on disk whose weights this run checked finite
        self.task = make_task(cfg, self.data)

        seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = model if model is not None else build_model(
            cfg.task, cfg.model, cfg.num_classes, cfg.head_channels, cfg.pretrained, cfg.image_size,
            **cfg.backbone_kwargs())
        report = getattr(self.model, "backbone_load_report", None)
        if report is not None and checkpoint is None:  # self.log is silent on ranks other than 0
            self.log(f"--pretrained {cfg.pretrained}: {len(report.loaded)} backbone tensors loaded"
                     + (f", {len(report.missing)} new ({', '.join(report.missing[:4])}"
                        f"{', ...' if len(report.missing) > 4 else ''})" if report.missing else ""))
        if cfg.class_weight is not None:
            self.model.set_class_weight(self._class_weight())
        self.model.to(self.env.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

        per_rank = len(self.data.train) // self.env.world_size
        self.batches_per_epoch = per_rank // cfg.batch_size // cfg.accum_steps * cfg.accum_steps
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.data.train)} training images are fewer than one step of batch_size "
                             f"{cfg.batch_size} x {cfg.accum_steps} accumulation x {self.env.world_size} processes; "
                             "lower --batch-size or use more data")
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.steps_per_epoch)
        use_scaler = cfg.amp and self.env.device.type == "cuda"  # bf16 on CPU has fp32's range: no scaling
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=use_scaler)
        self.epoch, self.step, self.batch_in_epoch, self.history = 0, 0, 0, []
        self.epoch_totals = torch.zeros(3, dtype=torch.float64)  # loss * images, images, seconds (this epoch)
        if checkpoint is not None:
            self._load_state(checkpoint, resume)
        self.ddp_model = self.model
        if self.env.distributed:
            if self.env.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None)
        seed_everything(cfg.seed + self.env.rank)  # per-rank streams for dropout, drop path, augmentation
        if checkpoint is not None:
            try:
                set_rng_state(checkpoint["rng"], self.env)
            except (RuntimeError, TypeError, IndexError, KeyError) as err:
                raise _damaged(resume, f"its random generator state does not load ({err})") from None
        self._signal_received = 0      # the number of the signal (Ctrl-C, SIGTERM) this rank received
        self._stopping = False         # agreed by all ranks: stop after this optimiser step
        self.stop_signal = None        # set when a signal stopped fit() before its last epoch

    # -- pieces -------------------------------------------------------------------------------------

    def _class_weight(self) -> list[float]:
        """--class-weight as numbers: given, or 'balanced' from the training masks' pixel counts."""
        from .segmentation import balanced_class_weights, class_pixel_counts
        if self.cfg.class_weight == "balanced":
            counts = class_pixel_counts(self.data.train, self.cfg.num_classes)
            weights = balanced_class_weights(counts).tolist()
            share = ", ".join(f"{c / counts.sum():.1%}" for c in counts.tolist())
            self.log(f"class_weight balanced: pixel shares {share} -> weights "
                     f"{', '.join(f'{w:.2f}' for w in weights)}")
            return weights
        weights = _parse_class_weight(self.cfg.class_weight)
        if len(weights) != self.cfg.num_classes:
            raise ValueError(f"--class-weight gives {len(weights)} weights for {self.cfg.num_classes} classes")
        return weights

    def autocast(self):
        return _autocast(self.env.device, self.cfg.amp)

    def _train_batches(self) -> DataLoader:
        """This rank's batches of the current epoch, minus the ones a resumed run already trained on.

        The permutation depends only on (seed, epoch): rank r of N takes every N-th index, so the N
        batches of one step together are the batch one process of N times the size would take.
        """
        sampler = DistributedSampler(self.data.train, self.env.world_size, self.env.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        batches = list(BatchSampler(sampler, self.cfg.batch_size, drop_last=True))
        batches = batches[self.batch_in_epoch:self.batches_per_epoch]
        return _loader(self.data.train, batches, self.task.collate_fn, self.cfg.workers,
                       self.cfg.seed * 100_003 + self.epoch, self.env.device)

    def evaluate(self) -> dict:
        """One pass over the validation set, reduced over ranks (see :func:`evaluate`)."""
        return evaluate(self.model, self.cfg, self.data, self.env)

    # -- training -----------------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train from the current epoch to ``epochs`` (or ``stop_at_epoch``); returns the metrics history.

        Ctrl-C (SIGINT) or SIGTERM: finish the current optimiser step, save, return with ``stop_signal`` set (a
        second Ctrl-C aborts at once). A training sample that cannot be read stops the same way, then raises
        :class:`DataError`. A nan/inf loss raises :class:`NonFiniteLossError` before the bad update, without
        touching the checkpoint on disk.
        """
        last = self.cfg.stop_at_epoch or self.cfg.epochs
        if self.epoch >= last:
            self.log(f"nothing to do: the checkpoint already finished epoch {self.epoch} of {last}")
            return self.history
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_folder_lock(self.run_dir) if self.env.is_main else contextlib.nullcontext()  # one writer
        with lock, self._graceful_stop():
            while self.epoch < last:
                try:
                    self._train_epoch()
                except DataError as err:
                    raise self._stopped_by_data_error(err) from None
                if self.batch_in_epoch < self.batches_per_epoch:  # stopped mid-epoch
                    self.stop_signal = self._signal_received or signal.SIGTERM  # or another rank's signal
                    self.save()
                    self.log(f"stopped in epoch {self.epoch + 1} after {self.batch_in_epoch} of "
                             f"{self.batches_per_epoch} batches; saved {self.checkpoint_path}. "
                             f"Continue with: --resume {self.checkpoint_path}")
                    break
                self._end_epoch()
                if self._stopping and self.epoch < last:
                    self.stop_signal = self._signal_received or signal.SIGTERM
                    self.log(f"stopped after epoch {self.epoch}; continue with: --resume {self.checkpoint_path}")
                    break
        return self.history

    def _end_epoch(self) -> None:
        loss_sum, images, seconds = self.epoch_totals.tolist()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.epoch_totals.zero_()
        record = {"epoch": self.epoch, "step": self.step, "lr": self._lr(), "train_loss": loss_sum / max(images, 1),
                  "train_img_per_s": images / max(seconds, 1e-9), "train_time_s": seconds}
        if self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs:
            start = time.perf_counter()
            try:
                record.update(self.evaluate())
            except DataError as err:
                raise self._unevaluated_epoch_saved(record, err) from None
            record["eval_time_s"] = time.perf_counter() - start
            if "val_loss" in record and not math.isfinite(record["val_loss"]):
                raise NonFiniteLossError(self._non_finite_weights_message(f"the validation loss became "
                                                                          f"{record['val_loss']}"))
        self.history.append(record)
        self.save()
        self._write_metrics()
        self.log(_format_record(record, self.cfg.epochs))

    def _unevaluated_epoch_saved(self, record: dict, err: DataError) -> DataError:
        """A validation image could not be read: keep the trained epoch (saved without validation metrics) rather than
        lose it; with several processes the others wait in a collective, so nothing is saved."""
        if self.env.distributed:
            return DataError(f"{err}; stopped without saving, {self._checkpoint_on_disk()}")
        self.history.append(record)
        self.save()
        self._write_metrics()
        return DataError(f"{err}. Saved epoch {self.epoch} without its validation in {self.checkpoint_path}; once the "
                         f"file is replaced by a readable one, continue with --resume {self.checkpoint_path}")

    def _train_epoch(self) -> None:
        cfg, env = self.cfg, self.env
        self.model.train()
        loader = self._train_batches()
        bar = _progress((self.batches_per_epoch - self.batch_in_epoch) // cfg.accum_steps,
                        f"epoch {self.epoch + 1}/{cfg.epochs}", env)
        start, micro = time.perf_counter(), 0
        self._remember_step()
        try:
            for batch in _loaded(loader):
                batch = self.task.prepare(batch, env.device, cfg.channels_last)
                boundary = (micro + 1) % cfg.accum_steps == 0
                sync = contextlib.nullcontext() if boundary or not env.distributed else self.ddp_model.no_sync()
                with sync:
                    with self.autocast():
                        loss = self.task.loss(self.ddp_model, batch)
                    # One reduction per micro-batch carries the loss for the log, the nan check and Ctrl-C,
                    # so every rank takes the same decision at the same step.
                    n = self.task.batch_size(batch)
                    reduced = _all_reduce_sum(torch.tensor([loss.item() * n, n, float(self._signal_received)],
                                                           dtype=torch.float64), env)
                    if not math.isfinite(reduced[0].item()):
                        raise NonFiniteLossError(self._non_finite_message(reduced[0].item() / reduced[1].item()))
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                micro += 1
                self.epoch_totals[:2] += reduced[:2]
                if boundary:
                    self._optimizer_step()
                    self._remember_step()
                    self.epoch_totals[2] += time.perf_counter() - start
                    start = time.perf_counter()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self._lr():.2e}",
                                    img_s=f"{self.epoch_totals[1].item() / self.epoch_totals[2].item():.1f}")
                    if reduced[2] > 0:
                        self._stopping = True
                        break
        finally:
            bar.close()

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.batch_in_epoch += self.cfg.accum_steps

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _remember_step(self) -> None:
        """What the last optimiser step left (generator state, epoch totals): a save after a data error goes back to
        it, as if the run had stopped there (micro-batches after it drew random numbers and added to the totals)."""
        generators = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            generators["cuda"] = torch.cuda.get_rng_state(self.env.device)
        self._at_last_step = generators, self.epoch_totals.clone()

    def _stopped_by_data_error(self, err: DataError) -> DataError:
        """Stop as Ctrl-C does: save the state after the last optimiser step and say how to continue. With several
        processes the others wait in a collective and cannot join a save: the error ends the run (torchrun stops
        the other processes) and the checkpoint on disk is left as it was."""
        if self.env.distributed:
            return DataError(f"{err}; stopped without saving, {self._checkpoint_on_disk()}")
        generators, self.epoch_totals = self._at_last_step
        torch.set_rng_state(generators["cpu"])
        if "cuda" in generators:
            torch.cuda.set_rng_state(generators["cuda"], self.env.device)
        self.save()
        return DataError(f"{err}. Saved epoch {self.epoch + 1}'s progress ({self.batch_in_epoch} of "
                         f"{self.batches_per_epoch} batches) in {self.checkpoint_path}; once the file is replaced by a "
                         f"readable one, continue with --resume {self.checkpoint_path}")

    def _non_finite_message(self, value: float) -> str:
        return (f"the training loss became {value} in epoch {self.epoch + 1} (step {self.step + 1}); stopped before "
                f"updating the weights; {self._checkpoint_on_disk()}. {self._advice()}")

    def _non_finite_weights_message(self, what: str) -> str:
        return (f"{what} after step {self.step} (epoch {self.epoch}); stopped without saving a checkpoint; "
                f"{self._checkpoint_on_disk()}. {self._advice()}")

    def _checkpoint_on_disk(self) -> str:
        """Only a checkpoint whose weights this run checked (written or resumed from) is called good."""
        if self._verified_epoch is not None:
            return f"the last good checkpoint {self.checkpoint_path} (epoch {self._verified_epoch}) is unchanged"
        if self.checkpoint_path.exists():
            return f"{self.checkpoint_path}, from an earlier run and not checked by this one, is unchanged"
        return "no checkpoint had been written yet"

    def _advice(self) -> str:
        return (f"Try a lower --lr (now {self.cfg.lr:g}), gradient clipping (--clip-grad 1), or training "
                "without --amp.")

    @contextlib.contextmanager
    def _graceful_stop(self):
        """SIGINT/SIGTERM set a flag the loop checks after each optimiser step; a second Ctrl-C aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._signal_received = signum
            self.log("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort at once)",
                     file=sys.stderr)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- checkpoints and logs -----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict:
        """Everything to continue exactly: tensors and plain containers only (read with weights_only=True)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.env),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "epoch_totals": self.epoch_totals.clone(),
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "classes": list(self.data.classes),
            "category_ids": self.data.category_ids,
            "metrics": self.history,
        }

    def save(self) -> None:
        """Atomic write by rank 0 (every rank takes part in gathering the generator states), of finite weights
        only: nan/inf weights raise :class:`NonFiniteLossError` and leave the file on disk as it was."""
        state = self.state_dict()
        broken = non_finite_keys(state["model"])
        if broken:
            raise NonFiniteLossError(self._non_finite_weights_message(
                f"the weights became nan/inf ({len(broken)} tensors, e.g. {', '.join(broken[:3])})"))
        if self.env.is_main:
            try:
                save_checkpoint(state, self.checkpoint_path)
            except WriteError as err:
                again = (f"continue with --resume {self.checkpoint_path}" if self._verified_epoch is not None
                         else "train again")
                raise WriteError(err.errno, f"{err}; training stopped: once there is room, {again}",
                                 err.filename) from None
        self._verified_epoch = self.epoch

    def _load_state(self, checkpoint: dict, path) -> None:
        if checkpoint["world_size"] != self.env.world_size:
            raise CheckpointError(f"the checkpoint was written by {checkpoint['world_size']} process(es) and this run "
                                  f"has {self.env.world_size}; resume with the same number (the data order and "
                                  "random streams are per process)")
        _check_weights(self.model, checkpoint, self.cfg, path)
        if checkpoint["epoch"] > self.cfg.epochs or not (0 <= checkpoint["batch_in_epoch"] < self.batches_per_epoch
                                                         and checkpoint["batch_in_epoch"] % self.cfg.accum_steps == 0):
            raise _damaged(path, f"its position (epoch {checkpoint['epoch']}, batch {checkpoint['batch_in_epoch']}) "
                                 f"does not fit {self.cfg.epochs} epochs of {self.batches_per_epoch} batches")
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            for group in self.optimizer.param_groups:  # load_state_dict casts the moments but never checks shapes
                for param in group["params"]:
                    for name, value in self.optimizer.state.get(param, {}).items():
                        if value.ndim > 0 and value.shape != param.shape:
                            raise ValueError(f"AdamW {name} of shape {tuple(value.shape)} for a parameter of shape "
                                             f"{tuple(param.shape)}")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise _damaged(path, f"its optimiser or schedule state does not fit the model "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.batch_in_epoch, self.history = checkpoint["batch_in_epoch"], list(checkpoint["metrics"])
        self.epoch_totals = checkpoint["epoch_totals"].clone()
        self._verified_epoch = self.epoch

    def _write_metrics(self) -> None:
        """metrics.jsonl, one line per epoch (rewritten from the history, so a resumed run stays consistent),
        and curves.png."""
        if not self.env.is_main:
            return
        text = "".join(strict_json(record) + "\n" for record in self.history)
        with atomic_write(self.run_dir / "metrics.jsonl", "w") as f:
            f.write(text)
        from .viz import plot_curves
        curves = [{k: v for k, v in r.items() if k in ("epoch", "train_loss", "val_loss", "lr") or k in _CURVE_METRICS}
                  for r in self.history]
        plot_curves(curves, self.run_dir / "curves.png")


_CURVE_METRICS = ("top1", "top5", "AP", "AP50", "mIoU", "aAcc")


def _format_record(record: dict, epochs: int) -> str:
    """One log line per epoch (the same numbers as metrics.jsonl)."""
    parts = [f"{k} {record[k]:.4f}" for k in ("train_loss", "val_loss") + _CURVE_METRICS if k in record]
    return (f"epoch {record['epoch']}/{epochs}: " + ", ".join(parts) + f", lr {record['lr']:.2e}, "
            f"{record['train_img_per_s']:.1f} img/s, {record['train_time_s']:.1f}s")


def strict_json(obj, **kwargs) -> str:
    """``json.dumps`` that strict parsers accept: nan and inf (e.g. a diverged loss) become null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def prepare_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (a folder for outputs) now, or raise ValueError saying why it cannot be used."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--{flag} {str(path)!r} is a file, not a folder; choose another path") from None
    except NotADirectoryError:
        raise ValueError(f"--{flag} {str(path)!r}: a part of the path is a file, not a folder; "
                         "choose another path") from None
    except OSError as err:
        raise ValueError(f"--{flag} {str(path)!r}: cannot create the folder ({err.strerror}); "
                         "choose a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} {str(path)!r}: the folder is not writable; choose a folder you can write to")
    return path


LOCK_NAME = ".train.lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: Path):
    """Hold an exclusive lock on a run folder while the block runs: ``RUN/.train.lock``, flock-ed, holding our
    process id. A second run into the folder gets a ValueError naming the process that writes there, not a
    silent race in which the last to finish wins. The kernel drops a flock when its process dies, so the lock
    file of a killed run does not block the next one. Without ``fcntl`` (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{run_dir} is in use by another training run (process {holder}, lock file {path}): "
                             "wait for it to end or stop it, or choose another --output") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so a process that opened this file retries on a new one
        os.close(fd)


_RESUME_STATE = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "epoch": int,
                 "step": int, "batch_in_epoch": int, "epoch_totals": Tensor, "world_size": int, "metrics": list}


def _damaged(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged or inconsistent: {what}. Use another checkpoint of the run (or "
                           "train again); a file edited by hand cannot be trusted.")


def _read_engine_checkpoint(path: str | os.PathLike, resume: bool = False) -> dict:
    """A Trainer checkpoint, or an error that says what the file is and what to do.

    Checks what evaluate/predict need (a valid config, a classes list) and, with ``resume``, that the training
    state is all there; the weights are checked against the model by :func:`_check_weights`.
    """
    checkpoint = load_checkpoint(path)  # FileNotFoundError / CheckpointError with the reason
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by 'asmlp-min train' (no {CHECKPOINT_FORMAT!r} tag): "
                              "--resume, evaluate and predict need the checkpoint.pt of a training run. To start "
                              "from official or other backbone weights, use train --pretrained PATH.")
    if not isinstance(checkpoint.get("config"), dict):
        raise _damaged(path, f"its 'config' should be a dict of settings, got "
                             f"{type(checkpoint.get('config')).__name__ if 'config' in checkpoint else 'none'}")
    cfg = _saved_config(checkpoint, path)
    classes = checkpoint.get("classes")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == cfg.num_classes):
        raise _damaged(path, f"its 'classes' should be a list of {cfg.num_classes} names, got {classes!r:.200}")
    ids = checkpoint.get("category_ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(set(ids)) == cfg.num_classes
                                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids)):
        raise _damaged(path, f"its 'category_ids' should be None or {cfg.num_classes} distinct COCO category ids "
                             f">= 1, got {ids!r:.200}")
    wanted = dict(_RESUME_STATE) if resume else {"model": dict}
    wrong = [f"'{k}' (expected {kind.__name__}, got {type(checkpoint[k]).__name__})" if k in checkpoint
             else f"'{k}' (missing)" for k, kind in wanted.items()
             if not (isinstance(checkpoint.get(k), kind) and not isinstance(checkpoint.get(k), bool))]
    if wrong:
        raise _damaged(path, "wrong or missing entries " + ", ".join(wrong))
    if resume and not (isinstance(checkpoint["rng"].get("cpu"), Tensor) and checkpoint["epoch_totals"].shape == (3,)
                       and min(checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"]) >= 0):
        raise _damaged(path, "its training position, generator state or epoch totals are malformed")
    return checkpoint


def _saved_config(checkpoint: dict, path) -> TrainConfig:
    """The checkpoint's TrainConfig, resolved, or a CheckpointError saying which value is wrong."""
    try:
        cfg = TrainConfig.from_dict(checkpoint["config"]).resolved()
    except (TypeError, ValueError) as err:
        raise _damaged(path, f"its config is invalid: {err}") from None
    if not (isinstance(cfg.num_classes, int) and cfg.num_classes >= 1):
        raise _damaged(path, f"its config has num_classes {cfg.num_classes!r}; a trained model has at least one")
    return cfg


def _model_for(checkpoint: dict, cfg: TrainConfig, path) -> nn.Module:
    """The model the checkpoint's config describes, with the checkpoint's (checked) weights."""
    try:
        model = build_model(cfg.task, cfg.model, cfg.num_classes, cfg.head_channels, None, cfg.image_size,
                            **cfg.backbone_kwargs())
    except (TypeError, ValueError) as err:
        raise _damaged(path, f"its config does not describe a model that can be built ({err})") from None
    _check_weights(model, checkpoint, cfg, path)
    model.load_state_dict(checkpoint["model"])
    return model


def _check_weights(model: nn.Module, checkpoint: dict, cfg: TrainConfig, path) -> None:
    """Same keys and shapes as ``model``, and finite, or a CheckpointError listing what differs."""
    saved, target = checkpoint["model"], model.state_dict()
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in saved.items()):
        raise _damaged(path, "its 'model' entry is not a state dict (parameter names -> tensors)")
    report = compare_state_dicts(saved, target)
    if not report.ok:
        raise _damaged(path, f"its weights do not match the {cfg.task} {cfg.model} model its config describes "
                             f"(embed_dim {cfg.embed_dim}, depths {cfg.depths}): " + str(report).replace("\n", "; "))
    broken = non_finite_keys(saved)
    if broken:
        raise _damaged(path, f"{len(broken)} weight tensor(s) hold NaN or inf ({shown_keys(broken, 6)}): the run "
                             "diverged before this file was written")


def _check_classes(checkpoint: dict, classes: list[str], path) -> None:
    """The data must have the checkpoint's class names in its order: a label index means one class."""
    saved = list(checkpoint["classes"])
    if saved == list(classes):
        return
    only_saved = [c for c in saved if c not in classes]
    only_data = [c for c in classes if c not in saved]
    if only_saved or only_data:
        what = (f"only in the checkpoint: {', '.join(only_saved) or 'none'}; only in the data: "
                f"{', '.join(only_data) or 'none'}")
    else:
        what = "the same names in another order: " + ", ".join(
            f"label {i} is {a!r} in the checkpoint, {b!r} in the data" for i, (a, b) in enumerate(zip(saved, classes))
            if a != b)
    raise ValueError(f"the data's classes differ from the {len(saved)} classes {path} was trained on ({what}); "
                     "use data with the same class folders")


def _check_label_set(checkpoint: dict, data: TaskData, path) -> None:
    """Label k must be the same class in the checkpoint and the data (evaluate, resume): as many classes, with the
    same names (COCO category ids may differ: each side maps its own to labels 1..K)."""
    saved = checkpoint["classes"]
    if len(saved) != data.num_classes:
        legacy = ("; it was written before COCO category ids were numbered 1..K, when the detector had one class "
                  "per id up to the largest: train again on this data"
                  if checkpoint["config"]["task"] == "det" and "category_ids" not in checkpoint else "")
        raise ValueError(f"{path} predicts {len(saved)} classes but the data has {data.num_classes}{legacy}; use "
                         "data of the same label set")
    _check_classes(checkpoint, data.classes, path)


def _check_compatible(checkpoint: dict, cfg: TrainConfig, path) -> None:
    saved = TrainConfig.from_dict(checkpoint["config"])
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r}, now {getattr(cfg, k)!r}"
             for k in _RESUME_MUST_MATCH if getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with different settings:\n  "
                              + "\n  ".join(diffs) + "\nPass the same values (or start a new run without --resume).")
    if saved.epochs != cfg.epochs:
        raise CheckpointError(f"cannot resume from {path}: it was scheduled for {saved.epochs} epochs, now "
                              f"{cfg.epochs}; the lr schedule depends on it. Use --epochs {saved.epochs} "
                              "(or --stop-at-epoch to end a run early and resume later).")
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (the checkpoint's: {getattr(saved, k)})"
               for k in _RESUME_SCHEDULE if getattr(saved, k) != getattr(cfg, k)]
    if changed:
        raise CheckpointError(f"cannot resume from {path} with {', '.join(changed)}: a resumed run continues the "
                              "checkpoint's learning-rate schedule and optimiser state exactly. Leave the flag out, "
                              f"or start a new run with a new schedule from these weights: --pretrained {path} "
                              "(loads the backbone).")
