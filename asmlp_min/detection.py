"""Object detection on AS-MLP (paper Sec. 4.2): a small anchor-free detector, and the paper's Mask R-CNN.

``SimpleFPNDetector`` is FCOS (Tian et al., ICCV 2019; head, targets and losses in ``fcos.py``) on an
AS-MLP + FPN body (``dense_backbone.py``, ``fpn.py``):

    images: list of (3, h_i, w_i) in [0, 1] -> resize, normalise, pad to a multiple of 32 -> (b, 3, H, W)
    -> AS-MLP maps at strides 8, 16, 32 (stages 1-3) -> FPN -> P3, P4, P5 (b, d, H/s, W/s)
    -> one head shared by all levels, at every location (x, y) of every level:
         class logits (K), distances to the box sides (l, t, r, b) in pixels, centre-ness logit (1)
    train: each location learns the smallest ground-truth box that contains it, near the box centre,
           if the box's size suits the level; losses are normalised by the number of such positives:
           sigmoid focal loss (classes) + GIoU loss (boxes) + binary cross-entropy (centre-ness)
    eval:  score = sqrt(sigmoid(class) * sigmoid(centre-ness)) -> threshold -> top-k per level
           -> class-wise NMS -> boxes xyxy in the pixels of each input image.

Labels are 1..num_classes (COCO-style, 0 never used; ``asmlp-min train`` maps category ids with gaps to
1..K and back); there is no background class: a location whose K class probabilities are all low is
background. Outputs use the same labels.

``build_maskrcnn`` is the paper's setup (the official mmdet configs, svip-lab/AS-MLP-Object-Detection):
torchvision's ``MaskRCNN`` on AS-MLP with an FPN over strides 4-32 plus a max-pooled stride-64 level, 256
channels, taking mmdet-format backbone weights.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import batched_nms, clip_boxes_to_image

from .backbone import IMAGENET_MEAN, IMAGENET_STD, ASMLP
from .checkpoint import LoadReport
from .checks import InputWarning
from .data.transforms import rescaled_size
from .dense_backbone import build_backbone, freeze_stages
from .fcos import FCOSHead, assign_targets, decode_boxes, fcos_losses, fcos_regress_ranges, level_points
from .fpn import FPN


# ---------------------------------------------------------------- images and targets in, batch out

def pad_batch(images: Sequence[Tensor], size_divisible: int = 32) -> Tensor:
    """list of (3, h_i, w_i) -> (b, 3, H, W), zeros at the right/bottom; H, W multiples of ``size_divisible``."""
    h = math.ceil(max(img.shape[-2] for img in images) / size_divisible) * size_divisible
    w = math.ceil(max(img.shape[-1] for img in images) / size_divisible) * size_divisible
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for slot, img in zip(batch, images):
        slot[:, :img.shape[-2], :img.shape[-1]].copy_(img)
    return batch


def sanitize_boxes(boxes: Tensor, labels: Tensor, image_size: tuple[int, int],
                   where: str = "image") -> tuple[Tensor, Tensor]:
    """Clip xyxy ``boxes`` to the image; drop (with one warning) boxes that are empty or not finite after it."""
    h, w = image_size
    finite = boxes.isfinite().all(dim=1)
    boxes = clip_boxes_to_image(torch.where(finite[:, None], boxes, torch.zeros_like(boxes)), image_size)
    keep = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        warnings.warn(f"{where}: dropped {int((~keep).sum())} of {len(keep)} boxes that are empty after clipping "
                      f"to the {h}x{w} image (x2 <= x1, y2 <= y1, or outside it) or not finite", InputWarning,
                      stacklevel=4)
    return boxes[keep], labels[keep]


# ---------------------------------------------------------------- the detector

class SimpleFPNDetector(nn.Module):
    """FCOS-style detector on AS-MLP + FPN (see the module docstring for the data path).

    Call convention (torchvision's, the engine relies on it):
      train: ``model(images, targets)`` -> ``{"loss_cls", "loss_box", "loss_centerness"}`` (sum them);
      eval:  ``model(images)`` -> one ``{"boxes" (k, 4) xyxy, "scores" (k,), "labels" (k,)}`` per image.
    images: list of (3, h, w) float tensors in [0, 1] (sizes may differ), or a (b, 3, h, w) batch;
    targets: list of ``{"boxes" (n, 4) xyxy pixels, "labels" (n,) ids in 1..num_classes}`` (``iscrowd`` = 1
    boxes are ignored; boxes are clipped to the image, empty ones dropped with a warning).

    num_classes: K, labels 1..K (COCO 2017: 80 categories, whose ids 1..90 have gaps;
    ``CocoDetection(contiguous_labels=True)`` numbers them 1..80; shapes: 3).
    levels: backbone stages fed to the FPN (default: all but the first, 1, 2, 3 = strides 8, 16, 32); extra_levels:
    P6, P7 by stride-2 convs (FCOS on COCO: ``extra_levels=2``). regress_ranges: (lo, hi] per level for
    max(l, t, r, b); the default is FCOS's rule ``fcos_regress_ranges(strides, 8)``, for COCO-sized images
    (``min_size=800, max_size=1333``). min_size / max_size: resize rule; None keeps the input size.
    frozen_stages: see ``freeze_stages``; channels_last: NHWC memory format (faster convs on some devices).
    backbone_kwargs override the backbone config (e.g. ``embed_dim=16, depths=(1, 1, 1, 1)``, ``drop_path_rate``).
    """

    def __init__(self, backbone: str = "asmlp_tiny", num_classes: int = 90,
                 pretrained_backbone: str | os.PathLike | dict | None = None,
                 min_size: int | None = None, max_size: int | None = None, *,
                 levels: Sequence[int] | None = None, extra_levels: int = 0, fpn_channels: int = 256,
                 num_convs: int = 4, regress_ranges: Sequence[tuple[float, float]] | None = None,
                 center_sampling_radius: float = 1.5, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, frozen_stages: int = -1,
                 channels_last: bool = False, **backbone_kwargs):
        super().__init__()
        sizes_ok = all(size is None or size >= 32 for size in (min_size, max_size))
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1 or not sizes_ok:
            raise ValueError(f"need num_classes >= 1 (an int), min_size, max_size None or >= 32; got {num_classes!r}, "
                             f"{min_size}, {max_size}")
        if not (0 <= score_thresh <= 1 and 0 <= nms_thresh <= 1 and detections_per_img >= 1):
            raise ValueError(f"need score_thresh and nms_thresh in [0, 1] and detections_per_img >= 1; got "
                             f"{score_thresh}, {nms_thresh}, {detections_per_img}")
        if backbone_kwargs.get("in_chans", 3) != 3:
            raise ValueError(f"the detector takes RGB images, normalised inside with ImageNet's 3-channel mean and "
                             f"std: leave in_chans at 3, got {backbone_kwargs['in_chans']}")
        self.num_classes, self.min_size, self.max_size = num_classes, min_size, max_size
        self.center_sampling_radius, self.score_thresh = center_sampling_radius, score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.frozen_stages, self.channels_last = frozen_stages, channels_last
        levels = slice(1, None) if levels is None else levels  # FCOS's P3..: every stage of stride 8 and more
        self.backbone, self.backbone_load_report = build_backbone(
            backbone, levels, pretrained_backbone, frozen_stages, **backbone_kwargs)
        in_channels = self.backbone.feature_info.channels()  # of the out_indices maps, as in timm
        strides = self.backbone.feature_info.reduction()
        strides += [strides[-1] * 2 ** (k + 1) for k in range(extra_levels)]
        self.strides = tuple(strides)
        self.fpn = FPN(in_channels, fpn_channels, extra_levels, extra_block="conv")
        self.head = FCOSHead(fpn_channels, num_classes, self.strides, num_convs)
        ranges = fcos_regress_ranges(self.strides) if regress_ranges is None else tuple(map(tuple, regress_ranges))
        if len(ranges) != len(self.strides) or any(not lo < hi for lo, hi in ranges):
            raise ValueError(f"regress_ranges needs one (lo, hi) with lo < hi per stride {self.strides}, got {ranges}")
        self.regress_ranges = ranges
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD)[:, None, None], persistent=False)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> SimpleFPNDetector:
        super().train(mode)
        freeze_stages(self.backbone, self.frozen_stages)
        return self

    # ---- input side

    def preprocess(self, images, targets=None) -> tuple[Tensor, list[tuple[int, int]], list[tuple[int, int]], list]:
        """Resize, normalise and pad a list of images (and scale their boxes the same way).

        Returns the (b, 3, H, W) batch, the resized (h, w) of each image, the original (h, w), and targets
        as plain ``{"boxes" (n, 4), "labels" (n,) class indices 0..K-1}`` (None in eval without targets).
        """
        images = _check_images(images)
        if targets is not None and (not isinstance(targets, (list, tuple)) or len(targets) != len(images)):
            raise ValueError(f"targets must be a list with one dict per image ({len(images)}), got {targets!r:.100}")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        resized, sizes, clean = [], [], []
        for i, img in enumerate(images):
            h, w = original_sizes[i]
            new_h, new_w = rescaled_size(h, w, self.min_size, self.max_size)
            if (new_h, new_w) != (h, w):
                img = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            resized.append((img - self.image_mean) / self.image_std)
            sizes.append((new_h, new_w))
            if targets is not None:
                boxes, labels = self._check_target(targets[i], i, (h, w))
                scale = boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])
                clean.append({"boxes": boxes * scale, "labels": labels - 1})
        batch = pad_batch(resized)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes, original_sizes, clean if targets is not None else None

    def _check_target(self, target, index: int, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One target -> boxes (n, 4) float32 and labels (n,) int64 on the model's device, crowd regions left out
        (they are not objects to learn; mmdet ignores them too), clipped to the image (``sanitize_boxes``)."""
        if not isinstance(target, dict) or not {"boxes", "labels"} <= target.keys():
            raise ValueError(f"targets[{index}] must be a dict with 'boxes' (n, 4) xyxy and 'labels' (n,)")
        device = self.image_mean.device
        boxes = torch.as_tensor(target["boxes"]).as_subclass(Tensor).to(device, torch.float32)
        labels = torch.as_tensor(target["labels"]).as_subclass(Tensor).to(device)
        boxes = boxes.reshape(0, 4) if boxes.numel() == 0 else boxes
        iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros_like(labels))).to(device).reshape(-1)
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not labels.shape == boxes.shape[:1] == iscrowd.shape:
            raise ValueError(f"targets[{index}]: 'iscrowd' must be (n,) like 'labels' ({labels.numel()}), 'boxes' (n, "
                             f"4); got {tuple(iscrowd.shape)}, {tuple(labels.shape)}, {tuple(boxes.shape)}")
        if (labels.dtype.is_floating_point or labels.dtype == torch.bool
                or len(labels) and (labels.min() < 1 or labels.max() > self.num_classes)):
            raise ValueError(f"targets[{index}]: labels must be integer category ids in 1..{self.num_classes} (ids "
                             f"with gaps: CocoDetection(contiguous_labels=True)), got {labels.dtype} {labels.tolist()}")
        keep = iscrowd == 0
        if len(boxes) and min(image_size) > 8 and (boxes.abs() <= 1).all():
            warnings.warn(f"targets[{index}]: every box lies within [0, 1], as if normalised: the detector takes "
                          "boxes in pixels (xyxy) of the image as given", InputWarning)
        return sanitize_boxes(boxes[keep], labels[keep].long(), image_size, where=f"targets[{index}]")

    # ---- forward

    def forward(self, images, targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("in train mode the detector needs targets (dicts with 'boxes', 'labels'); or call .eval()")
        if not self.training:  # each image's detections as if alone: see by_size
            return by_size(_check_images(images), lambda h, w: rescaled_size(h, w, self.min_size, self.max_size),
                           self._detect)
        return self._detect(images, targets)

    def _detect(self, images, targets: list[dict] | None = None):
        batch, sizes, original_sizes, targets = self.preprocess(images, targets)
        levels = self.head(self.fpn(self.backbone(batch)))
        shapes = [cls.shape[-2:] for cls, _, _ in levels]
        # losses and NMS in float32 even under autocast (bf16 GIoU and sigmoids lose small boxes)
        cls_logits = torch.cat([rearrange(c, "b k h w -> b (h w) k") for c, _, _ in levels], dim=1).float()
        ltrb = torch.cat([rearrange(d, "b f h w -> b (h w) f") for _, d, _ in levels], dim=1).float()
        ctr_logits = torch.cat([rearrange(c, "b 1 h w -> b (h w)") for _, _, c in levels], dim=1).float()
        points = torch.cat([level_points(h, w, s, batch.device) for (h, w), s in zip(shapes, self.strides)])
        if self.training:
            return self.losses(cls_logits, ltrb, ctr_logits, points, shapes, targets)
        counts = [h * w for h, w in shapes]
        return [self.postprocess(c, d, t, points, counts, size, original)
                for c, d, t, size, original in zip(cls_logits, ltrb, ctr_logits, sizes, original_sizes)]

    def location_targets(self, points: Tensor, shapes: list, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """assign_targets for every image: (b, P) class indices (-1 background) and (b, P, 4) boxes."""
        counts = [h * w for h, w in shapes]
        strides = torch.cat([points.new_full((n,), s) for n, s in zip(counts, self.strides)])
        ranges = torch.cat([points.new_tensor(r).expand(n, 2) for n, r in zip(counts, self.regress_ranges)])
        assigned = [assign_targets(points, strides, ranges, t["boxes"], t["labels"], self.center_sampling_radius)
                    for t in targets]
        return torch.stack([a[0] for a in assigned]), torch.stack([a[1] for a in assigned])

    def losses(self, cls_logits, ltrb, ctr_logits, points, shapes, targets) -> dict[str, Tensor]:
        with torch.no_grad():
            target_labels, target_boxes = self.location_targets(points, shapes, targets)
        return fcos_losses(cls_logits, ltrb, ctr_logits, points, target_labels, target_boxes, self.num_classes)

    @torch.no_grad()
    def postprocess(self, cls_logits: Tensor, ltrb: Tensor, ctr_logits: Tensor, points: Tensor, counts: list[int],
                    size: tuple[int, int], original_size: tuple[int, int]) -> dict[str, Tensor]:
        """One image: (P, K), (P, 4), (P,) -> boxes (k, 4) xyxy in original pixels, scores (k,), labels (k,)."""
        scores_all = torch.sqrt(cls_logits.sigmoid() * ctr_logits.sigmoid()[:, None])
        boxes, scores, classes = [], [], []
        for s, d, p in zip(scores_all.split(counts), ltrb.split(counts), points.split(counts)):
            flat = s.flatten()
            candidates = torch.nonzero(flat > self.score_thresh).squeeze(1)
            top = flat[candidates].topk(min(self.topk_candidates, len(candidates))).indices
            candidates = candidates[top]
            where, cls = candidates // self.num_classes, candidates % self.num_classes
            boxes.append(decode_boxes(p[where], d[where]))
            scores.append(flat[candidates])
            classes.append(cls)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        h, w = size
        boxes = clip_boxes_to_image(boxes, size)
        keep = batched_nms(boxes, scores, classes, self.nms_thresh)[:self.detections_per_img]
        scale = boxes.new_tensor([original_size[1] / w, original_size[0] / h] * 2)
        return {"boxes": boxes[keep] * scale, "scores": scores[keep], "labels": classes[keep] + 1}


def by_size(images: list[Tensor], resized: Callable[[int, int], tuple[int, int]], detect: Callable) -> list[dict]:
    """``detect`` on each group of images that the detector resizes to the same size; results in input order.

    AS-MLP's GroupNorm(1, c) averages over the whole padded map, so a batch that pads an image to a batch-mate's
    size changes its features (about 20% at stride 8 for a 480x640 image beside a 640x480 one) and its boxes.
    Images of one size pad alike, so their detections are those of each image alone, the way mmdet tests one image
    per GPU; training batches share their padding, as in mmdet.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(resized(*img.shape[-2:]), []).append(i)
    results: list[dict] = [{}] * len(images)
    for members in groups.values():
        for i, result in zip(members, detect([images[i] for i in members])):
            results[i] = result
    return results


def _check_images(images) -> list[Tensor]:
    """The detectors' input boundary: a non-empty list of (3, h, w) float images, or a (b, 3, h, w) batch."""
    if not isinstance(images, (Tensor, list, tuple)) or not len(images):
        raise TypeError(f"images must be a non-empty list of (3, h, w) tensors, got {images!r:.100}")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a (3, h, w) tensor (a batch: (b, 3, h, w)), got "
                             f"{getattr(img, 'shape', type(img))}")
        if 0 in img.shape:
            raise ValueError(f"images[{i}] is empty, shape {tuple(img.shape)}: height and width must be >= 1")
        if not img.dtype.is_floating_point:
            raise TypeError(f"images[{i}] has dtype {img.dtype}; pass floats in [0, 1] (v2.ToDtype(scale=True))")
    # one check a batch: 0-255 floats, or images normalised twice, would train without an error
    if min(img.amin() for img in images) < -0.5:
        warnings.warn("the detector takes images in [0, 1] and normalises them itself, and some pixels here are "
                      "below -0.5, as if normalised (x - mean) / std already: pass the images in [0, 1]", InputWarning)
    elif max(img.amax() for img in images) > 1.5:
        warnings.warn("the detector takes images in [0, 1] and normalises them itself, and some pixels here are "
                      "above 1.5: divide 0-255 images by 255 (v2.ToDtype(torch.float32, scale=True))", InputWarning)
    return [img.as_subclass(Tensor) for img in images]


# ---------------------------------------------------------------- the paper's Mask R-CNN

# Backbone settings of the official Mask R-CNN configs (svip-lab/AS-MLP-Object-Detection): drop path 0.2 for T, S
# (ImageNet: 0.2, 0.3). There is no Mask R-CNN config for B, which keeps its ImageNet rate. Shift 5 is kept for S,
# as in its 1x config (the 3x config uses 3).
MASKRCNN_BACKBONE_DEFAULTS = {
    "asmlp_tiny": dict(drop_path_rate=0.2),
    "asmlp_small": dict(drop_path_rate=0.2),
}


class ASMLPWithFPN(nn.Module):
    """AS-MLP + FPN in the form torchvision's two-stage detectors expect.

    (b, 3, H, W) -> OrderedDict "0".."3" (strides 4-32) and "pool" (stride 64, max-pooled), each
    (b, out_channels, H/s, W/s); ``out_channels`` is read by ``MaskRCNN``. ``body`` is the AS-MLP.
    """

    def __init__(self, body: ASMLP, out_channels: int = 256, frozen_stages: int = -1):
        super().__init__()
        self.body, self.frozen_stages, self.out_channels = body, frozen_stages, out_channels
        self.fpn = FPN(body.feature_info.channels(), out_channels, extra_levels=1,
                       extra_block="maxpool")

    def train(self, mode: bool = True) -> ASMLPWithFPN:
        super().train(mode)
        freeze_stages(self.body, self.frozen_stages)
        return self

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        pyramid = self.fpn(self.body(images))
        names = [str(i) for i in range(len(pyramid) - 1)] + ["pool"]  # torchvision's default RoI/anchor names
        return OrderedDict(zip(names, pyramid))


class ASMLPMaskRCNN(MaskRCNN):
    """torchvision's ``MaskRCNN``, with the images checked as :class:`SimpleFPNDetector` checks them (torchvision
    itself would divide by the size of a 0x0 image)."""

    def forward(self, images, targets=None):
        images = _check_images(images)
        if not self.training:  # GeneralizedRCNNTransform pads a batch to its largest image: see by_size
            return by_size(images, lambda h, w: (h, w), super().forward)
        if targets is not None:  # crowd regions are not objects to learn (mmdet and torchvision's reference skip them)
            targets = [_without_crowd(t) for t in targets]
        return super().forward(images, targets)


def _without_crowd(target: dict) -> dict:
    """A Mask R-CNN target without its ``iscrowd == 1`` instances (every per-instance entry filtered alike)."""
    if not isinstance(target, dict) or "iscrowd" not in target or "boxes" not in target:
        return target
    keep = torch.as_tensor(target["iscrowd"]).reshape(-1) == 0
    n = len(keep)
    return {k: v[keep.to(v.device)] if isinstance(v, Tensor) and v.dim() and len(v) == n else v
            for k, v in target.items()}


def build_maskrcnn(backbone: str = "asmlp_tiny", num_classes: int = 91,
                   pretrained_backbone: str | os.PathLike | dict | None = None, *, min_size: int = 800,
                   max_size: int = 1333, frozen_stages: int = -1, maskrcnn_kwargs: dict | None = None,
                   **backbone_kwargs) -> MaskRCNN:
    """The paper's Mask R-CNN: torchvision ``MaskRCNN`` on AS-MLP (strides 4-32) + FPN (256 ch, + P6 max-pool).

    num_classes follows torchvision and *includes* background: COCO's 80 classes are ``num_classes=81``
    (the default 91 covers the raw COCO ids 1..90). torchvision's defaults are the mmdet config of the paper:
    anchors 32-512 (scale 8 x strides 4-64), ratios 0.5/1/2, RoIAlign 7 (boxes) and 14 (masks), two 1024-d FC
    layers, four 3x3 mask convs. ``min_size``/``max_size``: test scale 800x1333. ``pretrained_backbone``:
    official classification ``.pth`` or mmdet checkpoint (``backbone.*`` keys), loaded into ``model.backbone.body``.
    ``maskrcnn_kwargs`` go to ``MaskRCNN`` (e.g. ``box_batch_size_per_image``); ``backbone_kwargs`` to the AS-MLP,
    on top of the paper's detection settings in ``MASKRCNN_BACKBONE_DEFAULTS`` (drop path 0.2 for T and S).
    """
    backbone_kwargs = {**MASKRCNN_BACKBONE_DEFAULTS.get(backbone, {}), **backbone_kwargs}
    body, report = build_backbone(backbone, (0, 1, 2, 3), pretrained_backbone, frozen_stages, **backbone_kwargs)
    model = ASMLPMaskRCNN(ASMLPWithFPN(body, 256, frozen_stages), num_classes=num_classes, min_size=min_size,
                          max_size=max_size, **(maskrcnn_kwargs or {}))
    model.backbone_load_report = report
    return model
