"""The ``asmlp-min bench`` command: its arguments, and the run they ask for (the default tables or a sweep)."""
from __future__ import annotations

import argparse

import torch

from ..backbone import MODEL_CONFIGS
from ..runtime import keep_freed_memory
from . import sweep
from .measure import run_bench
from .report import format_table, write_json
from .settings import COMPILE_MODES, settings_for


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``asmlp-min bench`` on the CLI's subparsers (asmlp_min/cli.py calls this)."""
    parser = subparsers.add_parser(
        "bench", help="speed and memory vs the official configuration, swin_t and convnext_tiny",
        description="Time the axial shift, inference and a training step of AS-MLP-T against the official "
                    "configuration (NCHW, nn.Conv2d, Algorithm 1 shift), torchvision's swin_t and convnext_tiny "
                    "and a matmul, all in one run with the candidates timed in turns. Prints a markdown table.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (fp32, batch 16, training batch 8) or cuda (batch 64, fp16 autocast); default: cpu")
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="asmlp_tiny",
                        help="AS-MLP variant to time (default: asmlp_tiny, the peers' size class)")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up round and 3 timed rounds (under a minute on 2 CPU cores; noisier)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, reported)")
    parser.add_argument("--repeats", type=int, help="timed rounds per table (default: cpu 10, cuda 20; --quick 3)")
    parser.add_argument("--batch", type=int, help="inference and shift batch (default: cpu 16, cuda 64)")
    parser.add_argument("--train-batch", type=int, help="training-step batch (default: cpu 8, cuda 64)")
    parser.add_argument("--image-size", type=int, help="square input side (default: 224)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every candidate through torch.compile (default mode), beside its eager self; "
                             "compilation takes minutes on a small CPU")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile's mode for --compile: reduce-overhead replays CUDA graphs, which cuts the "
                             "GPU's per-kernel launch cost (default: default)")
    parser.add_argument("--batches", type=_batch_list, metavar="B1,B2,...",
                        help="sweep these inference batches for every candidate (eager, and compiled with --compile), "
                             "report where each saturates, and time the training step of asmlp_min and the official "
                             "configuration at the same batches (only at --train-batch if given); replaces the default "
                             "tables (default: no sweep, the single --batch)")
    parser.add_argument("--max-seconds", type=float,
                        help="with --batches: stop before a batch that would end past this many seconds (estimated "
                             "from the previous batch); the table says where it stopped")
    parser.add_argument("--no-peers", action="store_true", help="skip torchvision's swin_t and convnext_tiny")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run every candidate with asmlp_min.keep_freed_memory() (glibc keeps freed memory for "
                             "reuse: no page faults for re-allocated activations), to see what allocation costs")
    parser.set_defaults(func=bench_command)
    return parser


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        message = f"expected comma-separated batch sizes such as 64,128,256, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if min(batches) < 1:
        raise argparse.ArgumentTypeError(f"every batch size must be >= 1, got {text!r}")
    return batches


def bench_command(args: argparse.Namespace) -> int:
    if args.json:  # checked before minutes of timing, not after
        from ..cli import writable_file
        writable_file(args.json, "json", "bench.json")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {key: value for key in ("repeats", "batch", "train_batch", "image_size", "max_seconds")
                 if (value := getattr(args, key)) is not None}
    if args.no_peers:
        overrides["peers"] = ()
    if args.batches:
        if args.batch is not None:
            raise ValueError("--batch is the single batch of the default tables; with --batches give the sweep only")
        overrides.update(batches=args.batches, train_batches=(args.train_batch,) if args.train_batch else args.batches)
    settings = settings_for(args.device, args.quick, model=args.model, compile=args.compile,
                            compile_mode=args.compile_mode, **overrides)
    if args.keep_freed_memory and not keep_freed_memory():
        raise ValueError("--keep-freed-memory needs glibc's malloc (Linux); this platform has another")
    if settings.batches:
        results = sweep.run_sweep(settings)
        print(sweep.format_sweep_table(results))
    else:
        results = run_bench(settings)
        print(format_table(results))
    if args.json:
        write_json(results, args.json)
        print(f"\nJSON: {args.json}")
    return 0
