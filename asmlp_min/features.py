"""What the backbone gives besides logits, in timm's terms: which stage maps it returns (:class:`FeatureInfo`,
:func:`take_indices`, :func:`out_indices_tuple`) and how the classifier pools the final map (:class:`GlobalPool`).

timm itself is not needed: these follow ``timm.models.FeatureInfo``, ``feature_take_indices`` and
``SelectAdaptivePool2d``, and tests/test_timm.py checks them side by side with timm's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureInfo(list):
    """timm's ``feature_info``: one dict per stage (all of them, as ``len`` and iteration show), ``num_chs``,
    ``reduction`` (stride), ``module`` (the submodule whose output the map is, for ``create_feature_extractor`` or
    a hook) and ``index``, plus the stages a model returns, ``out_indices``.

    As in ``timm.models.FeatureInfo``: without an index the accessors (``channels()``, ``reduction()``,
    ``module_name()``, ``get_dicts()``) list the ``out_indices`` stages; ``channels(i)`` is stage i's, whether or
    not it is returned, and a list of indices gives those stages.
    """

    def __init__(self, info: list[dict], out_indices: tuple[int, ...]):
        super().__init__(dict(entry, index=i) for i, entry in enumerate(info))
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: tuple[int, ...]) -> "FeatureInfo":
        return FeatureInfo([dict(entry) for entry in self], out_indices)

    def get(self, key: str, idx: int | list[int] | None = None):
        found = self.get_dicts([key], idx)
        return found[key] if isinstance(found, dict) else [entry[key] for entry in found]

    def get_dicts(self, keys: list[str] | None = None, idx: int | list[int] | None = None):
        pick = (lambda entry: entry) if keys is None else (lambda entry: {k: entry[k] for k in keys})
        if idx is None or isinstance(idx, (list, tuple)):
            return [pick(self[i]) for i in (self.out_indices if idx is None else idx)]
        return pick(self[idx])

    def channels(self, idx: int | list[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | list[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | list[int] | None = None):
        return self.get("module", idx)


POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


class GlobalPool(nn.Module):
    """timm's ``global_pool`` choices: (b, c, h, w) -> (b, c) for ``"avg"`` (the paper's), ``"max"`` and
    ``"avgmax"`` (their mean), (b, 2c) for ``"catavgmax"`` (both, concatenated); ``""`` keeps the map."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.pool_type:
            return x
        avg = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.pool_type == "avg":
            return avg
        peak = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        if self.pool_type == "max":
            return peak
        return 0.5 * (avg + peak) if self.pool_type == "avgmax" else torch.cat([avg, peak], dim=1)


def take_indices(num_stages: int, indices: int | list[int] | None) -> tuple[list[int], int]:
    """timm's ``indices``: None -> every stage, n -> the last n, a list -> those (negatives count from the end);
    returns (those stages as numbers 0..num_stages-1, the largest)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num_stages} stages")
        return list(range(num_stages - indices, num_stages)), num_stages - 1
    take = [i % num_stages for i in indices if -num_stages <= i < num_stages]
    if not take or len(take) != len(indices):
        raise ValueError(f"indices must be stage numbers in [-{num_stages}, {num_stages - 1}], got {list(indices)}")
    return take, max(take)


def out_indices_tuple(out_indices: int | tuple[int, ...] | slice | None, num_stages: int) -> tuple[int, ...]:
    """``features_only``'s ``out_indices`` as sorted, distinct stage numbers 0..num_stages-1: None means every stage,
    a slice picks from them (``slice(1, None)``: all but the first, whatever the depth), an int n the last n."""
    if out_indices is None:
        out_indices = slice(None)
    if isinstance(out_indices, slice):
        out_indices = tuple(range(num_stages))[out_indices]
    elif isinstance(out_indices, int):
        out_indices = tuple(range(-out_indices, 0))  # timm: n means the last n stages
    indices = tuple(i % num_stages if -num_stages <= i < num_stages else None for i in out_indices)
    if not indices or None in indices or len(set(indices)) != len(indices):
        raise ValueError(f"out_indices must be distinct stages in [-{num_stages}, {num_stages - 1}], got {out_indices}")
    return tuple(sorted(indices))
