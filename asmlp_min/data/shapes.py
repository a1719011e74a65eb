"""Synthetic "shapes" scenes: the embedded dataset for classification, detection and segmentation.

One seeded generator draws 1..``max_shapes`` filled shapes (``CLASSES``) on a textured, noisy background.
From the same scene come all three tasks' labels:

- classification: the *dominant* shape, i.e. the kind of the instance with the largest visible area
  (ties go to the shape drawn first);
- detection / instance segmentation: COCO annotations with ``category_id = kind + 1`` (``CATEGORIES``),
  ``bbox`` = xywh of the visible mask, RLE ``segmentation``, ``area`` = visible pixels, ``iscrowd = 0``;
- semantic segmentation: ``0`` = background, ``kind + 1`` = shape pixels (so ``NUM_SEG_CLASSES = 4``).
  The generator never writes 255, the ignore value the loaders and metrics understand.

Same seed, same bytes on any machine: randomness comes only from ``numpy.random.Generator(PCG64)`` (integers and
uniforms, no normal sampler), and all drawing is integer arithmetic. The only floating point step, ``cos``/``sin``
of the rotation, is rounded to a 1/16-pixel grid before rasterising, so a last-bit difference between math libraries
cannot move a pixel.

Difficulty (defaults, for detection and segmentation): 128x128 images; shapes 16-52 px across (circle diameter,
square side, triangle side); any colour far enough from the local background; any rotation; centres anywhere in the
image so shapes are cut by the border; later shapes occlude earlier ones. Every instance keeps at least half of its
full area visible (border cuts and occlusion together) and at least ``MIN_VISIBLE_PX`` pixels.

``whole=True`` keeps every shape entirely inside the image and unoccluded, and ``background="flat"`` draws on one
uniform grey: a cut square can look like a triangle, so a label is only well posed on whole shapes. ``CLS_SCENE`` is
that setting for a first classifier (one whole shape of 16-40 px in a 64-px image on grey).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from ..files import atomic_write
from .datasets import detection_target, to_float_image
from .rle import mask_to_rle

CLASSES = ("circle", "square", "triangle")
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
NUM_SEG_CLASSES = len(CLASSES) + 1        # background + one class per kind
SPLITS = {"train": 0, "val": 1, "test": 2}  # second word of the seed: train/val/test never share a scene
MIN_VISIBLE_PX = 64
BACKGROUNDS = ("textured", "flat")
# The well-posed classification task: one whole shape on flat grey, so the label is never ambiguous.
CLS_SCENE = dict(image_size=64, max_shapes=1, size_range=(16, 40), whole=True, background="flat")
_SUBPIXEL = 16                             # vertices live on a 1/16-pixel grid (exact integer maths)


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    image: (h, w, 3) uint8 RGB. masks: (n, h, w) bool, the *visible* part of each instance, in drawing
    order (later ones lie on top). kinds: (n,) int64 index into CLASSES. semantic: (h, w) uint8,
    0 = background, kind + 1 on the instance's visible pixels.
    """

    image: np.ndarray
    masks: np.ndarray
    kinds: np.ndarray
    semantic: np.ndarray

    @property
    def areas(self) -> np.ndarray:
        """(n,) int64 visible pixels per instance (= COCO ``area``)."""
        return self.masks.reshape(len(self.masks), -1).sum(1).astype(np.int64)

    @property
    def label(self) -> int:
        """Classification label: kind of the largest visible instance (first drawn wins ties)."""
        return int(self.kinds[int(np.argmax(self.areas))])

    @property
    def boxes_xyxy(self) -> np.ndarray:
        """(n, 4) float32 pixel-edge boxes of the visible masks: x1 = first column, x2 = last column + 1."""
        return (masks_to_boxes(torch.from_numpy(self.masks)) + torch.tensor([0.0, 0.0, 1.0, 1.0])).numpy()

    def coco_annotations(self, image_id: int, first_id: int = 1) -> list[dict]:
        """COCO ``annotations`` entries (ids first_id, first_id + 1, ...; COCOeval needs ids >= 1)."""
        anns = []
        for i, (m, kind, box, area) in enumerate(zip(self.masks, self.kinds, self.boxes_xyxy, self.areas)):
            x1, y1, x2, y2 = (int(v) for v in box)
            anns.append({
                "id": first_id + i, "image_id": int(image_id), "category_id": int(kind) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(area), "iscrowd": 0,
                "segmentation": mask_to_rle(m),
            })
        return anns


