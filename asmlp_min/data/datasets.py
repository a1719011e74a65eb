"""Loaders for the real on-disk formats: ImageFolder (ImageNet), COCO instances (COCO 2017), ADE20K-style masks.

Every dataset here, and the synthetic ones in ``shapes.py``, returns the same things:

- classification: ``(image, label)``, label = class index (ImageFolder: sorted folder names);
- detection: ``(image, target)`` with torchvision-style ``target = {"boxes": (n, 4) float32 xyxy
  BoundingBoxes, "labels": (n,) int64 COCO category ids (or 1..K), "masks": (n, h, w) uint8, "image_id": int,
  "area": (n,) float32, "iscrowd": (n,) int64}``;
- segmentation: ``(image, mask)``, mask (h, w) int64 class ids, 255 = ignore.

Without a ``transform`` the image is a (3, h, w) float32 tensor in [0, 1]. With one, the transform gets a
uint8 ``tv_tensors.Image`` (and the target), so ``torchvision.transforms.v2`` pipelines (``transforms.py``)
move boxes and masks along with the pixels.

Bad files raise ``ValueError`` naming the file and the field at fault, before anything is trained on them.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from ..checks import is_finite_number, is_int
from . import ade20k
from .images import IMAGE_EXTENSIONS, is_image_file, load_image
from .rle import annotation_mask, check_runs

to_float_image = v2.ToDtype(torch.float32, scale=True)    # images only; targets pass through untouched


def detection_target(boxes_xyxy, labels, masks, image_id: int, area, iscrowd,
                     canvas_size: tuple[int, int]) -> dict:
    """The torchvision detection target dict, with tv_tensors so v2 transforms move boxes and masks."""
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
                                          format="XYXY", canvas_size=canvas_size),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        "image_id": int(image_id),
        "area": torch.as_tensor(area, dtype=torch.float32).reshape(-1),
        "iscrowd": torch.as_tensor(iscrowd, dtype=torch.int64).reshape(-1),
    }
    if masks is not None:
        target["masks"] = tv_tensors.Mask(torch.as_tensor(masks, dtype=torch.uint8).reshape(-1, *canvas_size))
    return target


def detection_collate(batch: list[tuple]) -> tuple[list, list]:
    """Detection batches stay lists: images differ in size and targets in length."""
    return tuple(map(list, zip(*batch)))


# ---------------------------------------------------------------- classification

class ImageFolderClassification(tv_datasets.ImageFolder):
    """ImageNet-style tree ``root/<class name>/<image>``; labels are indices of the sorted class names.

    Unlike torchvision's ImageFolder, hidden folders and files (a name starting with "."), such as Jupyter's
    ``.ipynb_checkpoints`` copies or macOS's ``._`` files, are left out, as ``ls`` leaves them out: torchvision
    would make ``.ipynb_checkpoints`` a class. Photos are turned upright as their EXIF orientation says, as
    ``predict`` shows them: a class has no boxes drawn on the stored pixels."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        try:
            super().__init__(str(root), transform=transform or to_float_image, loader=partial(load_image, upright=True),
                             is_valid_file=self._is_image)
        except OSError as err:          # torchvision's wording for a missing folder, a file, or an empty class
            empty = str(err).partition("Found no valid file for the classes ")[2].split(". ")[0]
            if empty:
                raise ValueError(f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                 "add images or remove the folder(s)") from err
            raise ValueError(f"{root}: no images found ({err}); expected root/<class name>/<image>.jpg") from err

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    def _is_image(self, path: str) -> bool:
        folders = Path(os.path.relpath(path, self.root)).parts[:-1]
        return is_image_file(path) and not any(folder.startswith(".") for folder in folders)


# ---------------------------------------------------------------- COCO detection / instance segmentation

