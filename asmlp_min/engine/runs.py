"""A run folder (created, locked against a second writer) and reading a run's ``checkpoint.pt`` back: every entry
checked once here, so evaluate, predict and ``--resume`` trust what they get."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

from torch import Tensor, nn

from ..checkpoint import CheckpointError, compare_state_dicts, load_checkpoint, non_finite_keys, shown_keys
from ..checks import is_int
from ..data import ade20k
from ..files import NO_ROOM, WriteError, atomic_write, not_written, remove_stale_temp_files, shell_word
from ..segmentation import variant_setting
from .config import BACKBONE_FIELDS, SIZE_FIELDS, TrainConfig
from .data import TaskData
from .tasks import build_model

CHECKPOINT_NAME = "checkpoint.pt"
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "curves.png")  # what a run writes into its folder
CHECKPOINT_FORMAT = "asmlp_min.engine/1"
_FORMAT_FAMILY = CHECKPOINT_FORMAT.rsplit("/", 1)[0] + "/"  # every version of our run checkpoints starts so

# Fields that must match for --resume: they define the model and the data order.
_RESUME_MUST_MATCH = ("task", "model", "embed_dim", "depths", "shift_size", "head_channels", "num_classes",
                      *SIZE_FIELDS, "seed", "batch_size", "accum_steps")
# ... and the recipe: the learning-rate schedule, which the checkpoint's optimiser and scheduler state continue
# (their saved lr and weight decay would silently win over new values), regularisation and augmentation, which would
# change midway while the saved config claimed them for the whole run.
# --pretrained too: the resumed weights win over it, yet the checkpoint would name it as the run's start.
_RESUME_RECIPE = ("lr", "weight_decay", "schedule", "warmup_epochs", "warmup_ratio", "min_lr_ratio", "drop_path",
                  "clip_grad", "label_smoothing", "mixup", "cutmix", "class_weight", "augment", "pretrained")


_CURVE_METRICS = ("top1", "top5", "AP", "AP50", "mIoU", "aAcc")


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per epoch (rewritten from the history, so a resumed run stays consistent), and
    curves.png of the losses and metrics. The learning rate stays in metrics.jsonl only: on the metrics' 0-1 axis
    its 1e-3 was a flat line at 0."""
    from ..viz import plot_curves
    with atomic_write(run_dir / "metrics.jsonl", "w") as f:
        f.write("".join(strict_json(record) + "\n" for record in history))
    curves = [{k: v for k, v in r.items() if k in ("epoch", "train_loss", "val_loss") or k in _CURVE_METRICS}
              for r in history]
    plot_curves(curves, run_dir / "curves.png")


def stopped_writing(err: OSError, path: Path, resume: Path | None) -> WriteError:
    """The error that ends a training whose run file ``path`` could not be written (disk full, an I/O error, a disk
    gone read-only): what failed, that the last checkpoint on disk is intact, and how to go on (``resume``: the
    checkpoint to continue from; None: train again)."""
    said = err if isinstance(err, WriteError) else not_written(err, Path(err.filename or path), started=True)
    fix = "there is room" if err.errno in NO_ROOM else "that is fixed"
    again = f"continue with --resume {shell_word(resume)}" if resume else "train again"
    return WriteError(err.errno, f"{said}; training stopped: once {fix}, {again}", err.filename or str(path))


def format_record(record: dict, epochs: int) -> str:
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


