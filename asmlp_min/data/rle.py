"""COCO masks as run-length encodings (RLE), read and written with pycocotools.

An RLE ``{"size": [h, w], "counts": ...}`` lists alternating runs of 0s and 1s down the columns (Fortran order),
starting with 0s. ``counts`` is either a list of ints (COCO's ground truth for crowds) or pycocotools' compressed
string (results files, our own exports). pycocotools trusts the runs: if they cover fewer than h * w pixels,
``decode`` leaves the rest of the mask as uninitialised memory (values up to 255), so the runs are checked here
before anything is decoded.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from ..checks import is_int


def mask_to_rle(mask) -> dict:
    """(h, w) bool/uint8 mask -> compressed COCO RLE with a JSON-ready ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def run_lengths(counts: str | bytes) -> list[int]:
    """The runs of pycocotools' compressed ``counts`` string (``rleFrString`` in its maskApi.c).

    Each run is a signed integer in 5-bit groups, least significant first, one group per character (value + 48);
    bit 0x20 says another group follows, bit 0x10 of the last group is the sign. From the fourth run on, the string
    holds the difference to the run two before it."""
    runs, value, groups = [], 0, 0
    for byte in counts.encode("ascii") if isinstance(counts, str) else counts:
        code = byte - 48
        value |= (code & 0x1F) << (5 * groups)
        groups += 1
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << (5 * groups)
        runs.append(value + runs[-2] if len(runs) > 2 else value)
        value, groups = 0, 0
    return runs


def check_runs(segmentation: dict, where: str) -> None:
    """Raise ValueError unless the RLE's runs are ints >= 0 that cover its ``size`` h x w exactly."""
    size, counts = segmentation["size"], segmentation["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(s) and s >= 0 for s in size)):
        raise ValueError(f"{where} RLE 'size' must be [height, width], ints >= 0; got {size!r}")
    if isinstance(counts, (str, bytes)):
        runs = run_lengths(counts)
    elif isinstance(counts, list) and all(map(is_int, counts)):
        runs = counts
    else:
        raise ValueError(f"{where} RLE 'counts' must be a list of ints or pycocotools' compressed string; "
                         f"got {str(counts)[:80]}")
    if any(run < 0 for run in runs) or sum(runs) != size[0] * size[1]:
        raise ValueError(f"{where} RLE 'counts' are runs of {sum(runs)} pixels (smallest run {min(runs, default=0)}) "
                         f"but its 'size' {size[0]}x{size[1]} has {size[0] * size[1]}: the mask is corrupt; "
                         "re-export it (pycocotools.mask.encode) or drop the annotation")


def annotation_mask(segmentation: list | dict, height: int, width: int, where: str) -> np.ndarray:
    """(h', w') uint8 mask of polygons or an RLE, as ``COCO.annToMask`` but at the size of the decoded image, which
    the JSON need not give; an RLE is decoded at its own ``size`` (h', w'). A list of runs was checked with the
    JSON (``validate_coco``); a compressed string is checked here, when its image is read, since unpacking every
    string of a large dataset up front would take seconds per 10,000 masks."""
    if isinstance(segmentation, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
    if isinstance(segmentation["counts"], list):       # runs as a list: pycocotools compresses them first
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    check_runs(segmentation, where)
    return mask_utils.decode(segmentation)
