"""Official checkpoints in, project checkpoints out, safely.

Reading always uses ``torch.load(..., weights_only=True, map_location="cpu")``: a tampered pickle that tries
to run code is refused, not executed. Writing goes through ``files.atomic_write``, so a failed save never leaves a
half-written file or clobbers the previous one.

Accepted layouts (the official releases of svip-lab/AS-MLP and its mmdet and mmseg forks):
- official classification ``.pth``: ``{"model": state_dict}``;
- mmdet / mmseg checkpoints: ``{"state_dict": {"backbone.patch_embed...", "neck...", ...}}`` with per-output
  ``backbone.norm{i}``, loaded into a ``features_only`` model;
- a raw state dict, optionally with ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile) or ``backbone.``
  prefixes;
- training checkpoints with an EMA copy (``state_dict_ema``, ``model_ema``): the raw weights when both are there;
  the official trainer's ``ckpt_epoch_N.pth``, its yacs config read as ``official_config`` (official_config.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import official_config
from .files import atomic_write

_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")  # the first one present


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True`` on CPU, turning every failure into a readable error."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder, not a file (a training run keeps its "
                                f"weights in {str(path / 'checkpoint.pt')!r})")
    if not path.is_file():
        tilde = "; '~' is not expanded here: a shell expands it at the start of a word only, not after --flag="
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (or is not a file)"
                                + (tilde if str(path).startswith("~") else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes): a download or copy that did not finish? copy it "
                              "again")
    if kind := _other_kind_of_file(path):  # torch.load would call it a tampered or corrupt pickle
        raise CheckpointError(f"{path}: not a checkpoint but {kind}; a checkpoint is a file written by torch.save "
                              "(.pt, .pth)")
    if _is_torchscript(path):  # torch.load would say to retry with weights_only=False, which runs its code
        raise CheckpointError(f"{path}: a TorchScript model, not a checkpoint: torch.jit.load it and save its "
                              "state_dict() with torch.save")
    if damaged := _first_damaged_record(path):  # torch.load does not check, and would load the wrong numbers
        raise CheckpointError(f"{path}: corrupt: the bytes of {damaged!r} do not match the checksum torch.save "
                              "wrote; copy the file again")
    try:  # timm's train.py keeps its argparse.Namespace beside the weights, the official trainer a yacs config
        with _allowing([argparse.Namespace, *official_config.SAFE_GLOBALS]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to unpickle: corrupt, or holds objects other than tensors (a tampered "
                              f"file may run code; it was NOT executed). Details: {_refusal_detail(err)}. A whole "
                              "saved model, or a training checkpoint that keeps its settings as an object, is "
                              "refused the same way: its weights load from a file written with "
                              "torch.save(model.state_dict(), path)") from None
    except Exception as err:  # torch.load fails in many ways on damaged bytes (EOFError, IndexError, ...)
        raise CheckpointError(f"{path}: not a file torch.save wrote, or a corrupt or truncated one (torch.load: "
                              f"{type(err).__name__} {_refusal_detail(err)}); check the path, or copy the file "
                              "again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state dict or {{'model': ...}}), got {type(obj).__name__}")
    if official_config.is_yacs_config(obj.get("config")):  # the official trainer's, not a run's settings: renamed
        obj["official_config"] = official_config.plain_config(obj.pop("config"))
    return obj


@contextlib.contextmanager
def _allowing(classes: list):
    """``torch.serialization.safe_globals(classes)``; torch 2.4 has only the process-wide list, which is put back
    as it was afterwards."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(classes):
            yield
        return
    before = list(torch.serialization.get_safe_globals())  # a copy: torch 2.5 hands out its own list
    torch.serialization.add_safe_globals(classes)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# The first bytes of files that get passed for checkpoints, and what they are.
_OTHER_FILES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x1f\x8b", "a gzip archive"),
                (b"version https://git-lfs", "a Git LFS pointer to it: fetch the file itself (git lfs pull)"),
                (b"<", "a web page (a download link that returned HTML?): download the file itself"),
                (b"{", "a JSON file"))


