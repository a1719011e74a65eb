"""What official checkpoints state about their network, read without running the official code.

- mmdet / mmseg files keep their config as Python text in ``meta["config"]``; :func:`stated_shift_size` reads the
  backbone's ``shift_size`` there.
- The official classification trainer (svip-lab/AS-MLP ``utils.save_checkpoint``, Swin's) stores its yacs
  ``CfgNode`` in every ``ckpt_epoch_N.pth`` beside the weights. ``torch.load(weights_only=True)`` refuses classes
  it does not know, and yacs need not be installed: :data:`SAFE_GLOBALS` lets the loader build each CfgNode as an
  ``OrderedDict`` of its keys and values (yacs' own flags land as attributes), and no yacs code runs.
  ``checkpoint.load_checkpoint`` keeps it, as nested dicts (:func:`plain_config`), under ``official_config``.
- mmcv's ``EvalHook(save_best=...)`` stores the best score in ``meta["hook_msgs"]["best_score"]``, for mmseg a
  numpy float64. :data:`SAFE_GLOBALS` also holds numpy's scalar constructor, under numpy 2's module name and
  numpy 1's (the files are from numpy 1), and the dtypes it is called with: it builds a number from its bytes.
"""
from __future__ import annotations

import re
from collections import OrderedDict


class _CfgNodeAsDict:
    """What the unpickler makes of ``yacs.config.CfgNode``: an empty OrderedDict, filled by the pickle's items."""

    def __new__(cls, *args):
        return OrderedDict()


# torch's weights-only unpickler allows a class by its module and name, so the stand-in takes yacs' (every torch
# from 2.4 on; the (class, name) pair form came only with torch 2.6)
_CfgNodeAsDict.__module__, _CfgNodeAsDict.__name__, _CfgNodeAsDict.__qualname__ = "yacs.config", "CfgNode", "CfgNode"


def _numpy_scalar_globals() -> list:
    """numpy's ``scalar(dtype, bytes)`` under the module name this numpy gives it and under the other one (numpy 1
    ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``), ``numpy.dtype`` and its numeric dtype classes."""
    import numpy as np
    scalar = np.dtype("f8").type(0).__reduce__()[0]     # the function a numpy scalar pickles as
    renamed = {"numpy.core.multiarray": "numpy._core.multiarray"}
    renamed.update({b: a for a, b in renamed.items()})

    def other_scalar(*args):
        return scalar(*args)
    other_scalar.__module__, other_scalar.__name__ = renamed[scalar.__module__], "scalar"
    other_scalar.__qualname__ = "scalar"
    return [scalar, other_scalar, np.dtype, *{type(np.dtype(code)) for code in np.typecodes["AllFloat"]
                                              + np.typecodes["AllInteger"] + "?"}]


# a CfgNode keeps its deprecated keys in a set, which torch 2.4 refuses by itself
SAFE_GLOBALS = [_CfgNodeAsDict, set, *_numpy_scalar_globals()]


def is_yacs_config(value) -> bool:
    """A CfgNode read through :data:`SAFE_GLOBALS`: an OrderedDict carrying yacs' ``__immutable__`` flag."""
    return isinstance(value, OrderedDict) and "__immutable__" in vars(value)


def plain_config(value):
    """Nested dicts of plain values, the yacs flags left behind."""
    return {key: plain_config(item) for key, item in value.items()} if isinstance(value, dict) else value


def stated_shift_size(checkpoint: dict) -> int | None:
    """The shift size an official file states: ``shift_size=`` in an mmdet/mmseg ``meta["config"]``, or
    ``MODEL.ASMLP.SHIFT_SIZE`` in the official trainer's config; None where it states none."""
    meta = checkpoint.get("meta")
    text = meta.get("config") if isinstance(meta, dict) else None
    found = re.search(r"\bshift_size\s*=\s*(\d+)", text) if isinstance(text, str) else None
    if found:
        return int(found[1])
    model = checkpoint.get("official_config", {}).get("MODEL", {})
    asmlp = model.get("ASMLP") if isinstance(model, dict) else None
    return asmlp.get("SHIFT_SIZE") if isinstance(asmlp, dict) else None
