"""The ``train`` command's flags, generated from :class:`~asmlp_min.engine.config.TrainConfig`'s fields (name ->
``--kebab-name``, type, choices, help), with a ``--help`` that states the defaults of the task and variant asked for."""
from __future__ import annotations

import argparse
import dataclasses
import typing


def depths_type(text: str) -> tuple[int, ...]:
    """'2,2,6,2' -> (2, 2, 6, 2): blocks per stage, at least one each."""
    try:
        depths = tuple(int(v) for v in text.split(","))
    except ValueError:
        depths = ()
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"expected block counts >= 1 separated by commas, e.g. 2,2,6,2, got {text!r}")
    return depths


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag, generated from the field (name, type, choices, help). Defaults are None
    here so that, with --resume, only the flags actually typed override the checkpoint's settings; the help states
    the defaults a run really gets (:class:`_TrainHelp`)."""
    from .engine.config import GROUP_HELP, TrainConfig
    hints, groups = typing.get_type_hints(TrainConfig), {}
    p.add_argument("-h", "--help", action=_TrainHelp, help="show this message, with the defaults of the task (and "
                                                           "--model) given before it, and exit")
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
        kwargs = dict(help=f.metadata["help"], choices=f.metadata.get("choices"))
        if kinds[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kinds[0] in (int, float):
            kwargs["type"] = kinds[0]
        elif typing.get_origin(kinds[0]) is tuple:
            kwargs["type"] = depths_type
        if f.name == "task":
            p.add_argument("task", nargs="?", **kwargs)
            continue
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = p.add_argument_group(name, GROUP_HELP.get(name))
        groups[name].add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    run = groups["run folder, checkpoints and resuming"]
    run.add_argument("--resume", help="continue exactly from a run's checkpoint.pt with its settings; a flag that "
                                      "would change the model, the data order or the recipe is refused, others "
                                      "(--device, --amp, --eval-every, ...) apply")
    run.add_argument("--overwrite", action="store_true", help="start a new run, or write a resumed one, in a folder "
                                                              "that already has a checkpoint")
    _describe_defaults(p, task=None, model="asmlp_tiny")


def _describe_defaults(parser: argparse.ArgumentParser, task: str | None, model: str) -> None:
    """Append to each setting's help the default that ``task`` (every task when None) and ``model`` get."""
    from .engine.config import TrainConfig, default_text
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:
        if action.dest in meta:
            shown = default_text(action.dest, task, model)
            action.help = meta[action.dest]["help"] + (f" (default: {shown})" if shown else f" (not a {task} setting)")


class _TrainHelp(argparse.Action):
    """``train [TASK] [--model M] --help``: the help with the defaults of that task and variant (drop path, shift
    size and the input size differ between tasks)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        _describe_defaults(parser, getattr(namespace, "task", None), getattr(namespace, "model", None) or "asmlp_tiny")
        parser.print_help()
        parser.exit()