def prepare_output_folder(path: str | os.PathLike, flag: str, file: Path | None = None) -> Path:
    """Create ``path`` (a folder for outputs) now, or raise ValueError saying why it cannot be used; ``file``: the
    file the flag named, when ``path`` is its folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        problem = "is a file, not a folder"
    except NotADirectoryError:
        problem = "is unusable: a part of the path is a file, not a folder"
    except OSError as err:
        problem = f"is unusable: cannot create the folder ({err.strerror})"
    else:
        problem = _cannot_create_files_in(path)
    if problem:
        given = f"{str(file)!r} cannot be written: {str(path)!r}" if file is not None else repr(str(path))
        raise ValueError(f"--{flag} {given} {problem}; choose a folder you can write to")
    return path


def _cannot_create_files_in(folder: Path) -> str:
    """Why no file can be created in ``folder`` ('' if one can), found by creating and removing one: os.access says
    yes to root everywhere, even on a read-only mount or in /proc."""
    try:
        with tempfile.NamedTemporaryFile(prefix=".asmlp-min.", suffix=".probe", dir=folder):
            return ""
    except OSError as err:
        return f"is a folder you cannot write to ({err.strerror or err})"


@contextlib.contextmanager
def new_folders_removed_on_failure(*paths: str | os.PathLike):
    """Run the block; if it raises (bad input, Ctrl-C), remove again each folder on ``paths`` (a path and its
    parents) that did not exist before the block and is still empty, so that a command which fails leaves no empty
    run folder behind. Files are never removed."""
    new = {folder for path in paths for folder in (Path(path).absolute(), *Path(path).absolute().parents)
           if not folder.exists()}
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty, or a file (a named output file's own path)
                folder.rmdir()
        raise


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


def claim_run_folder(run_dir: Path, log) -> None:
    """Create the run folder and, while holding its lock (no live run writes there), remove stale temp files."""
    prepare_output_folder(run_dir, "output")
    with run_folder_lock(run_dir):
        stale = remove_stale_temp_files(run_dir, RUN_FILES)
    if stale:
        log(f"removed {len(stale)} temporary file(s) that a run killed while saving left in "
            f"{run_dir}: {', '.join(p.name for p in stale)}")


_RESUME_STATE = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "epoch": int,
                 "step": int, "batch_in_epoch": int, "epoch_totals": Tensor, "world_size": int, "metrics": list}


def _damaged(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged or inconsistent: {what}. Use another checkpoint of the run (or "
                           "train again); a file edited by hand cannot be trusted.")


def is_run_checkpoint(checkpoint) -> bool:
    """Whether a loaded checkpoint was written by :class:`Trainer`, of this version or another."""
    return isinstance(checkpoint, dict) and str(checkpoint.get("format", "")).startswith(_FORMAT_FAMILY)


def _read_engine_checkpoint(path: str | os.PathLike, resume: bool = False, loaded: dict | None = None) -> dict:
    """A Trainer checkpoint, or an error that says what the file is and what to do.

    Checks what evaluate/predict need (a valid config, a classes list) and, with ``resume``, that the training
    state is all there; the weights are checked against the model by :func:`_check_weights`. ``loaded``: the
    file's contents, when the caller has read it already with ``load_checkpoint``.
    """
    checkpoint = load_checkpoint(path) if loaded is None else loaded  # FileNotFoundError / CheckpointError
    written = checkpoint.get("format")
    if is_run_checkpoint(checkpoint) and written != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer version of asmlp_min (format {written!r}; this one reads "
                              f"{CHECKPOINT_FORMAT!r}): upgrade asmlp_min to use it")
    if written != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by 'asmlp-min train': " + (
            "--resume continues a run from its checkpoint.pt; to start from official or backbone weights use train "
            "--pretrained PATH" if resume else "load_trained reads a run's checkpoint.pt; for released weights use "
            "load_for_inference, which reads either (as evaluate and predict do)"))
    if not isinstance(checkpoint.get("config"), dict):
        raise _damaged(path, f"its 'config' should be a dict of settings, got "
                             f"{type(checkpoint.get('config')).__name__ if 'config' in checkpoint else 'none'}")
    cfg = _saved_config(checkpoint, path)
    classes = checkpoint.get("classes")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == cfg.num_classes):
        raise _damaged(path, f"its 'classes' should be a list of {cfg.num_classes} names, got {classes!r:.200}")
    ids = checkpoint.get("category_ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(set(ids)) == cfg.num_classes
                                and all(is_int(i) and i >= 0 for i in ids)):   # Roboflow's start at 0
        raise _damaged(path, f"its 'category_ids' should be None or {cfg.num_classes} distinct ids >= 0: {ids!r:.200}")
    wanted = dict(_RESUME_STATE) if resume else {"model": dict}
    wrong = [f"'{k}' (expected {kind.__name__}, got {type(checkpoint[k]).__name__})" if k in checkpoint
             else f"'{k}' (missing)" for k, kind in wanted.items()
             if not (isinstance(checkpoint.get(k), kind) and not isinstance(checkpoint.get(k), bool))]
    if wrong:
        raise _damaged(path, "wrong or missing entries " + ", ".join(wrong))
    return checkpoint  # the generator state is checked as it loads, the position by check_resume_state


def _saved_config(checkpoint: dict, path) -> TrainConfig:
    """The checkpoint's TrainConfig, resolved, or a CheckpointError saying which value is wrong."""
    try:
        cfg = TrainConfig.from_dict(checkpoint["config"]).resolved()
    except (TypeError, ValueError) as err:
        raise _damaged(path, f"its config is invalid: {err}") from None
    return cfg  # num_classes: None is refused by the 'classes' check of _read_engine_checkpoint


