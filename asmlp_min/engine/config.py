"""The settings of a training run: every setting declared once, with its type, default and help.

``TrainConfig``'s fields are the ``train`` command's flags (``cli.py`` generates them: name -> ``--kebab-name``,
type, help, and the default this task and variant really get), so the help cannot drift from the code.

The recipes are the official ones (the configs of svip-lab/AS-MLP and its mmdet and mmseg forks): AdamW without
weight decay on norms (nor, for ImageNet, on biases); linear warm-up then cosine (ImageNet), poly (ADE20K) or steps
at 8/12 and 11/12 of training (COCO 1x); gradient clipping at 5 for classification. Learning rates default to values
that train the small models on the built-in shapes data from scratch; the paper's values are in the help.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

from ..backbone import MODEL_CONFIGS, model_config

TASKS = ("cls", "det", "seg")
SCHEDULES = ("cosine", "poly", "step")
AUGMENTATIONS = ("auto", "paper", "light", "none")
TASK_HELP = "cls (classification), det (detection) or seg (semantic segmentation)"
PATCH_SIZE = 4  # the backbone's patch embedding (4x4 patches, as in every AS-MLP variant)

# Per-task recipe (the official configs). lr and the input sizes are tuned for shapes from scratch;
# the paper uses 1e-3 @ batch 1024 (cls), 1e-4 @ 16 (det, from ImageNet weights), 6e-5 @ 16 (seg).
TASK_DEFAULTS = {
    "cls": dict(lr=1e-3, weight_decay=0.05, clip_grad=5.0, schedule="cosine", warmup_ratio=1e-3, min_lr_ratio=0.01,
                image_size=64, main_metric="top1"),
    "det": dict(lr=1e-3, weight_decay=0.05, clip_grad=0.0, schedule="step", warmup_ratio=1e-3, min_lr_ratio=0.0,
                min_size=128, main_metric="AP"),
    "seg": dict(lr=1e-3, weight_decay=0.01, clip_grad=0.0, schedule="poly", warmup_ratio=1e-6, min_lr_ratio=0.0,
                crop_size=128, main_metric="mIoU"),
}
# The paper's input sizes (Sec. 8, 11), the defaults on a dataset folder: ImageNet crops 224 (eval: resize 256,
# centre crop), COCO short side 800 (long side <= 1333, DET_MAX_SIZE_RATIO), ADE20K training crops 512.
FOLDER_IMAGE_SIZE = {"cls": 224, "det": 800, "seg": 512}
DET_MAX_SIZE_RATIO = 1333 / 800
# Each task's input size has its own name (torchvision's min_size/max_size for detection).
SIZE_FIELD = {"cls": "image_size", "det": "min_size", "seg": "crop_size"}
SIZE_FIELDS = ("image_size", "min_size", "max_size", "crop_size")
BACKBONE_FIELDS = {"embed_dim": "embed_dim", "depths": "depths", "shift_size": "shift_size",
                   "drop_path": "drop_path_rate"}  # TrainConfig name -> the variant's name
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def setting(default, help: str, **meta):  # noqa: A002 (argparse's word)
    """A TrainConfig field with its help text. ``meta``: ``group`` (help section), ``choices``, ``tasks`` (the
    tasks it applies to; the others must leave it at its default), ``interval`` ('[a, b)' style; values outside are
    refused), ``why`` (said on refusal), ``shown`` (the default as the help states it, where it is not a value)."""
    return field(default=default, metadata={"help": help, **meta})


# the help's sections
_DATA, _SPEED, _RUN = "data and model", "speed", "run folder, checkpoints and resuming"
_OPT = "optimisation (AdamW, no weight decay on norms; for cls, nor on biases)"


def _per_task(values: dict) -> str:
    return ", ".join(f"{task} {value}" for task, value in values.items())


GROUP_HELP = {_DATA: "Each task names its input size: "
              + _per_task({t: "--" + name.replace("_", "-") for t, name in SIZE_FIELD.items()})
              + " (det also --max-size). Defaults: "
              + _per_task({t: d[SIZE_FIELD[t]] for t, d in TASK_DEFAULTS.items()})
              + f" on shapes; {_per_task(FOLDER_IMAGE_SIZE)} on a folder, as in the paper."}
_PATCHES = f"the model cuts the image into {PATCH_SIZE}x{PATCH_SIZE} patches, and a smaller image has none"


@dataclass
class TrainConfig:
    """Everything a run depends on; stored as a plain dict in the checkpoint so evaluate/predict rebuild it.

    ``None`` means "the task's default" (``TASK_DEFAULTS``, the model registry); :meth:`resolved` fills them.
    ``batch_size`` is per process: the global batch is ``batch_size * world_size * accum_steps``.
    """

    task: str = setting("cls", TASK_HELP, choices=TASKS, shown="cls, or the --resume checkpoint's task")
    model: str = setting("asmlp_tiny", "backbone variant", group=_DATA, choices=tuple(sorted(MODEL_CONFIGS)))
    data: str = setting("shapes", "'shapes' (built-in synthetic scenes, generated once per run and kept in memory; "
                        "cls: one whole 16-40 px shape on flat grey per 64-px scene, det/seg: 1-4 shapes, cut or "
                        "covered, on a textured 128-px background) or a folder: cls PATH/{train,val}/<class>/<images> "
                        "(ImageNet layout), det COCO PATH/annotations/instances_{train,val}[2017].json + "
                        "PATH/{train,val}[2017]/, seg ADE20K PATH/{images,annotations}/{training,validation}",
                        group=_DATA, shown="shapes")
    epochs: int = setting(10, "length of the schedule", group=_OPT, interval="[1, inf)")
    batch_size: int = setting(32, "images per process and step; global batch = batch-size x processes x "
                              "accum-steps", group=_OPT, interval="[1, inf)")
    lr: float | None = setting(None, "peak learning rate (paper: cls 1e-3 at batch 1024, det 1e-4 and seg 6e-5 at "
                               "batch 16 from ImageNet weights)", group=_OPT, interval="[0, inf)")
    weight_decay: float | None = setting(None, "AdamW weight decay", group=_OPT, interval="[0, inf)")
    warmup_epochs: float = setting(1.0, "linear warm-up length in epochs", group=_OPT, interval="[0, inf)")
    warmup_ratio: float | None = setting(None, "lr factor the warm-up starts from", group=_OPT, interval="(0, 1]")
    min_lr_ratio: float | None = setting(None, "cosine/poly: lr factor at the end of the schedule", group=_OPT,
                                         interval="[0, 1]")
    schedule: str | None = setting(None, "per-iteration lr schedule after warm-up", group=_OPT, choices=SCHEDULES)
    clip_grad: float | None = setting(None, "max gradient norm, 0 = off", group=_OPT, interval="[0, inf)")
    drop_path: float | None = setting(None, "stochastic depth rate", group=_DATA, interval="[0, 1)")
    label_smoothing: float = setting(0.1, "cls: label smoothing", group=_OPT, tasks=("cls",), interval="[0, 1)")
    class_weight: str | None = setting(None, "seg: per-class loss weights, 'balanced' (sqrt(n_max / n_c) from the "
                                       "training masks' pixel counts) or one number per class, e.g. 1,4.8,4.2,6.1",
                                       group=_OPT, tasks=("seg",), shown="none, plain cross-entropy as in the paper")
    mixup: float = setting(0.0, "cls: mixup alpha, 0 = off (paper: 0.8)", group=_OPT, tasks=("cls",),
                           interval="[0, inf)")
    cutmix: float = setting(0.0, "cls: cutmix alpha, 0 = off (paper: 1.0)", group=_OPT, tasks=("cls",),
                            interval="[0, inf)")
    amp: bool = setting(False, "mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA (on a CPU "
                        "without bfloat16 units, AVX512-BF16 or AMX, it is many times slower)", group=_SPEED)
    channels_last: bool = setting(False, "NHWC memory format for model and images (the CPU model computes in NHWC "
                                  "anyway; on CUDA it is slower for AS-MLP: benchmarks/README.md)", group=_SPEED)
    accum_steps: int = setting(1, "micro-batches per optimiser step (gradient accumulation)", group=_OPT,
                               interval="[1, inf)")
    seed: int = setting(0, "seed of weights, data order and augmentation", group=_OPT)
    image_size: int | None = setting(None, "cls: the square input size in pixels (the paper's crop)", group=_DATA,
                                     tasks=("cls",), interval=f"[{PATCH_SIZE}, inf)", why=_PATCHES)
    min_size: int | None = setting(None, "det: the short side in pixels the detector resizes every image to, in "
                                   "training and evaluation", group=_DATA, tasks=("det",), interval="[32, inf)",
                                   why="the detector's coarsest level has a stride of 32")
    max_size: int | None = setting(None, "det: the longest side the detector resizes an image to", group=_DATA,
                                   tasks=("det",), interval="[32, inf)", shown="min-size x 1333/800, as COCO's 1333")
    crop_size: int | None = setting(None, "seg: the square training crop in pixels", group=_DATA, tasks=("seg",),
                                    interval=f"[{PATCH_SIZE}, inf)", why=_PATCHES)
    train_size: int = setting(2000, "shapes only: number of training scenes", group=_DATA, interval="[1, inf)")
    val_size: int = setting(400, "shapes only: number of validation scenes", group=_DATA, interval="[1, inf)")
    augment: str = setting("auto", "'paper': the paper's pipelines (cls random resized crop + flip, without its "
                           "RandAugment and random erasing; det flip; seg rescale + crop); 'light': resize + flip; "
                           "'none': no randomness", group=_DATA, choices=AUGMENTATIONS,
                           shown="auto: light on shapes, paper on folders")
    workers: int = setting(0, "DataLoader worker processes (0: load in the main process)", group=_SPEED,
                           interval="[0, inf)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda or cuda:N", group=_SPEED)
    embed_dim: int | None = setting(None, "the variant's channel width C (small models: 16-48)", group=_DATA,
                                    interval="[1, inf)")
    depths: tuple[int, ...] | None = setting(None, "blocks per stage, e.g. 1,1,2,1", group=_DATA)
    shift_size: int | None = setting(None, "the axial shift size (odd)", group=_DATA, interval="[1, inf)")
    head_channels: int | None = setting(None, "FPN channels (det, paper 256) or UperNet channels (seg, paper 512; "
                                        "aux head half)", group=_DATA, tasks=("det", "seg"), interval="[1, inf)",
                                        shown="det 256, seg 512")
    pretrained: str | None = setting(None, "backbone weights to start from: official .pth, mmdet/mmseg or our "
                                     "checkpoint", group=_DATA, shown="none, from scratch")
    num_classes: int | None = setting(None, "classes (required for a segmentation folder that is not ADE20K)",
                                      group=_DATA, interval="[1, inf)", shown="from the data")
    eval_every: int = setting(1, "evaluate every N epochs and after the last", group=_RUN, interval="[1, inf)")
    output: str = setting("runs/train", "run folder for checkpoint.pt, metrics.jsonl, curves.png", group=_RUN,
                          shown="runs/<task>, or the --resume checkpoint's folder")
    stop_at_epoch: int | None = setting(None, "end this run after that epoch although the schedule spans --epochs "
                                        "(for time-limited jobs; continue with --resume)", group=_RUN,
                                        interval="[1, inf)", shown="none")

    def resolved(self) -> TrainConfig:
        """A copy with task defaults filled in and a data folder as an absolute path, after checking every value
        (ValueError saying what to fix)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        model_config(self.model)  # an unknown variant: ValueError naming the known ones
        cfg = dataclasses.replace(self, **self._defaults())
        if cfg.data != "shapes":  # the checkpoint stores it: evaluate and --resume may run in another folder
            cfg.data = os.path.abspath(cfg.data)
        for f in dataclasses.fields(cfg):
            value, meta = getattr(cfg, f.name), f.metadata
            if value != f.default and cfg.task not in meta.get("tasks", TASKS):  # set, though it does nothing
                fix = (f"{cfg.task} sets its input size with --{_flag(SIZE_FIELD[cfg.task])}" if f.name in SIZE_FIELDS
                       else f"leave it out for {cfg.task}")
                raise ValueError(f"{cfg.task}: {f.name} (--{_flag(f.name)}) applies to {'/'.join(meta['tasks'])} "
                                 f"only; {fix}")
            if value is not None and "interval" in meta and not _within(value, meta["interval"]):
                raise ValueError(f"{cfg.task}: {f.name} must be {_interval_text(value, meta['interval'])}, got "
                                 f"{value}" + (f": {meta['why']}" if "why" in meta else ""))
            if value is not None and value not in meta.get("choices", (value,)):
                raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        if not _DEVICE.fullmatch(cfg.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {cfg.device!r}")
        if cfg.class_weight not in (None, "balanced"):
            _parse_class_weight(cfg.class_weight)
        if cfg.stop_at_epoch is not None and cfg.stop_at_epoch > cfg.epochs:
            raise ValueError(f"stop_at_epoch must be in [1, epochs={cfg.epochs}], got {cfg.stop_at_epoch}")
        if cfg.warmup_epochs > cfg.epochs:
            raise ValueError(f"warmup_epochs must be at most epochs={cfg.epochs}, got {cfg.warmup_epochs}: the lr "
                             "would still be warming up when training ends, never reaching --lr")
        return cfg

    def _defaults(self) -> dict:
        """The values that ``None`` / ``'auto'`` stand for in this task, on this data."""
        task_defaults = TASK_DEFAULTS[self.task]
        filled = {k: v for k, v in task_defaults.items() if hasattr(self, k) and getattr(self, k) is None}
        size = SIZE_FIELD[self.task]
        if self.data != "shapes" and getattr(self, size) is None:  # the paper's sizes for real data
            filled[size] = FOLDER_IMAGE_SIZE[self.task]
        if self.task == "det" and self.max_size is None:
            filled["max_size"] = round(filled.get("min_size", self.min_size) * DET_MAX_SIZE_RATIO)
        if self.augment == "auto":  # the paper's crops on real data; flips only on the small shapes scenes
            filled["augment"] = "light" if self.data == "shapes" else "paper"
        if self.depths is not None:
            filled["depths"] = tuple(int(d) for d in self.depths)
        return filled

    def backbone_kwargs(self) -> dict:
        """Overrides of the registered variant (only those given), e.g. a small model for the demo."""
        return {name: getattr(self, key) for key, name in BACKBONE_FIELDS.items() if getattr(self, key) is not None}

    def model_kwargs(self) -> dict:
        """The arguments of ``build_model`` that this config describes."""
        return dict(task=self.task, model=self.model, num_classes=self.num_classes, head_channels=self.head_channels,
                    pretrained=self.pretrained, min_size=self.min_size, max_size=self.max_size,
                    **self.backbone_kwargs())

    @property
    def architecture(self) -> str:
        """The variant and its width or depth where they are changed: ``asmlp_tiny (embed_dim 16, depths 1,1,1,1)``."""
        changed = [f"{key} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
                   for key in ("embed_dim", "depths") if (value := getattr(self, key)) is not None]
        return f"{self.model} ({', '.join(changed)})" if changed else self.model

    @property
    def input_size(self) -> int | None:
        """The size the transforms resize or crop to: cls ``image_size``, seg ``crop_size`` (det: the model's)."""
        return {"cls": self.image_size, "seg": self.crop_size}.get(self.task)

    def to_dict(self) -> dict:
        """Plain types only (tuples -> lists), so ``torch.load(weights_only=True)`` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; a value of the wrong type (``epochs: "ten"``) raises TypeError naming it.

        Configs saved before the sizes had their own names keep loading: det's ``image_size`` was the short side
        (now ``min_size``), seg's the training crop (now ``crop_size``).
        """
        values = dict(values)  # a dict: checked where it is read (runs._read_engine_checkpoint)
        if values.get("task") in ("det", "seg") and values.get("image_size") is not None:
            values.setdefault(SIZE_FIELD[values["task"]], values.pop("image_size"))
        fields, hints = {f.name: f.type for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
        wrong = [f"{k}: {v!r} (expected {fields[k]})" for k, v in values.items()
                 if k in fields and not _fits(v, hints[k])]
        if wrong:
            raise TypeError("config values of the wrong type: " + "; ".join(wrong))
        return cls(**{k: tuple(v) if k == "depths" and v is not None else v for k, v in values.items() if k in fields})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _fits(value, hint) -> bool:
    """Whether ``value`` fits a TrainConfig type such as ``float | None`` (ints count as floats, bools as neither)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, int) for v in value)
    kinds = (int, float) if hint is float else hint
    return isinstance(value, kinds) and (hint is bool or not isinstance(value, bool))


def _bounds(interval: str) -> tuple[str, float, float, str]:
    low, high = interval[1:-1].split(",")
    return interval[0], float(low), float(high), interval[-1]


def _within(value: float, interval: str) -> bool:
    """Whether ``value`` lies in an interval written '[0, 1)' (nan and inf lie in none)."""
    opening, low, high, closing = _bounds(interval)
    above = value > low if opening == "(" else value >= low
    below = value < high if closing == ")" else value <= high
    return math.isfinite(value) and above and below


def _interval_text(value: float, interval: str) -> str:
    if not math.isfinite(value):
        return "a finite number"
    opening, low, high, _ = _bounds(interval)
    return f">= {low:g}" if math.isinf(high) and opening == "[" else f"in {interval}"


def _parse_class_weight(text: str) -> list[float]:
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"class_weight must be 'balanced' or positive numbers separated by commas, one per class "
                         f"(e.g. 1,4.8,4.2,6.1), got {text!r}")
    return weights


def default_text(name: str, task: str | None = None, model: str = "asmlp_tiny") -> str:
    """The default of setting ``name`` as the help states it: for ``task`` (every task when None) and ``model``,
    on shapes and, where it differs, on a folder. Backbone settings show the variant's value for the task."""
    meta = next(f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name)
    tasks = [t for t in ([task] if task else TASKS) if t in meta.get("tasks", TASKS)]
    if not tasks or "shown" in meta:
        return meta.get("shown", "") if tasks else ""
    texts = {t: _task_default(name, t, model) for t in tasks}
    per_task = any(name in defaults for defaults in TASK_DEFAULTS.values()) or len(set(texts.values())) > 1
    text = texts[tasks[0]] if len(texts) == 1 or not per_task else _per_task(texts)
    return f"the variant's, {model}: {text}" if name in BACKBONE_FIELDS else text


def _task_default(name: str, task: str, model: str) -> str:
    if name in BACKBONE_FIELDS:
        from ..segmentation import variant_setting
        value = variant_setting(model, BACKBONE_FIELDS[name], task)
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    configs = (TrainConfig(task=task), TrainConfig(task=task, data="PATH"))
    on_shapes, on_folder = ({**dataclasses.asdict(cfg), **cfg._defaults()}[name] for cfg in configs)
    return str(on_shapes) if on_shapes == on_folder else f"{on_shapes} on shapes, {on_folder} on a folder"
