"""Command-line interface: ``asmlp-min SUBCOMMAND --help`` explains each subcommand and every flag.

    asmlp-min demo                                   # cls + det + seg on synthetic shapes -> runs/demo/report.md
    asmlp-min train cls|det|seg [--model ... --data shapes|PATH --epochs ... --amp --resume CKPT]
    asmlp-min evaluate [cls|det|seg] --checkpoint runs/cls/checkpoint.pt [--data PATH]
    asmlp-min predict --checkpoint runs/det/checkpoint.pt image.png ...   # PNG with top-5 / boxes / mask
    asmlp-min info asmlp_tiny                        # params, GMACs, stage shapes vs the paper
    asmlp-min export --weights asmlp_tiny.pth --output asmlp_tiny.onnx   # ONNX, any batch, one image size
    asmlp-min bench --quick                          # speed / memory table
    torchrun --nproc_per_node=2 -m asmlp_min train cls ...   # DistributedDataParallel, one process per device

User mistakes (a missing file, an unknown model, a checkpoint of another task, an unreadable image) end with
one line on stderr and exit status 2, not a traceback; a full disk, or memory running out, with one line and
status 1. A training stopped by Ctrl-C or SIGTERM saves, says how to resume, and exits 130 or 143 (128 + the
signal), so that a job scheduler does not take it for a finished run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

from .backbone import list_models
from .checkpoint import CheckpointError
from .checks import InputWarning
from .files import WriteError, shell_word
from .train_flags import add_train_arguments


# ---------------------------------------------------------------- train

def _train(args: argparse.Namespace) -> int:
    from .engine import TrainConfig, Trainer, _read_engine_checkpoint
    from .engine.distributed import process_group_closed_at_exit
    from .engine.config import SIZE_FIELDS
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.resume:
        # the checkpoint's settings, except the one that only concerned the run that wrote it, and its input size
        # where another task is asked for (the resume check then names the task that differs)
        loaded = _read_engine_checkpoint(args.resume, resume=True)   # read once, handed to the Trainer
        saved = TrainConfig.from_dict(loaded["config"])
        if "data" not in overrides:
            _check_saved_data(loaded, args.resume)
        if "device" not in overrides:
            overrides["device"] = _saved_device(loaded, saved.device, args.resume)
        other_task = overrides.get("task", saved.task) != saved.task
        sizes = dict.fromkeys(SIZE_FIELDS) if other_task else {}
        base = dataclasses.replace(saved, stop_at_epoch=None, **sizes)
        overrides.setdefault("output", str(Path(args.resume).parent))
        elsewhere = Path(overrides["output"]).resolve() != Path(args.resume).resolve().parent
        held = [Path(overrides["output"]) / name for name in ("checkpoint.pt", "metrics.jsonl")]
        held = [path for path in held if path.exists()]
        if elsewhere and held and not args.overwrite and int(os.environ.get("RANK", "0")) == 0:
            raise ValueError(f"--output {overrides['output']} already holds a run ({held[0]}); resuming "
                             f"{args.resume} there would overwrite it: leave --output out to continue in the "
                             "checkpoint's own folder, choose another --output, or pass --overwrite")
    else:
        loaded = None
        task = overrides.get("task", "cls")
        base = TrainConfig(task=task, output=f"runs/{task}")
        existing = Path(overrides.get("output", base.output)) / "checkpoint.pt"
        if existing.exists() and not args.overwrite and int(os.environ.get("RANK", "0")) == 0:
            raise ValueError(f"{existing} exists: continue it with --resume {shell_word(existing)}, or start over with "
                             "--overwrite or another --output")
    _refuse_shapes_only(overrides, overrides.get("data", base.data))
    trainer = Trainer(dataclasses.replace(base, **overrides), resume=args.resume, loaded=loaded)
    with process_group_closed_at_exit():
        trainer.log(f"training {trainer.cfg.task} {trainer.cfg.architecture} on {trainer.cfg.data}: "
                    f"{trainer.steps_per_epoch} steps/epoch x {trainer.cfg.epochs} epochs, global batch "
                    f"{trainer.cfg.batch_size * trainer.env.world_size * trainer.cfg.accum_steps}, "
                    f"{trainer.env.world_size} process(es) on {trainer.env.device}; run folder {trainer.run_dir}")
        if trainer.data.note:
            trainer.log(f"note: {trainer.data.note}")
        trainer.fit()
    return 0 if trainer.stop_signal is None else 128 + trainer.stop_signal


def _refuse_shapes_only(given: dict, data: str) -> None:
    """--train-size and --val-size count generated scenes: on a folder they would be ignored, yet saved as if used."""
    flags = [f"--{key.replace('_', '-')}" for key in ("train_size", "val_size") if key in given]
    if flags and data != "shapes" and Path(data).exists():  # a missing folder: build_data's error says so first
        raise ValueError(f"{' and '.join(flags)} applies to --data shapes only (the number of generated scenes); "
                         f"a folder's splits are used whole: leave {'them' if len(flags) > 1 else 'it'} out, or "
                         "use a folder with fewer images")


def _saved_device(checkpoint: dict, device: str, path: str) -> str:
    """The device a resume continues on unless --device is given: the run's own, so that it goes on bit for bit."""
    import torch
    if device == "auto":   # resolved when the run started; its generator states show which device that was
        device = "cuda" if "cuda" in checkpoint["rng"] else "cpu"
        if device == "cpu" and torch.cuda.is_available():
            warnings.warn(f"{path} was trained on the CPU (--device auto on a machine without a GPU); the resume "
                          "continues there, bit for bit: pass --device cuda to move it to the GPU (not bit for bit)",
                          InputWarning)
    if device.startswith("cuda") and not torch.cuda.is_available():
        # CUDA's generator state, kernels and float16 GradScaler do not carry over to the CPU: no silent move there
        raise ValueError(f"{path} was trained on {device}, which a resume keeps so that the run continues bit for "
                         "bit, and no CUDA GPU is visible here: resume on a machine with a GPU, or pass --device cpu "
                         "to continue on the CPU (the run goes on, but not bit for bit)")
    return device