def _model_for(checkpoint: dict, cfg: TrainConfig, path) -> nn.Module:
    """The model the checkpoint's config describes, with the checkpoint's (checked) weights."""
    try:
        model = build_model(**{**cfg.model_kwargs(), "pretrained": None})
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


# Segmentation runs on ADE20K saved their classes as "0".."149" before they were named; those still fit ADE20K.
_ADE20K_BEFORE_NAMES = [str(k) for k in range(150)]


def _check_classes(checkpoint: dict, classes: list[str], path) -> None:
    """The data must have the checkpoint's class names in its order: a label index means one class."""
    saved = list(checkpoint["classes"])
    if saved == list(classes) or (saved == _ADE20K_BEFORE_NAMES and list(classes) == list(ade20k.CLASSES)):
        return
    only_saved = [c for c in saved if c not in classes]
    only_data = [c for c in classes if c not in saved]
    if only_saved or only_data:
        what = (f"only in the checkpoint: {shown_keys(only_saved) or 'none'}; only in the data: "
                f"{shown_keys(only_data) or 'none'}")
    else:
        what = "the same names in another order: " + shown_keys([
            f"label {i} is {a!r} in the checkpoint, {b!r} in the data" for i, (a, b) in enumerate(zip(saved, classes))
            if a != b])
    fix = {"cls": "the same class folders", "det": "the same COCO category names",
           "seg": "masks of the same classes (ADE20K's 150, or --num-classes with train/val folders)"}
    raise ValueError(f"the data's classes differ from the {len(saved)} classes {path} was trained on ({what}); "
                     f"use data with {fix.get(checkpoint.get('config', {}).get('task'), 'the same classes')}")


def _check_label_set(checkpoint: dict, data: TaskData, path) -> None:
    """Label k must be the same class in the checkpoint and the data (evaluate, resume): as many classes, with the
    same names (COCO category ids may differ: each side maps its own to labels 1..K). Released weights
    (:func:`~asmlp_min.engine.load_released`) name no classes: their labels are the folders in sorted order."""
    saved, released = checkpoint["classes"], "config" not in checkpoint
    if len(saved) != data.num_classes:
        legacy = ("; it was written before COCO category ids were numbered 1..K, when the detector had one class "
                  "per id up to the largest: train again on this data"
                  if not released and checkpoint["config"]["task"] == "det" and "category_ids" not in checkpoint
                  else "")
        imagenet = " (ImageNet: the 1000 class folders, whose sorted order is the classifier's)" if released else ""
        raise ValueError(f"{path} predicts {len(saved)} classes but the data has {data.num_classes}{legacy}; use "
                         f"data of the same label set{imagenet}")
    if not released:
        _check_classes(checkpoint, data.classes, path)


def _check_task(checkpoint: dict, cfg: TrainConfig, path) -> None:
    saved = _saved_config(checkpoint, path).task
    if saved != cfg.task:
        raise CheckpointError(f"cannot resume from {path}: it was trained for task {saved!r}, now {cfg.task!r}")