def coco_dict(scenes: Iterable[Scene], description: str = "asmlp_min shapes") -> dict:
    """Scenes as a COCO instances dict: scene i is image id i + 1, ``{i:06d}.png``; annotation ids count from 1."""
    coco = {"info": {"description": description}, "images": [], "annotations": [], "categories": CATEGORIES}
    for i, scene in enumerate(scenes):
        h, w = scene.semantic.shape
        coco["images"].append({"id": i + 1, "file_name": f"{i:06d}.png", "height": h, "width": w})
        coco["annotations"] += scene.coco_annotations(i + 1, first_id=len(coco["annotations"]) + 1)
    return coco


def scene_rng(seed: int, split: str = "train", index: int = 0) -> np.random.Generator:
    """The generator for scene ``index`` of ``split``: PCG64 seeded by SeedSequence([seed, split, index])."""
    if split not in SPLITS or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
                                  for v in (seed, index)):
        raise ValueError(f"need split in {tuple(SPLITS)}, seed and index ints >= 0; got {split!r}, {seed!r}, {index!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), SPLITS[split], int(index)])))


def make_scene(rng: np.random.Generator | int, image_size: int | tuple[int, int] = 128, max_shapes: int = 4,
               size_range: tuple[int, int] = (16, 52), noise: int = 16, whole: bool = False,
               background: str = "textured") -> Scene:
    """Draw one scene. ``rng`` is a Generator or an int seed (same as ``scene_rng(seed)``).

    image_size: int or (h, w). max_shapes: 1..max_shapes instances. size_range: inclusive shape
    extent in pixels. noise: per-pixel uniform noise amplitude (0..255) added over everything.
    whole: every shape lies entirely inside the image and nothing covers it (a shape that does not fit
    is not drawn; the first always fits when size_range[1] <= min(h, w) - 2). background: "textured"
    (colour field + stripes) or "flat" (one grey level per scene).
    """
    if not isinstance(rng, np.random.Generator):
        rng = scene_rng(rng)
    h, w = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
    lo, hi = size_range
    fits = not whole or 2 * _whole_margin(hi) <= min(h, w) * _SUBPIXEL   # whole shapes fit at any rotation
    if not (min(h, w) >= 16 and max_shapes >= 1 and 4 <= lo <= hi and 0 <= noise <= 255 and background in BACKGROUNDS
            and fits):
        raise ValueError(f"need image_size >= 16, max_shapes >= 1, 4 <= size_range[0] <= size_range[1] (whole=True: <= "
                         f"(min(image_size) - 2) / sqrt(2)), 0 <= noise <= 255, background in {BACKGROUNDS}; got "
                         f"{image_size}, {max_shapes}, {size_range}, {noise}, {background!r}")
    if background == "textured":
        canvas = _background(rng, h, w)
    else:
        canvas = np.full((h, w, 3), int(rng.integers(64, 193)), np.int32)
    instance_map = np.zeros((h, w), np.int32)             # 0 = background, k = k-th placed instance
    full_px, visible, kinds, colours = [], [], [], []
    n_shapes = int(rng.integers(1, max_shapes + 1))
    for _ in range(20 * n_shapes):                        # rejection sampling, bounded so it always ends
        if len(kinds) == n_shapes:
            break
        kind = int(rng.integers(len(CLASSES)))
        size = int(rng.integers(lo, hi + 1))
        margin = _whole_margin(size) if whole else 0
        centre = rng.integers(margin, (w * _SUBPIXEL - margin, h * _SUBPIXEL - margin), endpoint=True)
        angle = float(rng.random()) * 2 * math.pi
        inside, (y0, y1, x0, x1), full = _rasterise(kind, size, centre, angle, h, w)
        region = instance_map[y0:y1, x0:x1]
        covered = np.bincount(region[inside], minlength=len(kinds) + 1)[1:]   # pixels the new shape hides
        trial_visible = np.array(visible + [int(inside.sum())]) - np.append(covered, 0)
        needed = np.array(full_px + [full]) if whole else np.maximum(np.array(full_px + [full]) / 2, MIN_VISIBLE_PX)
        if (trial_visible < needed).any():
            continue
        region[inside] = len(kinds) + 1
        full_px.append(full)
        visible = trial_visible.tolist()
        kinds.append(kind)
        colours.append(_shape_colour(rng, canvas[y0:y1, x0:x1][inside]))
    masks = instance_map[None] == np.arange(1, len(kinds) + 1)[:, None, None]
    kinds_arr = np.array(kinds, np.int64)
    palette = np.array([[0, 0, 0]] + colours, np.int32)
    image = np.where(instance_map[..., None] > 0, palette[instance_map], canvas)
    image += rng.integers(-noise, noise + 1, (h, w, 3), dtype=np.int32)
    semantic = np.concatenate([[0], kinds_arr + 1]).astype(np.uint8)[instance_map]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), masks, kinds_arr, semantic)


