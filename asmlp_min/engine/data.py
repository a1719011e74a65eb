"""The datasets of a run: the built-in shapes scenes or a folder in the task's real layout, their transforms, and
the loader that turns a reader's failure into one :class:`DataError` line."""
from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .distributed import ctrl_c_held, leave_ctrl_c_to_the_main_process


class DataError(ValueError):
    """A sample could not be read or transformed (a truncated image, a mask value out of range); the message is the
    reader's, which names the file."""
    fix = "once the file it names is fixed or replaced, "  # the advice before "continue with --resume ..."


class WorkerDied(DataError):
    """A DataLoader worker process ended without an error of its own: killed by a signal, most often the kernel's
    out-of-memory killer. The batches it delivered before were whole."""
    fix = "with fewer --workers or a smaller --batch-size if memory ran out, "


@dataclass
class TaskData:
    """Datasets plus what the model and the evaluation need to know about them."""
    train: Dataset | None
    val: Dataset
    num_classes: int
    classes: list[str] = field(default_factory=list)
    coco_gt: object = None  # detection: the validation ground truth for COCOeval (dict, path or COCO)
    category_ids: list[int] | None = None  # detection: label k is COCO category category_ids[k - 1]; None: k itself
    note: str = ""  # what the training log should say about how the labels were read, where it is not obvious


SHAPES_SIZE = 128  # det/seg scenes are drawn at their native size and resized by the transform
WORKERS_PER_CPU = 4  # the most --workers per CPU this process may use (os.sched_getaffinity)


def _identity(*inputs):
    return inputs if len(inputs) > 1 else inputs[0]


def light_transforms(task: str, train: bool, size: int, flip: bool = True):
    """Resize to ``size`` x ``size`` (cls, seg; the detector sizes its own input) and, when training and ``flip``, a
    horizontal flip. A seg mask is resized with the image in training only: evaluation scores the logits at the
    mask's own size, as the paper path does (``segmentation.class_map``), not on a resampled, stretched mask.

    ``--augment light``, the default on shapes: the paper's crops (RandomResizedCrop from 8% of the image,
    0.5-2x rescale) would cut the dominant shape out of a 64-pixel scene and relabel it.
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    ops = [v2.ToImage()]
    if task == "cls" or (task == "seg" and train):
        ops.append(v2.Resize((size, size), antialias=True))
    elif task == "seg":  # evaluation: the image only
        ops.append(v2.Lambda(partial(v2.functional.resize, size=[size, size], antialias=True), tv_tensors.Image))
    if train and flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if task != "det":  # torchvision-style detectors normalise inside the model
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


def paper_transforms(task: str, train: bool, size: int):
    """The data pipelines of the paper's recipes (asmlp_min.data.transforms).

    det: flips only; the detector resizes every image to short side ``size`` itself (``build_model``), so
    training and evaluation see the same scale (COCO: 800, single scale; the paper trains at 480-800). seg: eval at
    mmseg's test scale from the crop ``size`` (ADE20K: 512 -> (2048, 512)), scored at each image's own size.
    """
    from ..data import transforms as T
    if task == "cls":
        return T.classification_transforms(train, size)
    if task == "det":
        return T.detection_transforms(train)
    return T.segmentation_transforms(train, size)


def task_transforms(task: str, augment: str, train: bool, size: int):
    """The transform for one split; ``augment='none'`` is ``'light'`` without the flip."""
    if augment == "paper":
        return paper_transforms(task, train, size)
    return light_transforms(task, train, size, flip=augment == "light")


class CachedDataset(Dataset):
    """Keeps each untransformed sample after its first read (the shapes generator runs once per scene,
    not once per epoch), then applies ``transform``. The cache is per process and filled lazily."""

    def __init__(self, base: Dataset, transform: Callable, task: str):
        self.base, self.transform, self.task, self.cache = base, transform, task, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getstate__(self) -> dict:
        """Without the cache: spawn and forkserver workers (macOS, Windows, Python 3.14's Linux default) get the
        dataset pickled, each cached tensor as a file descriptor ('too many fds' past 256); each fills its own."""
        return {**self.__dict__, "cache": {}}

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
    (``--num-classes`` required, 0 is a class). ``export_shapes`` writes these layouts (for cls the scenes of
    ``--data shapes`` with ``**CLS_SCENE``).
    ``train=False`` builds the validation split only (``TaskData.train`` is None), for evaluation.
    """
    _check_workers(cfg.workers)
    train_tf, val_tf = (task_transforms(cfg.task, cfg.augment, train, cfg.input_size) for train in (True, False))
    if cfg.data == "shapes":
        return _shapes_data(cfg, train_tf, val_tf, with_train)
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {cfg.data!r}: no such folder (use --data shapes for the built-in data)")
    folder = {"cls": _folder_cls, "det": _folder_det, "seg": _folder_seg}[cfg.task]
    return folder(root, cfg, train_tf, val_tf, with_train)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a job scheduler sets), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_workers() -> int:
    """The most loader processes worth starting here: ``WORKERS_PER_CPU`` per usable CPU. More only compete for the
    CPUs, each with its own memory: 100000 of them fill the memory before a batch is loaded."""
    return WORKERS_PER_CPU * _usable_cpus()