def validate_coco(dataset: dict, source: str, require_file_name: bool = False, require_size: bool = False) -> dict:
    """Check a COCO instances dict field by field; return a copy that keeps every annotation, as COCOeval does.

    Raises ValueError naming ``source`` and the field for: a missing ``images``/``categories`` list, an empty
    ``categories``, a category without ``name`` or with ``id`` < 1, image or annotation ids that are not unique
    ints, an annotation field that breaks ``ANNOTATION_RULES``, ``segmentation`` neither polygons (``[]``: box
    only) nor RLE, an RLE ``size`` other than its image's ``height``/``width``, a list of RLE runs that does not
    cover that size (``rle.check_runs``; compressed strings are checked when decoded), an image without ``file_name``
    (``require_file_name``, for datasets that read the pixels) or without ``height``/``width``
    (``require_size``, for evaluating masks). No annotations at all warns that AP will be -1. Missing ``iscrowd``
    defaults to 0, missing ``area`` to the box area, and a missing ``info`` to ``{}`` (pycocotools 2.0.9 and
    2.0.10 need it to evaluate). Degenerate boxes and polygons are kept: only training skips them
    (``CocoDetection``).
    """
    for field in ("images", "annotations", "categories"):
        value = dataset.get(field, [] if field == "annotations" else None) if isinstance(dataset, dict) else None
        if not isinstance(value, list) or (field == "categories" and not value):
            raise ValueError(f"{source}: field '{field}' is empty or not a list (see the COCO instances format)")
    _unique_ids(dataset["images"], "images", source)
    images = {image["id"]: image for image in dataset["images"]}
    for i, image in enumerate(dataset["images"]):
        where = f"{source}: images[{i}] (id={image['id']})"
        if require_file_name and not isinstance(image.get("file_name"), str):
            raise ValueError(f"{where} needs a 'file_name' string (the image file)")
        if require_size and not all(is_int(image.get(key)) and image[key] >= 1 for key in ("height", "width")):
            raise ValueError(f"{where} needs 'height' and 'width' (ints >= 1) to evaluate masks, the size they are "
                             f"compared at; got {image.get('height')!r} x {image.get('width')!r}")
    category_ids = _unique_ids(dataset["categories"], "categories", source)
    for i, category in enumerate(dataset["categories"]):
        if category["id"] < 1 or not isinstance(category.get("name"), str):
            raise ValueError(f"{source}: categories[{i}] needs a 'name' string and field 'id'={category['id']} must be "
                             ">= 1 (COCO category ids start at 1; the detector predicts 1..K)")
    annotations = dataset.get("annotations", [])
    if not annotations:
        warnings.warn(f"{source}: no annotations: AP will be -1 (undefined) because there are no objects to find",
                      stacklevel=3)
    _unique_ids(annotations, "annotations", source)
    return {"info": {}, **dataset, "annotations": _checked_annotations(annotations, images, category_ids, source)}