def _check_saved_data(checkpoint: dict, path: str) -> None:
    """Where no --data is given, the data folder the checkpoint names must exist, or the error says where that name
    came from and how to point at the data. Checkpoints written before runs stored it as an absolute path hold it as
    typed, relative to the folder training ran in."""
    data = checkpoint["config"].get("data", "shapes")
    if data == "shapes" or Path(data).is_dir():
        return
    absolute = PurePosixPath(data).is_absolute() or PureWindowsPath(data).is_absolute()  # trained on another system
    where = ("does not exist here" if absolute else
             f"is relative to the folder that training ran in, and {Path.cwd()} has no such folder")
    raise FileNotFoundError(f"{path} was trained on the data folder {data!r}, which {where}: pass --data with the "
                            "folder's path (absolute, or relative to here)")


# ---------------------------------------------------------------- evaluate

def _load_for(args: argparse.Namespace):
    """The checkpoint's model and config (a run's checkpoint.pt, or released weights with their head), refusing a
    checkpoint of another task than the one asked for."""
    from .engine import load_for_inference
    model, cfg, checkpoint = load_for_inference(args.checkpoint)
    asked = getattr(args, "task", None)
    if asked and asked != cfg.task:
        raise ValueError(f"{args.checkpoint} holds a {cfg.task} model, not {asked}: "
                         f"run: asmlp-min {args.command} {cfg.task} --checkpoint {shell_word(args.checkpoint)}")
    return model, cfg, checkpoint


def writable_file(path: str, flag: str, example: str = "metrics.json", reads=()) -> Path:
    """Check now, before minutes of work, that ``path`` can be written: not a folder, in a writable folder, not read,
    and not a file of the run beside the checkpoint (``reads[0]``), such as its metrics.jsonl."""
    from .engine import prepare_output_folder
    from .engine.runs import RUN_FILES
    path = Path(path)
    read = any(path.resolve() == Path(r).resolve() for r in reads)
    of_the_run = bool(reads) and any(path.resolve() == (Path(reads[0]).parent / name).resolve() for name in RUN_FILES)
    if path.is_dir() or read or of_the_run:
        what, near = ("a folder", path) if path.is_dir() else (
            "a file this command reads" if read else "a file of the run that wrote the checkpoint", path.parent)
        raise ValueError(f"--{flag} {str(path)!r} is {what}; give a file name such as {str(near / example)!r}")
    prepare_output_folder(path.parent, flag, file=path)
    return path


