"""Command-line interface: ``asmlp-min SUBCOMMAND --help`` explains each subcommand."""
from __future__ import annotations

import argparse
import sys

from .backbone import list_models


def _info(args: argparse.Namespace) -> int:
    from .complexity import info_table
    print(info_table(args.model, args.image_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asmlp-min", description="AS-MLP: models, training and benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="parameters, GMACs and per-stage shapes beside the paper's numbers",
                          description="Print parameters, GMACs (measured and analytic) and stage shapes of a "
                                      "variant next to the paper's values.")
    info.add_argument("model", choices=list_models(), help="variant name")
    info.add_argument("--image-size", type=int, default=224, help="square input size (default: 224)")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # user mistakes: a sentence, not a traceback
        print(f"asmlp-min {args.command}: error: {err}", file=sys.stderr)
        return 2