def _other_kind_of_file(path: Path) -> str | None:
    """What ``path`` is when its first bytes show a known kind of file that torch.save never writes (its files start
    with a zip header, or a pickle's 0x80); None otherwise, and torch.load's error says what is wrong."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file: load it with safetensors.torch.load_file and torch.save the dict it returns"
    return next((kind for start, kind in _OTHER_FILES if head.lstrip().startswith(start)), None)


def _is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip with ``constants.pkl`` in its folder (torch's own test for one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip (a legacy torch.save, or damaged): torch.load will say
        return False


def _first_damaged_record(path: Path) -> str | None:
    """The first record of a torch.save zip archive whose bytes fail their CRC-32, None if all pass (or the file
    is no zip: a legacy torch.save has no checksums). A record with CRC 0 is skipped: torch.save writes 0 when
    ``torch.serialization.set_crc32_options(False)`` turned the checksums off."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return None
    with archive:
        for record in archive.infolist():
            try:
                with archive.open(record) as data:  # the reader compares the CRC at the end of the record
                    while record.CRC and data.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                return record.filename
    return None


def _refusal_detail(err: Exception) -> str:
    """What torch refused (an unknown opcode, a global such as ``os.system``), without its advice to retry with
    ``weights_only=False``: wrong for a corrupt file, dangerous for a tampered one."""
    text = " ".join(str(err).split())
    if "WeightsUnpickler error:" in text:
        text = text.rsplit("WeightsUnpickler error:", 1)[1]
    elif "Trying to load" in text:
        text = text[text.index("Trying to load"):]
    for advice in ("Please use", "Check the documentation", "Re-running"):
        text = text.split(advice, 1)[0]
    return text.strip()


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` through :func:`atomic_write`: a failed save leaves the old file intact."""
    path = Path(path)
    with atomic_write(path) as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:  # torch reports a failed write as "unexpected pos ..."; the OSError says why
            raise (writer.error or err) from None
    return path


class _RecordingWriter:
    """A file that remembers the OSError of a failed ``write``, which torch's zip writer swallows."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def non_finite_keys(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [key for key, value in state_dict.items()
            if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]


def shown_keys(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_entry(checkpoint: dict) -> str | None:
    """The key of ``checkpoint`` that holds the weights (the first of ``_NESTED_KEYS`` whose dict holds a tensor),
    None for a bare state dict."""
    return next((key for key in _NESTED_KEYS if isinstance(checkpoint.get(key), dict)
                 and any(isinstance(value, Tensor) for value in checkpoint[key].values())), None)


def extract_state_dict(checkpoint: dict, whole_model: bool = False) -> dict[str, Tensor]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}``; strip ``module.``, ``_orig_mod.`` and mmdet ``backbone.``
    prefixes.

    From an mmdet/mmseg checkpoint only the ``backbone.*`` entries are kept (the neck and heads belong to
    the detector or segmenter, not to AS-MLP), unless ``whole_model``: the weights are for a model that has a
    ``backbone`` of its own (a detector or segmenter of this package), and every key stays.
    """
    entry = state_dict_entry(checkpoint)
    sd = checkpoint if entry is None else checkpoint[entry]
    others = [k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if len(others) == len(sd):
        raise CheckpointError("no state dict found: expected tensors keyed by parameter name, possibly under "
                              f"one of {_NESTED_KEYS}; top-level keys were {sorted(checkpoint, key=str)[:10]}")
    if others:
        where = f"its {entry!r}" if entry else "the state dict"
        raise CheckpointError(f"{where} holds {len(sd) - len(others)} tensors and {len(others)} other entries: "
                              + ", ".join(f"{k!r} ({type(sd[k]).__name__})" for k in others[:5])
                              + "; a state dict holds only tensors keyed by name: delete those entries and save it")
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}  # DataParallel, torch.compile
    if not whole_model and any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


_MISMATCHES_SHOWN = 4  # another width mismatches every tensor: the width line and a few say it


@dataclass
class LoadReport:
    """What :func:`load_official_checkpoint` did, key by key."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model)
    skipped: list[str] = field(default_factory=list)
    entry: str | None = None   # the checkpoint's key that held the weights ("model", "state_dict_ema", ...)
    note: str = ""             # what else the file says about itself, for an error message

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        return self.text("loaded")

    def text(self, verb: str) -> str:
        """The report with ``verb`` ("loaded", or "would load" in a refusal) before the count."""
        lines = [f"{verb} {len(self.loaded)} tensors" + (f" (from the file's {self.entry!r})" if self.entry else "")]
        if self.skipped:
            lines.append(f"skipped on request ({len(self.skipped)}): {', '.join(self.skipped)}")
        for name, keys in (("missing from checkpoint", self.missing), ("unexpected in checkpoint", self.unexpected)):
            if keys:
                lines.append(f"{name} ({len(keys)}): {shown_keys(keys)}")
        widths = next(((got[0], want[0]) for key, got, want in self.mismatched if key == "patch_embed.proj.weight"),
                      None)
        if widths:
            lines.append("width: embed_dim is {} in the checkpoint, {} in the model".format(*widths))
        for key, got, want in self.mismatched[:_MISMATCHES_SHOWN]:
            lines.append(f"shape mismatch: {key}: checkpoint {got}, model {want}")
        if len(self.mismatched) > _MISMATCHES_SHOWN:
            lines.append(f"... and {len(self.mismatched) - _MISMATCHES_SHOWN} more shape mismatches")
        return "\n".join(lines)


def load_official_checkpoint(model: nn.Module, checkpoint, strict: bool = True,
                             skip_head: bool = False) -> LoadReport:
    """Load official (or project) AS-MLP weights into ``model``; returns a :class:`LoadReport`.

    ``checkpoint``: a path, a loaded checkpoint dict or a state dict. With ``strict=True`` any missing,
    unexpected or wrongly shaped key raises :class:`CheckpointError` listing them, and the model is left
    untouched. ``skip_head=True`` ignores ``head.*`` (fine-tuning with another number of classes).
    With ``strict=False`` the matching tensors are loaded and the rest reported, e.g. an ImageNet
    checkpoint into a ``features_only`` backbone (``norm0..3`` missing, ``norm``/``head`` unexpected).
    """
    report, source = _match(model, checkpoint, skip_head)
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__} (strict=True):\n"
                              f"{report.text('would load')}\n{report.note}Check the variant and features_only; "
                              "skip_head=True for a new head, strict=False loads what fits. Nothing was loaded.")
    if not any(not _BACKBONE_ENDS.match(k) for k in report.loaded):  # strict=False: not even one block fits
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: none of its blocks match (another "
                              f"variant, or weights of another model):\n{report.text('would load')}\n{report.note}"
                              "Nothing was loaded.")
    _copy_loaded(model, source, report)
    return report


def _match(model: nn.Module, checkpoint, skip_head: bool) -> tuple[LoadReport, dict]:
    """Compare a checkpoint with ``model.state_dict()`` key by key; nothing is copied yet."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    target = model.state_dict()
    source = extract_state_dict(checkpoint, whole_model=any(k.startswith("backbone.") for k in target))
    _check_shift_size(model, checkpoint)
    skipped = sorted(k for k in set(source) | set(target) if k.startswith("head.")) if skip_head else []
    report = compare_state_dicts(source, target, skipped)
    report.entry, report.note = state_dict_entry(checkpoint), _run_note(checkpoint)
    broken = non_finite_keys({k: source[k] for k in report.loaded})
    if broken:  # refused before anything is copied: the model stays as it was
        raise CheckpointError(f"the checkpoint's weights are damaged: {len(broken)} tensor(s) hold NaN or inf: "
                              f"{shown_keys(broken)}. Nothing was loaded; use another (or an earlier) checkpoint.")
    return report, source


def _check_shift_size(model: nn.Module, checkpoint: dict) -> None:
    """No tensor shape tells the shift size, so weights loaded into a model with another shift would compute other
    features without any error: where the file names its shift (:func:`_saved_shift_size`), the model must have it."""
    saved = _saved_shift_size(checkpoint)
    ours = {m.shift_size for m in model.modules() if isinstance(getattr(m, "shift_size", None), int)}
    if saved is not None and ours and ours != {saved}:
        shifts = ", ".join(map(str, sorted(ours)))
        raise CheckpointError(f"the checkpoint's config says shift_size={saved}, this model shifts by {shifts}: "
                              "the weights would load and compute other features; build the model with "
                              f"shift_size={saved} (the official AS-MLP-S detection and segmentation files are "
                              "named 'shift5' and use 3). Nothing was loaded.")


def _saved_shift_size(checkpoint: dict) -> int | None:
    """The shift size the file's network used: an official file's config states it (official_config.py), and so
    does this package's run config, where None means the variant's own (3 for a seg AS-MLP-S, as official)."""
    from .engine.runs import is_run_checkpoint  # the engine saves through this module: imported when needed
    stated = official_config.stated_shift_size(checkpoint)
    if stated is not None:
        return stated
    cfg = checkpoint.get("config") if is_run_checkpoint(checkpoint) else None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("shift_size") is not None:
        return cfg["shift_size"]
    from .backbone import MODEL_CONFIGS
    from .segmentation import variant_setting  # imports this module
    return variant_setting(cfg["model"], "shift_size", cfg.get("task")) if cfg.get("model") in MODEL_CONFIGS else None


def _run_note(checkpoint: dict) -> str:
    """For a training run's checkpoint of this package: the settings that rebuild its model."""
    from .engine.runs import is_run_checkpoint
    if not is_run_checkpoint(checkpoint):
        return ""
    cfg = checkpoint.get("config", {})
    return (f"This is a training run's checkpoint ({cfg.get('task')} {cfg.get('model')}, embed_dim "
            f"{cfg.get('embed_dim')}, depths {cfg.get('depths')}): 'from asmlp_min.engine import load_trained', then "
            "'model, cfg, _ = load_trained(path)' rebuilds its model.\n")


def compare_state_dicts(source: dict[str, Tensor], target: dict[str, Tensor], skipped: list[str] = ()) -> LoadReport:
    """Key by key: which of ``target``'s tensors ``source`` has with the same shape (loaded), lacks (missing) or has
    with another shape (mismatched), and which of its keys ``target`` lacks (unexpected); ``skipped`` keys are
    left out of all four."""
    report = LoadReport(skipped=list(skipped))
    for key, want in target.items():
        if key in report.skipped:
            continue
        if key not in source:
            report.missing.append(key)
        elif source[key].shape != want.shape:
            report.mismatched.append((key, tuple(source[key].shape), tuple(want.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in source if k not in target and k not in report.skipped]
    return report


def _copy_loaded(model: nn.Module, source: dict, report: LoadReport) -> None:
    target = model.state_dict()
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(source[key])


def load_backbone_checkpoint(model: nn.Module, checkpoint, skip_head: bool = False,
                             name: str = "this backbone") -> LoadReport:
    """``load_official_checkpoint(strict=False)`` for pretrained backbones: the trunk (``patch_embed``, ``layers``)
    must match key for key; only its ends may differ, since a classifier has ``norm`` and ``head`` and a dense
    backbone one ``norm{i}`` per output (an ImageNet checkpoint lacks those). Anything else, a checkpoint that matches
    nothing or tensors of the wrong shape, is another variant: :class:`CheckpointError` naming ``name``, and the
    model is left untouched."""
    report, source = _match(model, checkpoint, skip_head)
    trunk = [k for k in report.missing + report.unexpected if not _BACKBONE_ENDS.match(k)]
    if report.mismatched or trunk or not report.loaded:  # refused before anything is copied
        example = f" (e.g. {shown_keys(trunk, 4)} in one and not the other)" if trunk else ""
        raise CheckpointError(f"backbone checkpoint does not fit {name}: it is another variant, with a different "
                              f"number of blocks per stage or another width{example}:\n{report.text('would load')}\n"
                              f"{report.note}Check the variant (mobile/tiny/small/base) and settings such as depths "
                              "and embed_dim; nothing was loaded.")
    _copy_loaded(model, source, report)
    return report


# a classifier's final norm and head, a dense backbone's per-output norms: the parts one may have and the other not
_BACKBONE_ENDS = re.compile(r"(head|norm\d*)\.")
