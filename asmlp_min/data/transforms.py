"""``torchvision.transforms.v2`` pipelines for the three tasks, train and eval.

Inputs are what the datasets hand over: a uint8 ``tv_tensors.Image`` or a PIL image, plus for detection a
target dict of ``tv_tensors`` (``BoundingBoxes``, ``Mask``) and for segmentation a ``Mask``. Because the
targets are ``tv_tensors``, every flip, resize and crop moves boxes and masks with the pixels, and
masks are resampled with nearest neighbour.

- classification, as in the paper (timm data config): train RandomResizedCrop (bicubic) + flip; eval
  resize the short side to ``int(size * 256 / 224)`` (bicubic), centre crop ``size``; ImageNet mean/std.
- detection: flip, and with ``size`` a random resized crop; boxes are then re-fitted to their masks (when
  there are masks) and ``SanitizeBoundingBoxes`` drops those cut to nothing, with their labels, masks, area,
  iscrowd. Images stay in [0, 1] by default: torchvision detectors normalise inside the model.
- segmentation, as mmseg's ADE20K pipeline: random rescale to fit 0.5-2x the scale (4 size, size), random crop
  padded with 255 (ignored), flip, photometric distortion (without a channel permutation); ImageNet mean/std.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import InterpolationMode, v2

from ..backbone import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD


def eval_resize_size(size: int) -> int:
    """Short side before the centre crop: int(size * 256 / 224), i.e. 256 for 224."""
    return int(size / EVAL_CROP_PCT)


def _to_float(normalize: bool) -> list[v2.Transform]:
    ops = [v2.ToDtype(torch.float32, scale=True)]
    return ops + [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else ops


def classification_transforms(train: bool, size: int = 224) -> v2.Compose:
    """image -> (3, size, size) float32, ImageNet-normalised."""
    if train:
        ops = [v2.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
               v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(eval_resize_size(size), interpolation=InterpolationMode.BICUBIC, antialias=True),
               v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *ops, *_to_float(normalize=True)])


def _sanitize_labels(inputs) -> tuple:
    """Everything SanitizeBoundingBoxes must filter with the boxes (it finds masks by itself)."""
    target = inputs[1]
    return tuple(target[key] for key in ("labels", "area", "iscrowd") if key in target)


class BoxesFromMasks(v2.Transform):
    """Set each box to the pixel-edge extent of its mask (an emptied mask gets a zero box, which
    SanitizeBoundingBoxes then drops). After a crop, the clipped box of a rotated shape is larger than
    what is left of the shape; the mask knows better."""

    def forward(self, image, target):
        if target.get("masks") is None or len(target["masks"]) == 0:
            return image, target
        masks = target["masks"].bool()
        present = masks.flatten(1).any(1)
        boxes = torch.zeros(len(masks), 4)
        boxes[present] = masks_to_boxes(masks[present]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        return image, {**target, "boxes": tv_tensors.wrap(boxes, like=target["boxes"])}


def detection_transforms(train: bool, size: int | None = None, scale: tuple[float, float] = (0.5, 1.0),
                         normalize: bool = False) -> v2.Compose:
    """(image, target) -> (float image, target). size: output side of the train crop / eval resize
    (None keeps the input size); scale: crop area range relative to the image."""
    ops: list[v2.Transform] = [v2.ToImage()]
    if train:
        ops.append(v2.RandomHorizontalFlip())
        if size is not None:
            ops.append(v2.RandomResizedCrop(size, scale=scale, antialias=True))
        ops += [v2.ClampBoundingBoxes(), BoxesFromMasks(),
                v2.SanitizeBoundingBoxes(labels_getter=_sanitize_labels)]
    elif size is not None:
        ops.append(v2.Resize((size, size), antialias=True))
    return v2.Compose([*ops, *_to_float(normalize)])


def segmentation_transforms(train: bool, size: int | None = None, ratio_range: tuple[float, float] = (0.5, 2.0),
                            ignore_index: int = 255) -> v2.Compose:
    """(image, mask) -> (normalised float image, int64 mask). Train needs ``size``, the crop side (``ratio_range``:
    :class:`RandomRescale`'s). Eval with ``size`` rescales the image, not the mask, to mmseg's test scale
    (:class:`RescaleToTestScale`: ADE20K's crop 512 gives (2048, 512)); the logits are then scored at the mask's own
    size. Without ``size`` eval keeps the input."""
    ops: list[v2.Transform] = [v2.ToImage()]
    if train:
        if size is None:
            raise ValueError("segmentation_transforms(train=True) needs size, the side of the random crop")
        ops += [RandomRescale(size, ratio_range),
                v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
                v2.RandomHorizontalFlip(),
                photometric_distortion()]
    elif size is not None:
        ops.append(RescaleToTestScale(size))
    return v2.Compose([*ops, *_to_float(normalize=True)])


def photometric_distortion(p: float = 0.5) -> v2.Compose:
    """mmseg's PhotoMetricDistortion steps, with the ranges of torchvision's ``RandomPhotometricDistort``: brightness,
    then contrast either before or after saturation and hue, each applied with probability ``p``. Unlike
    ``RandomPhotometricDistort`` it never permutes the channels: mmseg does not, and a swap turns a red car blue."""
    def maybe(**jitter) -> v2.RandomApply:
        return v2.RandomApply([v2.ColorJitter(**jitter)], p=p)
    contrast, colour = maybe(contrast=(0.5, 1.5)), [maybe(saturation=(0.5, 1.5)), maybe(hue=(-0.05, 0.05))]
    return v2.Compose([maybe(brightness=(0.875, 1.125)),
                       v2.RandomChoice([v2.Compose([contrast, *colour]), v2.Compose([*colour, contrast])])])


def rescaled_size(height: int, width: int, short: int | None, long: int | None) -> tuple[int, int]:
    """mmcv's ``imrescale`` to the scale (long, short), as mmdet's keep-ratio resize and mmseg's test resize use it:
    the same aspect ratio, scaled up or down until the short side is ``short`` or the long side ``long``, whichever
    comes first (None: no bound), rounded half up as mmcv rounds, at least one pixel."""
    factor = min((bound / side for bound, side in ((short, min(height, width)), (long, max(height, width)))
                  if bound is not None), default=1.0)
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RescaleToTestScale:
    """mmseg's segmentation test resize (``Resize(img_scale=(2048, 512), keep_ratio=True)`` for ADE20K): the image
    goes to :func:`rescaled_size` with ``short`` = the training crop and ``long`` = 4 x that; a mask passes
    unchanged, because mmseg scores the logits up-sampled to the image's own size (``segmentation.class_map``)."""

    def __init__(self, short: int):
        self.short, self.long = short, 4 * short

    def __call__(self, image: tv_tensors.Image, *mask):
        resized = v2.functional.resize(image, list(rescaled_size(*image.shape[-2:], self.short, self.long)),
                                       antialias=True)
        return (resized, *mask) if mask else resized


class RandomRescale:
    """mmseg's segmentation training resize (``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0),
    keep_ratio=True)`` for ADE20K): draw r uniformly from ``ratio_range``, then resize to :func:`rescaled_size` with
    ``short`` = int(r x the crop) and ``long`` = int(r x 4 x the crop), truncated as mmcv does. Both sides are
    bounded, so a panorama is not blown up by its short side. The image is resized antialiased bilinear, the mask
    nearest, to the same size."""

    def __init__(self, short: int, ratio_range: tuple[float, float]):
        self.short, self.long, self.ratio_range = short, 4 * short, ratio_range

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        ratio = torch.empty(()).uniform_(*self.ratio_range).item()
        size = list(rescaled_size(*image.shape[-2:], int(self.short * ratio), int(self.long * ratio)))
        return (v2.functional.resize(image, size, antialias=True),
                v2.functional.resize(mask, size, interpolation=InterpolationMode.NEAREST))