def _whole_margin(size: int) -> int:
    """Distance (1/16 px) a whole shape's centre keeps from the border: the largest reach of any kind at any
    angle (the square's half diagonal, size / sqrt(2) < size * 181/256) plus one pixel for rounding."""
    return (size * _SUBPIXEL * 181) // 256 + _SUBPIXEL


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) int32: a smooth colour field (bilinear over a 4x4 grid) plus faint stripes."""
    grid = rng.integers(0, 256, (4, 4, 3)).astype(np.int32)
    ys = np.arange(h) * 3 * 1024 // max(h - 1, 1)         # fixed-point positions on the grid, 1/1024 steps
    xs = np.arange(w) * 3 * 1024 // max(w - 1, 1)
    yi, xi = np.minimum(ys // 1024, 2), np.minimum(xs // 1024, 2)
    fy, fx = (ys - yi * 1024)[:, None, None], (xs - xi * 1024)[None, :, None]
    rows = grid[:, xi] * (1024 - fx) + grid[:, xi + 1] * fx                    # along x: (4, w, 3)
    smooth = (rows[yi] * (1024 - fy) + rows[yi + 1] * fy) // (1024 * 1024)   # < 2^31: int32 is exact
    dx, dy = rng.integers(-2, 3, 2)
    period, amplitude = int(rng.integers(4, 13)), int(rng.integers(0, 33))
    y, x = np.ogrid[:h, :w]
    stripes = ((x * dx + y * dy) // period) % 2 * amplitude
    return smooth + stripes[..., None].astype(np.int32)


def _shape_colour(rng: np.random.Generator, under: np.ndarray) -> list[int]:
    """A random RGB colour at least 150 (L1) away from the mean background under the shape, when possible."""
    mean = under.mean(0) if len(under) else np.full(3, 128.0)
    for _ in range(16):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() >= 150:
            break
    return [int(c) for c in colour]


def _rasterise(kind: int, size: int, centre: np.ndarray, angle: float, h: int, w: int):
    """Pixels whose centre lies inside the shape, on the integer 1/16-pixel grid.

    Returns (inside, window, full): inside is a bool mask over the image-clipped window
    (y0, y1, x0, x1), full the pixel count of the whole shape including any part off the image.
    """
    cx, cy = int(centre[0]), int(centre[1])
    s = size * _SUBPIXEL
    if CLASSES[kind] == "circle":
        reach = s // 2
    else:
        if CLASSES[kind] == "square":
            corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            offsets = [(x * s / 2, y * s / 2) for x, y in corners]
        else:                                              # equilateral triangle, centroid at the centre
            radius = s / math.sqrt(3)
            offsets = [(radius * math.cos(2 * math.pi * k / 3), radius * math.sin(2 * math.pi * k / 3))
                       for k in range(3)]
        c, si = math.cos(angle), math.sin(angle)
        verts = [(cx + round(x * c - y * si), cy + round(x * si + y * c)) for x, y in offsets]
        reach = max(max(abs(vx - cx), abs(vy - cy)) for vx, vy in verts)
    # whole-shape window in pixels (may extend past the image), then pixel centres on the 1/16 grid
    gx0, gx1 = (cx - reach) // _SUBPIXEL - 1, (cx + reach) // _SUBPIXEL + 2
    gy0, gy1 = (cy - reach) // _SUBPIXEL - 1, (cy + reach) // _SUBPIXEL + 2
    py = (np.arange(gy0, gy1) * _SUBPIXEL + _SUBPIXEL // 2)[:, None]
    px = (np.arange(gx0, gx1) * _SUBPIXEL + _SUBPIXEL // 2)[None, :]
    if CLASSES[kind] == "circle":
        inside = (px - cx) ** 2 + (py - cy) ** 2 <= reach ** 2
    else:
        inside = np.ones((len(py), px.shape[1]), bool)
        orient = _cross(verts[0], verts[1], verts[2][0], verts[2][1]) > 0
        for a, b in zip(verts, verts[1:] + verts[:1]):
            cross = _cross(a, b, px, py)
            inside &= (cross >= 0) if orient else (cross <= 0)
    full = int(inside.sum())
    y0, y1, x0, x1 = max(gy0, 0), min(gy1, h), max(gx0, 0), min(gx1, w)
    clipped = inside[y0 - gy0:max(y1 - gy0, y0 - gy0), x0 - gx0:max(x1 - gx0, x0 - gx0)]
    return clipped, (y0, max(y1, y0), x0, max(x1, x0)), full


def _cross(a, b, px, py):
    """z of (b - a) x (p - a): > 0 when p is left of a->b. Integers in, integers out (exact)."""
    return (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0])


# ---------------------------------------------------------------- export to real on-disk formats

def export_shapes(root: str | os.PathLike, task: str = "det", n: int = 64, split: str = "train", seed: int = 0,
                  image_size: int = 128, **scene_kwargs) -> Path:
    """Write scenes 0..n-1 of ``split`` in the on-disk format of ``task`` and return the path to load.

    task="cls": ImageFolder tree ``root/{split}/{class}/{i:06d}.png``; returns ``root/{split}``.
    task="det": COCO ``root/{split}/{i:06d}.png`` + ``root/annotations/instances_{split}.json``
    (image ids i + 1, annotation ids from 1); returns the JSON path (images are in ``root/{split}``).
    task="seg": ADE20K-style ``root/images/{split}/{i:06d}.png`` + ``root/annotations/{split}/{i:06d}.png``
    with 0 = background, kind + 1 = shape (load with ``reduce_zero_label=False, num_classes=4``);
    returns ``root``.
    Every file is written to a temporary name and renamed, so an interrupted run leaves no partial
    file. A re-run keeps the files that already exist (identical by determinism); a hidden
    ``root/.shapes-{task}-{split}.json`` records seed and scene settings, and a re-run with different
    ones is refused rather than mixing two datasets in one folder.
    """
    if task not in ("cls", "det", "seg"):
        raise ValueError(f"task must be 'cls', 'det' or 'seg', got {task!r}")
    scene = _ShapesDataset(n, seed, split, image_size, **scene_kwargs).scene  # checks n, seed, split before the disk
    root = Path(root)
    _check_manifest(root / f".shapes-{task}-{split}.json",
                    {"seed": seed, "image_size": image_size, "scene_kwargs": scene_kwargs})
    if task == "cls":
        out = root / split
        existing = {p.name for p in out.glob("*/*.png")}
        for i in range(n):
            if f"{i:06d}.png" not in existing:
                s = scene(i)
                save_png(s.image, out / CLASSES[s.label] / f"{i:06d}.png")
        return out
    if task == "seg":
        for i in range(n):
            image_path = root / "images" / split / f"{i:06d}.png"
            mask_path = root / "annotations" / split / f"{i:06d}.png"
            if not (image_path.exists() and mask_path.exists()):
                s = scene(i)
                save_png(s.image, image_path)
                save_png(s.semantic, mask_path)
        return root
    ann_file = root / "annotations" / f"instances_{split}.json"
    images = [root / split / f"{i:06d}.png" for i in range(n)]
    if ann_file.exists() and all(p.exists() for p in images) and len(json.loads(ann_file.read_text())["images"]) == n:
        return ann_file

    def saved_scene(i: int) -> Scene:
        s = scene(i)
        if not images[i].exists():
            save_png(s.image, images[i])
        return s

    _write_json(coco_dict(map(saved_scene, range(n)), f"asmlp_min shapes, split {split}, seed {seed}"), ann_file)
    return ann_file


def _check_manifest(path: Path, settings: dict) -> None:
    """Refuse to add scenes made with other settings to a folder (they would silently mix)."""
    settings = json.loads(json.dumps(settings))             # the form it takes once stored (tuples -> lists)
    if not path.exists():
        _write_json(settings, path)
    elif (stored := json.loads(path.read_text())) != settings:
        raise ValueError(f"{path.parent} already holds shapes made with {stored}, not {settings}; export to another "
                         "folder or delete this one")


def save_png(array: np.ndarray, path: Path) -> None:
    """(h, w) or (h, w, 3) uint8 -> a PNG file, written all or nothing (:func:`asmlp_min.files.atomic_write`)."""
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def _write_json(obj, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def scenes(n: int, seed: int = 0, split: str = "train", **scene_kwargs) -> Sequence[Scene]:
    """The first ``n`` scenes of a split, as a list (handy for figures and tests)."""
    return [make_scene(scene_rng(seed, split, i), **scene_kwargs) for i in range(n)]


# ---------------------------------------------------------------- torch Datasets, generated on the fly

class _ShapesDataset(Dataset):
    """Scene ``i`` of ``split`` is ``make_scene(scene_rng(seed, split, i))``: cheap, so nothing is cached."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", image_size: int = 128,
                 transform: Callable | None = None, **scene_kwargs):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        scene_rng(seed, split)                              # validates seed and split now, not in a worker
        self.n, self.seed, self.split, self.image_size = n, seed, split, image_size
        self.scene_kwargs = scene_kwargs
        self.transform = transform or to_float_image

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        return make_scene(scene_rng(self.seed, self.split, index % self.n), self.image_size, **self.scene_kwargs)

    @staticmethod
    def _image(scene: Scene) -> tv_tensors.Image:
        return tv_tensors.Image(torch.from_numpy(scene.image).permute(2, 0, 1).contiguous())