def _evaluate(args: argparse.Namespace) -> int:
    from .files import atomic_write
    from .engine import _check_label_set, build_data, evaluate, init_distributed, strict_json
    from .engine.data import max_workers
    from .engine.distributed import process_group_closed_at_exit
    json_path = writable_file(args.json, "json", reads=[args.checkpoint]) if args.json else None
    model, cfg, checkpoint = _load_for(args)
    released = "config" not in checkpoint          # official weights: no run, no data of their own
    if args.data is None and released:
        raise ValueError(f"{args.checkpoint} holds released weights, which name no data: pass --data, e.g. the "
                         f"folder holding val/<class>/<images> (ImageNet) or ADE20K's images/ and annotations/")
    if args.data is None:
        _check_saved_data(checkpoint, args.checkpoint)
    _refuse_shapes_only({} if args.val_size is None else {"val_size": args.val_size}, args.data or cfg.data)
    # the device is this machine's, not the training machine's: a model trained on a GPU evaluates on a CPU
    overrides = {k: v for k, v in dict(data=args.data, batch_size=args.batch_size, val_size=args.val_size,
                                       device=args.device or "auto", amp=args.amp).items() if v is not None}
    cfg = dataclasses.replace(cfg, **overrides).resolved()
    # the training machine's loader processes, as many as this one allows
    cfg = dataclasses.replace(cfg, workers=min(cfg.workers, max_workers()))
    env = init_distributed(cfg.device)
    if args.amp is None and cfg.amp and env.device.type == "cpu":  # a GPU run's float16 is bfloat16 on a CPU: many
        cfg = dataclasses.replace(cfg, amp=False)                    # times slower without bfloat16 units
    with process_group_closed_at_exit():
        data = build_data(cfg, with_train=False)
        _check_label_set(checkpoint, data, args.checkpoint)
        metrics = evaluate(model.to(env.device), cfg, data, env)
    if env.is_main:
        print(f"{cfg.task} {cfg.architecture} on {cfg.data} ({len(data.val)} images):")
        for key, value in metrics.items():
            if isinstance(value, float):
                print(f"  {key:10s} {value:.4f}")
        if json_path is not None:
            with atomic_write(json_path, "w") as f:
                f.write(strict_json(metrics, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------- info, demo, bench

def _info(args: argparse.Namespace) -> int:
    from .complexity import info_table
    if args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    print(info_table(args.model, args.image_size))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    report, missed = run_demo(args.output, data_root=args.data_root, quick=args.quick)
    print(f"report: {report}")
    for line in missed:
        _say(f"demo: target missed, {line} (see {report})")
    return 1 if missed else 0


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train and evaluate a small classifier, detector and segmenter on shapes",
                          description="On the built-in shapes data and the CPU: trains a small AS-MLP classifier, "
                                      "detector and segmenter, evaluates them, and writes OUTPUT/report.md with "
                                      "accuracy, AP and mIoU beside their targets and chance, params/GMACs beside "
                                      "the paper, and figures; exits with status 1 if a target is missed. 7 to 10 "
                                      "minutes on 2 cores; a re-run reuses the generated data.")
    demo.add_argument("--output", default="runs/demo", help="report folder (default: runs/demo)")
    demo.add_argument("--data-root", default="data/shapes",
                      help="where the generated shapes datasets are written once and reused (default: data/shapes)")
    demo.add_argument("--quick", action="store_true", help="a few steps per task: checks the pipeline in ~1 minute, "
                                                           "numbers are meaningless")
    demo.set_defaults(func=_demo)


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", add_help=False,  # --help states the task's defaults (train_flags)
                           help="train a classifier, detector or segmenter (resumable, AMP, DDP)",
                           description="Train AS-MLP for one task. Every epoch appends to OUTPUT/metrics.jsonl, "
                                       "redraws OUTPUT/curves.png and atomically rewrites OUTPUT/checkpoint.pt; "
                                       "Ctrl-C saves and stops. Multi-process: torchrun --nproc_per_node=N "
                                       "-m asmlp_min train ... (see README).")
    add_train_arguments(train)
    train.set_defaults(func=_train)


def _add_evaluate_parser(sub) -> None:
    from .engine.config import TASK_HELP
    ev = sub.add_parser("evaluate", help="score a trained checkpoint on validation data",
                        description="Accuracy (cls), COCO box AP (det) or mIoU (seg) of a checkpoint from "
                                    "'asmlp-min train'. Works under torchrun too.")
    ev.add_argument("task", nargs="?", choices=("cls", "det", "seg"),
                    help=f"{TASK_HELP}; optional, checked against the checkpoint")
    ev.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run, or released weights with "
                    "their head: an official classification .pth, an official mmseg UperNet checkpoint")
    ev.add_argument("--data", help="'shapes' or a folder (default: the data the checkpoint was trained on)")
    ev.add_argument("--val-size", type=int, help="shapes only: number of validation scenes (default: as trained)")
    ev.add_argument("--batch-size", type=int, help="images per batch (default: as trained)")
    ev.add_argument("--device", help="auto (cuda when available), cpu, cuda or cuda:N (default: auto, whatever "
                                     "device the model was trained on)")
    ev.add_argument("--amp", action=argparse.BooleanOptionalAction,
                    help="mixed precision (default: as trained on a GPU; off on a CPU, where it means bfloat16)")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.set_defaults(func=_evaluate)


