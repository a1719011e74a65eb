"""The COCO instances JSON: read it, check it field by field, index it with pycocotools.

``validate_coco`` is the one gate every COCO file or dict passes, for training (``datasets.CocoDetection``) and
for scoring (``metrics.coco_evaluate``): it names the file and the field at fault, and returns a private copy
that pycocotools scores correctly (defaults filled in, annotation ids renumbered where COCOeval would misread them).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings

from pycocotools.coco import COCO

from ..checks import InputWarning, is_finite_number, is_int
from .rle import check_runs


def validate_coco(dataset: dict, source: str, require_file_name: bool = False, require_size: bool = False) -> dict:
    """Check a COCO instances dict field by field; return a copy that keeps every annotation, as COCOeval does.

    Raises ValueError naming ``source`` and the field for: a missing ``images``/``categories`` list, an empty
    ``categories``, a category without ``name`` or with ``id`` < 0 (COCO's start at 1, Roboflow's at 0), image or
    category ids that are not unique ints, an annotation field that breaks ``ANNOTATION_RULES``, ``segmentation``
    neither polygons (``[]``: box only) nor RLE, an RLE ``size`` other than its image's ``height``/``width``, a list
    of RLE runs that does not cover that size (``rle.check_runs``; compressed strings are checked when decoded), an
    image without ``file_name`` (``require_file_name``, for datasets that read the pixels), an image ``height`` or
    ``width`` that is not an int >= 1 (or missing, with ``require_size``, for evaluating masks). No annotations at
    all warns that AP will be -1. Missing ``iscrowd`` defaults to 0, missing ``area`` to the box area, and a missing
    ``info`` to ``{}`` (pycocotools 2.0.9 and 2.0.10 need it to evaluate). Degenerate boxes and polygons are kept:
    only training skips them (``CocoDetection``). Annotation ids that are not unique and >= 1 (id 0, repeats) are
    renumbered 1..N in file order: COCOeval reads a ground-truth id 0 as "unmatched" and looks annotations up by id
    (results never name them).
    """
    for field in ("images", "annotations", "categories"):
        value = dataset.get(field, [] if field == "annotations" else None) if isinstance(dataset, dict) else None
        if not isinstance(value, list) or (field == "categories" and not value):
            raise ValueError(f"{source}: field '{field}' is empty or not a list (see the COCO instances format)")
    _unique_ids(dataset["images"], "images", source)
    images = {image["id"]: image for image in dataset["images"]}
    for i, image in enumerate(dataset["images"]):
        where = f"{source}: images[{i}] (id={image['id']})"
        if require_file_name and not (isinstance(image.get("file_name"), str) and image["file_name"]):
            raise ValueError(f"{where} needs a 'file_name' string (the image file), got {image.get('file_name')!r}")
        size = [image.get(key) for key in ("height", "width")]
        if (require_size and None in size) or not all(v is None or (is_int(v) and v >= 1) for v in size):
            needed = " to evaluate masks, the size they are compared at" if require_size else ""
            raise ValueError(f"{where} needs 'height' and 'width' as ints >= 1{needed}; got {size[0]!r} x {size[1]!r}")
    category_ids = _unique_ids(dataset["categories"], "categories", source)
    for i, category in enumerate(dataset["categories"]):
        if category["id"] < 0 or not isinstance(category.get("name"), str):
            raise ValueError(f"{source}: categories[{i}] needs a 'name' string and field 'id'={category['id']} must be "
                             ">= 0 (COCO category ids start at 1, Roboflow's at 0)")
    annotations = dataset.get("annotations", [])
    if not annotations:
        warnings.warn(f"{source}: no annotations: AP will be -1 (undefined) because there are no objects to find",
                      InputWarning, stacklevel=3)
    checked = _checked_annotations(annotations, images, category_ids, source)
    ids = [ann["id"] for ann in checked]
    if min(ids, default=1) < 1 or len(set(ids)) < len(ids):
        checked = [{**ann, "id": k} for k, ann in enumerate(checked, 1)]
    return {"info": {}, **dataset, "annotations": checked}


# What each annotation field must be: (field, value when absent, test, requirement). COCOeval would silently
# score a NaN box or a label that is no category.
ANNOTATION_RULES = (
    ("id", None, lambda v, ctx: is_int(v), "an int"),
    ("image_id", None, lambda v, ctx: is_int(v) and v in ctx["images"], "an int, the id of an entry in 'images'"),
    ("category_id", None, lambda v, ctx: is_int(v) and v in ctx["categories"], "the id of an entry in 'categories'"),
    ("bbox", None, lambda v, ctx: isinstance(v, list) and len(v) == 4 and all(map(is_finite_number, v)),
     "[x, y, width, height] finite numbers"),
    ("iscrowd", 0, lambda v, ctx: is_int(v) and v in (0, 1), "0 or 1"),
    ("area", 0, lambda v, ctx: is_finite_number(v) and v >= 0, "a finite number >= 0 (pixels)"),
)


def _checked_annotations(annotations: list, images: dict, category_ids: set, source: str) -> list:
    """Copies of the annotations, each checked against ``ANNOTATION_RULES``, with absent ``iscrowd``/``area`` filled."""
    context = {"images": images, "categories": category_ids}
    checked = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ValueError(f"{source}: annotations[{i}] must be an object of fields (id, image_id, bbox, ...), got "
                             f"{json.dumps(ann)[:80]}")
        where = f"{source}: annotations[{i}] (id={ann.get('id')})"
        for field, absent, test, requirement in ANNOTATION_RULES:
            if not test(ann.get(field, absent), context):
                raise ValueError(f"{where} field '{field}' must be {requirement}, got {ann.get(field)!r}")
        if "segmentation" in ann:
            _check_segmentation(ann["segmentation"], images[ann["image_id"]], where)
        width, height = ann["bbox"][2:]
        checked.append({"iscrowd": 0, "area": float(max(width, 0) * max(height, 0)), **ann})
    return checked


def _check_segmentation(segmentation, image: dict, where: str) -> None:
    """A list of polygons (``[]``: no mask, as box-only exports write it) or an RLE dict as large as its image.
    The RLE ``size`` [height, width] is compared when the image gives its ``height`` and ``width``: else the masks
    of one image could not be stacked."""
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        for k, polygon in enumerate(segmentation):
            _check_polygon(polygon, f"{where} field 'segmentation' polygon {k}")
        return
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        raise ValueError(f"{where} field 'segmentation' must be a list of polygons [x1, y1, x2, y2, ...] or an RLE "
                         f"dict with 'counts' and 'size', got {str(segmentation)[:80]}")
    size, expected = segmentation["size"], [image.get("height"), image.get("width")]
    if None not in expected and not (isinstance(size, (list, tuple)) and list(size) == expected):
        raise ValueError(f"{where} field 'segmentation' is an RLE of 'size' {size!r} (height, width), but image "
                         f"id={image['id']} ({image.get('file_name')}) is {expected[0]}x{expected[1]}")
    if isinstance(segmentation["counts"], list):       # a sum per mask; strings are checked when decoded
        check_runs(segmentation, f"{where} field 'segmentation':")


POLYGON_LIMIT = 100_000  # pixels, beyond any image's size: pycocotools rasterises at 5x in 32-bit ints, edge by edge


def _check_polygon(polygon: list, where: str) -> None:
    """Every coordinate a finite number within ``POLYGON_LIMIT``: pycocotools crashes the process on a NaN, an
    infinity or 1e9 (a JSON ``null`` or a unit mix-up). The checks run in C (``math.fsum``, ``min``, ``max``); only
    a polygon that fails them is read number by number, to name the culprit."""
    try:
        inside = math.isfinite(math.fsum(polygon)) and -POLYGON_LIMIT <= min(polygon, default=0) <= max(
            polygon, default=0) <= POLYGON_LIMIT
    except (TypeError, ValueError, OverflowError):  # None or a string; inf - inf; a sum past 1e308
        inside = False
    if not inside:
        k, bad = next((k, v) for k, v in enumerate(polygon) if not is_finite_number(v) or abs(v) > POLYGON_LIMIT)
        raise ValueError(f"{where}: number {k} is {json.dumps(bad)}; every x, y must be a finite number between "
                         f"-{POLYGON_LIMIT:,} and {POLYGON_LIMIT:,} (pixels): fix or drop this polygon")


def polygons_of(segmentation: list) -> list:
    """The polygons of >= 3 points (an even count of >= 6 numbers): pycocotools cannot rasterise the others."""
    return [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]


def _unique_ids(entries: list, field: str, source: str) -> set:
    """The entries' ``id``s, checked to be ints (not bools) and unique."""
    ids = set()
    for i, entry in enumerate(entries):
        value = entry.get("id") if isinstance(entry, dict) else None
        if not is_int(value) or value in ids:
            raise ValueError(f"{source}: {field}[{i}] field 'id' must be an int and no duplicate, got {value!r}")
        ids.add(value)
    return ids


def coco_index(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` over an already validated dict, without its "creating index..." prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``, read as UTF-8 (the JSON standard's encoding), whatever the locale's encoding."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:          # JSONDecodeError, or UnicodeDecodeError for a file in another encoding
        raise ValueError(f"{path}: not valid JSON ({err}); JSON files are UTF-8 text") from err


def load_coco(ann_file: str | os.PathLike, require_file_name: bool = False, require_size: bool = False) -> COCO:
    """Read, validate (``validate_coco``) and index a COCO instances JSON, without pycocotools' prints."""
    return coco_index(validate_coco(read_json(ann_file), str(ann_file), require_file_name, require_size))