# What each annotation field must be: (field, value when absent, test, requirement). COCOeval reads an
# annotation id of 0 as "unmatched", and would silently score a NaN box or a label that is no category.
ANNOTATION_RULES = (
    ("id", None, lambda v, ctx: is_int(v) and v >= 1, ">= 1: COCOeval uses 0 to mean 'unmatched'"),
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
    Coordinates are not checked one by one (COCO has millions). The RLE ``size`` [height, width] is compared when
    the image gives its ``height`` and ``width``: else the masks of one image could not be stacked."""
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
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


def training_annotations(coco: COCO, source: str) -> dict[int, list[dict]]:
    """{image id: the annotations to train on}, as detectron2 loads COCO: boxes of width or height <= 0 are
    skipped, polygons of fewer than 3 points dropped, and an annotation left with no polygon skipped (real COCO has
    a few of each); one warning counts each kind. Evaluation keeps them all, as COCOeval does."""
    kept, degenerate, short_polygons = defaultdict(list), 0, 0
    for ann in coco.dataset["annotations"]:
        if ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            degenerate += 1
            continue
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and segmentation:
            polygons = polygons_of(segmentation)
            if len(polygons) < len(segmentation):
                short_polygons += 1
                if not polygons:
                    continue
                ann = {**ann, "segmentation": polygons}
        kept[ann["image_id"]].append(ann)
    if degenerate:
        warnings.warn(f"{source}: skipped {degenerate} annotation(s) whose 'bbox' has zero or negative width/height "
                      "(for training; evaluation keeps them)", stacklevel=3)
    if short_polygons:
        warnings.warn(f"{source}: dropped polygons of fewer than 3 points from {short_polygons} annotation(s); "
                      "those left with no polygon were skipped (for training; evaluation keeps them)", stacklevel=3)
    return kept


class CocoDetection(Dataset):
    """COCO instances: images in ``image_root`` named by ``file_name``, annotations in ``ann_file``.

    Returns (image, target) as described in the module docstring; ``labels`` are the COCO
    ``category_id``s (COCO 2017: 80 ids in 1..90, with gaps), ``image_id`` is the COCO image id, so
    predictions can go straight to ``metrics.coco_evaluate(dataset.coco, ...)``: ``coco`` is the whole ground
    truth, while targets leave out what ``training_annotations`` skips. ``masks`` are present when every
    annotation of the image has a ``segmentation`` (polygons or RLE; ``[]`` is none).

    ``contiguous_labels=True`` numbers the categories 1..K instead, in the order of their ids, as mmdet's and
    detectron2's COCO loaders do: a detector then has K classes, not the largest id, and predicts no id that
    is not a category. ``category_ids[label - 1]`` is a label's category id again, for COCO results.
    """

    def __init__(self, image_root: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, contiguous_labels: bool = False):
        self.image_root, self.ann_file = Path(image_root), Path(ann_file)
        if not self.image_root.is_dir():
            raise ValueError(f"{image_root}: image folder not found")
        self.coco = load_coco(ann_file, require_file_name=True)
        self.annotations = training_annotations(self.coco, str(ann_file))
        self.category_ids = sorted(self.coco.cats)
        self.label_of = ({c: i + 1 for i, c in enumerate(self.category_ids)} if contiguous_labels
                         else {c: c for c in self.category_ids})
        self.ids = sorted(self.coco.imgs)
        if not self.ids:
            raise ValueError(f"{ann_file}: field 'images' is empty")
        self.transform = transform or to_float_image

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        info = self.coco.imgs[self.ids[index]]
        path = self.image_root / info["file_name"]
        image = load_image(path)
        h, w = image.shape[-2:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"{path}: image is {h}x{w} but {self.ann_file} says 'height'x'width' = {info}; a common "
                             "cause is a phone JPEG stored rotated with an EXIF orientation tag, which is not applied "
                             "here (as in torchvision): save the pixels upright or fix the JSON")
        anns = self.annotations.get(info["id"], [])
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        masks = None
        if all(a.get("segmentation") for a in anns):
            with warnings.catch_warnings():              # pycocotools' decode trips a numpy 2 DeprecationWarning
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                masks = [annotation_mask(a["segmentation"], h, w, f"{self.ann_file}: annotation id={a['id']}")
                         for a in anns]
            wrong = next((a for a, mask in zip(anns, masks) if mask.shape != (h, w)), None)
            if wrong is not None:  # validate_coco compares RLE sizes only with a JSON 'height'/'width'
                raise ValueError(f"{path}: annotation id={wrong['id']} is an RLE of 'size' "
                                 f"{wrong['segmentation']['size']} but the image is {h}x{w} (height x width)")
            masks = np.stack(masks) if anns else np.zeros((0, h, w), np.uint8)
        target = detection_target(boxes, [self.label_of[a["category_id"]] for a in anns], masks, info["id"],
                                  [a["area"] for a in anns], [a["iscrowd"] for a in anns], (h, w))
        return self.transform(image, target)


# ---------------------------------------------------------------- ADE20K-style semantic segmentation

MASK_MODES = ("L", "P", "I;16", "I", "1")  # one channel of integers; some Pillow versions read 16-bit PNGs as I


class ADE20KSegmentation(Dataset):
    """ADE20K layout: ``root/images/<split>/<name>.jpg|png`` and ``root/annotations/<split>/<name>.png``.

    Masks are single-channel PNGs of class ids: 8-bit (mode L or P), 16-bit (I;16, or I) or 1-bit.
    ``reduce_zero_label=True`` follows mmseg for ADE20K, where 0 means "unlabelled": 0 -> 255 (ignored) and every
    other id moves down by one, so the 150 ADE20K classes become 0..149. After that, values must be in
    [0, ``num_classes``) or 255. Returns (image, mask) with mask (h, w) int64.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", num_classes: int = 150,
                 reduce_zero_label: bool = True, transform: Callable | None = None):
        self.root, self.num_classes, self.reduce_zero_label = Path(root), num_classes, reduce_zero_label
        image_dir, mask_dir = self.root / "images" / split, self.root / "annotations" / split
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise ValueError(f"{image_dir} or {mask_dir}: folder not found (see data/README.md)")
        self.images = sorted(p for p in image_dir.iterdir() if is_image_file(p))
        if not self.images:
            raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.masks = [mask_dir / (p.stem + ".png") for p in self.images]
        missing = [str(m) for m in self.masks if not m.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) have no mask, e.g. {missing[0]}")
        self.transform = transform or to_float_image

    @property
    def classes(self) -> list[str]:
        """Name of each class index: ADE20K's own for its 150 classes, else the class's id in the mask files."""
        if self.reduce_zero_label and self.num_classes == len(ade20k.CLASSES):
            return list(ade20k.CLASSES)
        return [str(k + self.reduce_zero_label) for k in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, mask_path = load_image(self.images[index]), self.masks[index]
        try:
            with Image.open(mask_path) as png:
                if png.mode not in MASK_MODES:
                    raise ValueError(f"{mask_path}: mask must be a single-channel PNG of class ids (mode "
                                     f"{', '.join(MASK_MODES)}), got mode {png.mode}")
                mask = np.array(png, dtype=np.int64)
        except OSError as err:
            raise ValueError(f"{mask_path}: unreadable or truncated mask ({err})") from err
        if mask.shape != tuple(image.shape[-2:]):
            raise ValueError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but image is "
                             f"{image.shape[-2]}x{image.shape[-1]} (height x width); if the image is a photo with an "
                             "EXIF orientation tag, the mask must match its stored pixels (the tag is not applied)")
        if self.reduce_zero_label:
            mask = np.where(mask == 0, 255, mask - 1)
            mask[mask == 254] = 255                          # 255 stays ignore after the shift
        bad = np.unique(mask[((mask >= self.num_classes) | (mask < 0)) & (mask != 255)])   # < 0: from a mode I file
        if len(bad):
            raise ValueError(f"{mask_path}: mask values {bad[:5].tolist()} are >= num_classes={self.num_classes} or "
                             f"< 0, and not the ignore value 255 (reduce_zero_label={self.reduce_zero_label})")
        return self.transform(image, tv_tensors.Mask(torch.from_numpy(mask)))
