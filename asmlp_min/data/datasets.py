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

import os
import re
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

from ..checks import InputWarning
from . import ade20k
# The COCO JSON gate has its own module; its public names stay importable from here.
from .coco_json import ANNOTATION_RULES, coco_index, load_coco, polygons_of, read_json, validate_coco  # noqa: F401
from .images import IMAGE_EXTENSIONS, is_image_file, load_image
from .rle import annotation_mask

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
            empty = re.search(r"Found no valid file for the classes (.+)\. (?:Supported extensions|$)", str(err))
            if empty:  # a folder's name may hold ". " itself ("St. Bernard")
                raise ValueError(f"{root}: class folder(s) {empty[1]} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
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

def training_annotations(coco: COCO, source: str) -> dict[int, list[dict]]:
    """{image id: the annotations to train on}: boxes of width or height <= 0 are skipped and polygons of fewer than
    3 points dropped, as detectron2 loads COCO (real COCO has a few of each); one warning counts each kind. An
    annotation left with no polygon (or written ``[[]]``) keeps its box, without a mask, as a box-only ``[]``.
    Evaluation keeps them all, as COCOeval does."""
    kept, degenerate, short_polygons = defaultdict(list), 0, 0
    for ann in coco.dataset["annotations"]:
        if ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            degenerate += 1
            continue
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            drawn = [polygon for polygon in segmentation if polygon]   # [[]]: a box-only export's [], not a short one
            polygons = polygons_of(drawn)
            short_polygons += len(polygons) < len(drawn)
            if len(polygons) < len(segmentation):
                ann = {**ann, "segmentation": polygons}
        kept[ann["image_id"]].append(ann)
    if degenerate:
        warnings.warn(f"{source}: skipped {degenerate} annotation(s) whose 'bbox' has zero or negative width/height "
                      "(for training; evaluation keeps them)", InputWarning, stacklevel=3)
    if short_polygons:
        warnings.warn(f"{source}: dropped polygons of fewer than 3 points from {short_polygons} annotation(s); "
                      "those left with no polygon keep their box, without a mask (for training; evaluation keeps "
                      "them)", InputWarning, stacklevel=3)
    return kept


class CocoDetection(Dataset):
    """COCO instances: images in ``image_root`` named by ``file_name``, annotations in ``ann_file``.

    Returns (image, target) as described in the module docstring; ``labels`` are the COCO
    ``category_id``s (COCO 2017: 80 ids in 1..90, with gaps), ``image_id`` is the COCO image id, so
    predictions can go straight to ``metrics.coco_evaluate(dataset.coco, ...)``: ``coco`` is the whole ground
    truth, while targets leave out what ``training_annotations`` skips. ``masks`` are present when every
    annotation of the image has a ``segmentation`` (polygons or RLE; ``[]``, ``[[]]`` or only polygons of fewer than
    3 points are none): Mask R-CNN needs them in every target, so give it no box-only annotations. ``with_masks=False``
    decodes none, for a box detector (as mmdet's ``LoadAnnotations(with_bbox=True)``): 200 polygons on a 2000x1500
    photo are 572 MiB of masks.

    ``contiguous_labels=True`` numbers the categories 1..K instead, in the order of their ids, as mmdet's and
    detectron2's COCO loaders do: a detector then has K classes, not the largest id, and predicts no id that
    is not a category. ``category_ids[label - 1]`` is a label's category id again, for COCO results. Without it,
    a category id 0 (Roboflow's first) is refused: label 0 is the detectors' background.
    """

    def __init__(self, image_root: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, contiguous_labels: bool = False, with_masks: bool = True):
        self.image_root, self.ann_file, self.with_masks = Path(image_root), Path(ann_file), with_masks
        if not self.image_root.is_dir():
            raise ValueError(f"{image_root}: image folder not found")
        self.coco = load_coco(ann_file, require_file_name=True)
        self.annotations = training_annotations(self.coco, str(ann_file))
        self.category_ids = sorted(self.coco.cats)
        if not contiguous_labels and self.category_ids[0] == 0:
            raise ValueError(f"{ann_file}: category id 0 ({self.coco.cats[0]['name']!r}) would be label 0, the "
                             "detectors' background: use contiguous_labels=True (labels 1..K)")
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
        if self.with_masks and all(a.get("segmentation") for a in anns):
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

    Masks are single-channel PNGs of class ids: 8-bit (mode L or P), 16-bit (I;16, or I) or 1-bit. An image and
    its mask share a name (the extensions' case aside); two images of one name are refused, masks without an image
    warned about. ``reduce_zero_label=True`` follows mmseg for ADE20K, where 0 means "unlabelled": 0 -> 255
    (ignored) and every other id moves down by one, so the 150 ADE20K classes become 0..149. After that, values must
    be in [0, ``num_classes``) or 255, so ``num_classes`` is at most 255 (254 with ``reduce_zero_label``, where file
    value 255 stays 255). Returns (image, mask) with mask (h, w) int64.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", num_classes: int = 150,
                 reduce_zero_label: bool = True, transform: Callable | None = None):
        self.root, self.num_classes, self.reduce_zero_label = Path(root), num_classes, reduce_zero_label
        most = 254 if reduce_zero_label else 255
        if not 1 <= num_classes <= most:
            raise ValueError(f"num_classes must be in 1..{most} with reduce_zero_label={reduce_zero_label}, got "
                             f"{num_classes}: mask value 255 marks unlabelled pixels (ignored by the loss and mIoU), "
                             f"so it cannot also be class {most}")
        image_dir, mask_dir = self.root / "images" / split, self.root / "annotations" / split
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise ValueError(f"{image_dir} or {mask_dir}: folder not found (see data/README.md)")
        images = _by_stem((p for p in image_dir.iterdir() if is_image_file(p)), "images")
        if not images:
            raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        masks = _by_stem((p for p in mask_dir.iterdir() if is_image_file(p) and p.suffix.lower() == ".png"), "masks")
        missing = [str(mask_dir / f"{stem}.png") for stem in images if stem not in masks]
        if missing:
            other = next((p for p in mask_dir.iterdir() if p.stem == Path(missing[0]).stem and is_image_file(p)), None)
            found = f"; {other.name} is there, but masks must be PNG (lossy formats change class ids)" if other else ""
            raise ValueError(f"{len(missing)} image(s) have no mask, e.g. {missing[0]}{found}")
        unused = [str(path) for stem, path in masks.items() if stem not in images]
        if unused:
            warnings.warn(f"{len(unused)} mask(s) have no image ({', '.join(IMAGE_EXTENSIONS)}) and are not used, "
                          f"e.g. {unused[0]}", InputWarning, stacklevel=2)
        self.images = list(images.values())                  # sorted by path
        self.masks = [masks[p.stem] for p in self.images]
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
                if png.format in ("JPEG", "MPO"):  # JPEG data named .png: compression noise would be read as labels
                    raise ValueError(f"{mask_path}: mask is JPEG data, not PNG; its lossy compression changes class "
                                     "ids at every edge: save the masks as PNG from the original labels")
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
        first = int(self.reduce_zero_label)                  # the file value of class 0
        ignored = (mask == 255) | ((mask == 0) & bool(first))  # checked before the shift: 256 must not become 255
        bad = np.unique(mask[((mask < first) | (mask >= self.num_classes + first)) & ~ignored])  # < 0: a mode I file
        if len(bad):
            raise ValueError(f"{mask_path}: mask values {bad[:5].tolist()} are outside {first}.."
                             f"{self.num_classes - 1 + first} (num_classes={self.num_classes}, reduce_zero_label="
                             f"{self.reduce_zero_label}) and not ignored ({'0 and ' * first}255)")
        return self.transform(image, tv_tensors.Mask(torch.from_numpy(np.where(ignored, 255, mask - first))))


def _by_stem(paths, what: str) -> dict[str, Path]:
    """{file name without extension: path}; two files of one name are an error, since they would share a pair."""
    found = {}
    for path in sorted(paths):
        if path.stem in found:
            raise ValueError(f"{found[path.stem]} and {path}: two {what} named {path.stem!r}, and an image and its "
                             "mask are paired by name; rename or remove one")
        found[path.stem] = path
    return found