class ShapesClassification(_ShapesDataset):
    """(image, label): image (3, h, w) float in [0, 1] without a transform; label = CLASSES index of the dominant
    shape (largest visible area). ``**CLS_SCENE`` gives the scenes ``train cls`` uses: one whole shape each."""

    classes = CLASSES

    def __getitem__(self, index: int):
        scene = self.scene(index)
        return self.transform(self._image(scene)), scene.label


class ShapesDetection(_ShapesDataset):
    """(image, target), torchvision style: boxes (n, 4) float32 xyxy of the visible masks, labels (n,) int64
    COCO category ids (= CLASSES index + 1; 0 is left for background), masks (n, h, w) uint8,
    image_id = index + 1 (as in ``export_shapes`` and ``coco_dict``), area (n,) float32 visible pixels,
    iscrowd (n,) int64 zeros."""

    classes = CLASSES

    def __getitem__(self, index: int):
        scene = self.scene(index)
        target = detection_target(scene.boxes_xyxy, scene.kinds + 1, scene.masks, index % self.n + 1,
                                  scene.areas, np.zeros(len(scene.kinds)), scene.semantic.shape)
        return self.transform(self._image(scene), target)

    def coco_dict(self) -> dict:
        """The ground truth as a COCO instances dict, for ``metrics.coco_evaluate``."""
        return coco_dict(map(self.scene, range(self.n)), f"asmlp_min shapes, split {self.split}, seed {self.seed}")


class ShapesSegmentation(_ShapesDataset):
    """(image, mask): mask (h, w) int64, 0 = background, CLASSES index + 1 for shapes (NUM_SEG_CLASSES = 4)."""

    classes = ("background",) + CLASSES

    def __getitem__(self, index: int):
        scene = self.scene(index)
        mask = tv_tensors.Mask(torch.from_numpy(scene.semantic.astype(np.int64)))
        return self.transform(self._image(scene), mask)