def _check_workers(workers: int) -> None:
    """Checked here, where the run's machine is."""
    if workers > max_workers():
        raise ValueError(f"--workers {workers} would start {workers} loader processes per training process for the "
                         f"{_usable_cpus()} CPU(s) this process may use; use at most {max_workers()} (about one per "
                         "CPU is usually enough)")


def _shapes_data(cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from ..data import shapes
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
    from ..data.datasets import ImageFolderClassification
    val = ImageFolderClassification(root / _existing(root, ["val"], "validation split"), transform=val_tf)
    train = None
    if with_train:
        train = ImageFolderClassification(root / _existing(root, ["train"], "training split"), transform=train_tf)
        _check_same_labels({c: c for c in train.classes}, {c: c for c in val.classes},
                           f"{root}: train and val have different class folders", "every class needs a folder in both")
        if len(train.classes) < 2:  # its loss is 0 from the first step and its accuracy 1: nothing to learn
            raise ValueError(f"{root}: a classifier needs two classes or more, and {root / 'train'} has one folder, "
                             f"{train.classes[0]!r}: add a folder for each other class")
    return TaskData(train, val, len(val.classes), list(val.classes))


def _folder_det(root: Path, cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from ..data.datasets import CocoDetection

    def split(names: list[str], tf) -> CocoDetection:
        ann = _existing(root, [f"annotations/instances_{n}.json" for n in names], "COCO annotation file")
        return CocoDetection(root / Path(ann).stem.removeprefix("instances_"), root / ann, transform=tf,
                             contiguous_labels=True, with_masks=False)  # the detectors here predict boxes
    val = split(["val", "val2017"], val_tf)
    train = None
    if with_train:
        with warnings.catch_warnings():  # validate_coco's "AP will be -1" is about evaluation
            warnings.filterwarnings("ignore", ".*no annotations: AP will be -1")
            train = split(["train", "train2017"], train_tf)
        # mmdet and detectron2 refuse it too (no image left to train on); the detectors skip crowd regions
        if not any(not a["iscrowd"] for anns in train.annotations.values() for a in anns):
            raise ValueError(f"{train.ann_file}: no annotations to train on (none, only boxes of zero width or "
                             "height, or only crowd regions, iscrowd 1): a detector learns from boxes; label some "
                             "objects first")
    names = {c["id"]: c["name"] for c in val.coco.cats.values()}
    if train is not None:  # label k must mean one category in both splits (COCO 2017's are identical)
        _check_same_labels({c["id"]: c["name"] for c in train.coco.cats.values()}, names,
                           f"{train.ann_file} and {val.ann_file} list different 'categories'",
                           "give both files the same categories", show=lambda i, name: f"id {i} {name!r}")
    # labels 1..K in the order of the category ids (COCO 2017: 80 ids in 1..90), mapped back for COCOeval
    return TaskData(train, val, len(names), [names[c] for c in val.category_ids], coco_gt=val.coco,
                    category_ids=val.category_ids)


def _check_same_labels(train: dict, val: dict, what: str, fix: str, show: Callable = lambda key, name: name) -> None:
    """The training and validation splits name the same labels ({key: name}), or a ValueError listing the
    difference: ``what`` (only in train: ...; only in val: ...); ``fix``."""
    def only(names: dict, other: dict) -> str:
        return ", ".join(show(k, n) for k, n in sorted(names.items()) if other.get(k) != n) or "none"
    if train != val:
        raise ValueError(f"{what} (only in train: {only(train, val)}; only in val: {only(val, train)}); {fix}")


def _folder_seg(root: Path, cfg: TrainConfig, train_tf, val_tf, with_train: bool) -> TaskData:
    from ..data.datasets import ADE20KSegmentation
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
    note = "" if not ade20k or num_classes == 150 else (
        f"masks read as ADE20K's (images/training, images/validation): value 0 is unlabelled and ignored, class k is "
        f"value k + 1; if 0 is one of your {num_classes} classes, name the folders train and val")
    return TaskData(train, val, num_classes, val.classes, note=note)


def _loader(dataset: Dataset, batches, collate_fn, workers: int, seed: int, device: torch.device) -> DataLoader:
    # worker seeds come from this generator, not the global one, so the worker count cannot shift the global stream
    if workers:
        dataset = SeededSamples(dataset, seed)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
                      worker_init_fn=leave_ctrl_c_to_the_main_process if workers else None)


class SeededSamples(Dataset):
    """``base``, with torch's random generator seeded from (``seed``, index) before each sample is read.

    Used in worker processes, where a sample's random augmentation would otherwise come from the worker's stream,
    which depends on every sample the worker read before: a run resumed mid-epoch starts its workers at a later
    batch and would augment the rest of the epoch differently from the run it continues. Seeded per sample, it
    does not, and the worker count (1 or more) does not change the run. Without workers the samples draw from the
    main process's generator, which a checkpoint saves and restores.
    """

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        torch.manual_seed((self.seed * 2**32 + index) % 2**64)
        return self.base[index]


def _loaded(loader: DataLoader):
    """The batches of ``loader``; a file that cannot be read (ValueError, OSError) is raised as :class:`DataError`
    with the reader's one-line message, whether it failed here (``--workers 0``) or in a worker process, which torch
    reports as the worker's whole traceback. A worker process that dies is raised as :class:`WorkerDied`, between
    batches (:func:`_worker_deaths_deferred`)."""
    context = loader.multiprocessing_context or multiprocessing.get_context()
    with ctrl_c_held(context.get_start_method() if loader.num_workers else "fork"):  # the workers iter starts
        iterator = iter(loader)
    with _worker_deaths_deferred() as died:
        try:
            while True:
                if died:  # a worker died while the caller was busy with the last batch
                    raise WorkerDied(_worker_death_message(died[0]))
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                except (ValueError, OSError) as err:  # how readers report a bad file; a bug elsewhere keeps its
                    exit_codes = _exit_codes_after_reset(iterator) if isinstance(err, ConnectionError) else []
                    dead = [w.pid for w, code in zip(getattr(iterator, "_workers", ()), exit_codes) if code is not None]
                    if not dead:
                        raise DataError(_reader_message(err)) from None
                    # the main process read a dead worker's pipe (ECONNRESET) before torch noticed: say it as torch does
                    err = RuntimeError(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly")
                    raise WorkerDied(_worker_death_message(died[0] if died else err, exit_codes)) from None
                except RuntimeError as err:
                    if not _WORKER_DEATH.match(str(err)):
                        raise
                    # torch's own words: "is killed by signal: Killed" from its SIGCHLD handler (collected in died),
                    # or "exited unexpectedly" when the queue noticed first, without the signal: the exit codes say it
                    raise WorkerDied(_worker_death_message(died[0] if died else err, _exit_codes(iterator))) from None
                yield batch
        finally:  # stop the workers while their deaths are still collected: stopped after torch's handler is back
            getattr(iterator, "_shutdown_workers", lambda: None)()  # (at exit), they printed its traceback


_WORKER_DEATH = re.compile(r"DataLoader worker \(pid")


def _exit_codes(iterator) -> list[int | None]:
    """The exit code of each of the loader's worker processes (torch-private ``_workers``), None while it runs."""
    return [worker.exitcode for worker in getattr(iterator, "_workers", ())]


RESET_WAIT_S = 2.0


def _exit_codes_after_reset(iterator) -> list[int | None]:
    """:func:`_exit_codes` once a worker has ended, or after ``RESET_WAIT_S`` seconds if none does. A killed worker's
    pipe resets as the kernel closes its files, a moment before the process has ended and has an exit code."""
    workers = getattr(iterator, "_workers", ())
    ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=RESET_WAIT_S) if workers else []
    for worker in workers:
        if worker.sentinel in ended:
            worker.join()  # its files are closed; waits the moment until it has ended
    return _exit_codes(iterator)


@contextlib.contextmanager
def _worker_deaths_deferred():
    """Collect the errors that PyTorch's SIGCHLD handler raises for a dead worker, instead of letting them fly.

    That handler (set when a loader with workers starts) raises at whatever line the main process is running: maybe
    inside ``optimizer.step()``, between the updates of two parameters, so that the weights a save would keep are
    half-updated. Deferred, the error comes out of :func:`_loaded` at the next batch, after a whole step. Only the
    main thread can set a handler; elsewhere (and without workers) nothing changes.
    """
    died: list[RuntimeError] = []
    torch_handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    if not callable(torch_handler) or threading.current_thread() is not threading.main_thread():
        yield died
        return

    def collect(signum, frame):
        try:
            torch_handler(signum, frame)
        except RuntimeError as err:
            died.append(err)

    signal.signal(signal.SIGCHLD, collect)
    try:
        yield died
    finally:
        signal.signal(signal.SIGCHLD, torch_handler)


def _worker_death_message(err: RuntimeError, exit_codes: Iterable[int | None] = ()) -> str:
    """torch's message, plus the signals that ended workers (a negative exit code) where torch does not name one."""
    text = str(err).strip().rstrip(".")
    signals = sorted({-code for code in exit_codes if code is not None and code < 0})
    if signals and "signal" not in text:
        text += "; killed by " + ", ".join(f"signal {n} ({signal.strsignal(n) or 'unknown'})" for n in signals)
    return (f"a data-loading worker process died ({text}); 'Killed' (signal 9) is most often the kernel's "
            "out-of-memory killer")


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