def _add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="parameters, GMACs and per-stage shapes beside the paper's numbers",
                          description="Print parameters, GMACs (measured and analytic) and stage shapes of a "
                                      "variant next to the paper's values.")
    info.add_argument("model", choices=list_models(), help="variant name")
    info.add_argument("--image-size", type=int, default=224, help="square input size (default: 224)")
    info.set_defaults(func=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asmlp-min", description="AS-MLP: models, training and benchmarks.",
                                     epilog="Run 'asmlp-min COMMAND --help' for the flags of a command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .bench import add_bench_parser
    from .export import add_export_parser
    from .predict import add_predict_parser
    for add in (_add_demo_parser, _add_train_parser, _add_evaluate_parser, add_predict_parser, _add_info_parser,
                add_export_parser, add_bench_parser):
        add(sub)
    return parser


_FROM_CHECKPOINT = ("if it happened while loading a checkpoint, its config looks wrong: no AS-MLP variant needs "
                    "that much")
_LESS_MEMORY = {"info": "use a smaller --image-size",
                "train": "use a smaller --batch-size (--accum-steps keeps the step's batch) or input size "
                         "(--image-size, --min-size, --crop-size); " + _FROM_CHECKPOINT,
                "evaluate": "use a smaller --batch-size; " + _FROM_CHECKPOINT}


def out_of_memory(err: RuntimeError) -> bool:
    """Whether torch ran out of memory: CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"
    (Linux, macOS) or "not enough memory" (Windows)."""
    return any(words in str(err) for words in ("out of memory", "can't allocate memory", "not enough memory"))


def _say(line: str) -> None:
    """``line`` and its newline on stderr in one write. torchrun starts its processes with ``python -u``, where
    ``print`` writes the text and the newline separately, so two processes' lines could run into one."""
    sys.stderr.write(line + "\n")


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """This package's warnings (a skipped annotation, a class without pixels) as one line on stderr,
    ``asmlp-min CMD: warning: ...``, instead of Python's file:line and source line; other libraries' as Python shows
    them."""
    package, shown = Path(__file__).resolve().parent, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if Path(filename).resolve().is_relative_to(package):
            _say(f"asmlp-min {command}: warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)
    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """``--output ""`` (an unset shell variable) would write into the current folder, ``--json ""`` nothing at all."""
    for name in ("output", "json", "checkpoint", "data", "data_root", "weights", "resume", "pretrained"):
        if getattr(args, name, None) == "":
            raise ValueError(f"--{name.replace('_', '-')} is empty: give a path (was a shell variable unset?)")


def _escape_what_the_output_cannot_encode() -> None:
    """Windows writes redirected output in its ANSI code page (cp1252, ...), where a path or class name in another
    script raised UnicodeEncodeError and ended the command: such characters are written as \\u escapes instead."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    from .engine import NonFiniteLossError, PeerStopped, new_folders_removed_on_failure
    from .engine.distributed import sigterm_back_on
    _escape_what_the_output_cannot_encode()
    args = build_parser().parse_args(argv)
    named = [path for path in (getattr(args, "output", None), getattr(args, "json", None)) if path]
    try:  # a command that fails leaves no empty folder behind; the package's warnings are one line each
        _refuse_empty_paths(args)
        with new_folders_removed_on_failure(*named), _one_line_warnings(args.command):
            return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # user mistakes (CheckpointError included)
        kind = "checkpoint error" if isinstance(err, CheckpointError) else "error"
        _say(f"asmlp-min {args.command}: {kind}: {err}")
        return 2
    except WriteError as err:  # disk full, file-size limit: the message says which file and that nothing was damaged
        _say(f"asmlp-min {args.command}: error: {err}")
        return 1
    except OSError as err:  # a path that cannot be read or written (permissions, a file where a folder should be)
        where = f" {err.filename}" if err.filename else ""
        _say(f"asmlp-min {args.command}: error: cannot use{where}: {err.strerror or err}; check the path and its "
             "permissions")
        return 2
    except (NonFiniteLossError, PeerStopped) as err:
        _say(f"asmlp-min {args.command}: stopped: {err}")
        sigterm_back_on()  # torchrun's SIGTERM to the survivors of a dead process waited for that line
        return 1
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        asked = re.search(r"(?i)tried to allocate ([\d.]+ ?\w+)", str(err))  # "240000000000 bytes", "20.00 GiB"
        _say(f"asmlp-min {args.command}: error: out of memory{f': {asked[1]} were asked for' if asked else ''}; "
             + _LESS_MEMORY.get(args.command, "free some memory; " + _FROM_CHECKPOINT))
        return 1
    except KeyboardInterrupt:
        _say(f"asmlp-min {args.command}: interrupted")
        return 130