def _check_compatible(checkpoint: dict, cfg: TrainConfig, path) -> None:
    saved = _saved_config(checkpoint, path)  # resolved: a config saved before a setting existed gets its default
    diffs = [f"{k}: checkpoint {_in_effect(saved, k)!r}, now {_in_effect(cfg, k)!r}"
             for k in _RESUME_MUST_MATCH if _in_effect(saved, k) != _in_effect(cfg, k)]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with different settings:\n  "
                              + "\n  ".join(diffs) + "\nPass the same values (or start a new run without --resume).")
    if saved.epochs != cfg.epochs:
        raise CheckpointError(f"cannot resume from {path}: it was scheduled for {saved.epochs} epochs, now "
                              f"{cfg.epochs}; use --epochs {saved.epochs} (--stop-at-epoch ends a run early)")
    changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (the checkpoint's: {_in_effect(saved, k)})"
               for k in _RESUME_RECIPE if _in_effect(saved, k) != _in_effect(cfg, k)]
    if (saved.workers == 0) != (cfg.workers == 0):  # the main process's generator, or one seed per sample
        changed.append(f"--workers {cfg.workers} (the checkpoint's: {saved.workers}; 0 and 1 or more augment from "
                       "different random streams)")
    if changed:
        raise CheckpointError(f"cannot resume from {path} with {', '.join(changed)}: a resumed run keeps its recipe. "
                              "Leave the flag out, or start a new run from these weights with --pretrained "
                              f"{shell_word(path)}")


def _in_effect(cfg: TrainConfig, key: str):
    """The value a run uses: a backbone setting left at None is the variant's (``--shift-size 5`` on asmlp_tiny, whose
    shift size is 5, changes nothing)."""
    value = getattr(cfg, key)
    if value is None and key in BACKBONE_FIELDS:
        return variant_setting(cfg.model, BACKBONE_FIELDS[key], cfg.task)
    return value


def check_resume_state(checkpoint: dict, model: nn.Module, cfg: TrainConfig, world_size: int, batches_per_epoch: int,
                       train_images: int, path) -> None:
    """The training state of ``checkpoint`` fits this run: process count, weights, position in the schedule."""
    if checkpoint["world_size"] != world_size:
        raise CheckpointError(f"the checkpoint was written by {checkpoint['world_size']} process(es), this run has "
                              f"{world_size}: resume with as many (data order and random streams are per process), or "
                              f"start a new run from these weights with --pretrained {shell_word(path)}")
    _check_weights(model, checkpoint, cfg, path)
    saved = checkpoint.get("batches_per_epoch"), checkpoint.get("train_images")  # absent from older checkpoints
    if any(was is not None and was != now for was, now in zip(saved, (batches_per_epoch, train_images))):
        raise CheckpointError(
            f"cannot resume from {path}: its epochs had {saved[0]} batches per process of {saved[1] or 'its'} "
            f"training images, this data gives {batches_per_epoch} of {train_images}, which would change the data "
            f"order{' and the learning-rate schedule' if saved[0] != batches_per_epoch else ''}; resume on the "
            "same data (--data, --train-size; an unreadable image replaced by a readable copy, not removed) or "
            "start a new run from these weights with --pretrained")
    epoch, batch, totals = checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["epoch_totals"]
    steps = epoch * (batches_per_epoch // cfg.accum_steps) + batch // cfg.accum_steps  # one per accum_steps batches
    if not (0 <= epoch <= cfg.epochs and 0 <= batch < batches_per_epoch and batch % cfg.accum_steps == 0
            and totals.shape == (3,) and bool(totals.isfinite().all()) and checkpoint["step"] == steps):
        raise _damaged(path, f"its position (epoch {epoch}, batch {batch}) does not fit {cfg.epochs} epochs of "
                             f"{batches_per_epoch} batches, or its step count (not {steps}) or its 3 finite epoch "
                             "totals are malformed")


def restore_state(checkpoint: dict, parts: dict, path) -> None:
    """``part.load_state_dict(checkpoint[name])`` for each part (model, optimizer, scheduler, scaler), or a
    CheckpointError; AdamW's moments are checked to have their parameter's shape (``load_state_dict`` casts them
    but never checks shapes)."""
    try:
        for name, part in parts.items():
            part.load_state_dict(checkpoint[name])
        optimizer = parts["optimizer"]
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            for name, value in optimizer.state.get(param, {}).items():
                if value.ndim > 0 and value.shape != param.shape:
                    raise ValueError(f"AdamW {name} of shape {tuple(value.shape)} for a parameter {tuple(param.shape)}")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        detail = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise _damaged(path, f"its optimiser or schedule state does not fit the model ({detail})") from None
