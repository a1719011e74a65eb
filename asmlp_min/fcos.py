"""FCOS (Tian et al., ICCV 2019), the dense head of ``detection.SimpleFPNDetector``, written from scratch.

    pyramid P3.. (b, d, H/s, W/s) -> one head shared by all levels, at every location (x, y) of every level:
      class logits (K), distances to the box sides (l, t, r, b) in pixels, centre-ness logit (1)
    train: each location learns the smallest ground-truth box that contains it, near the box centre, if the
           box's size suits the level (``assign_targets``); losses are normalised by the number of positives:
           sigmoid focal loss (classes) + GIoU loss (boxes) + binary cross-entropy (centre-ness)
    eval:  score = sqrt(sigmoid(class) * sigmoid(centre-ness)), boxes = ``decode_boxes(points, ltrb)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .checks import is_count


# ---------------------------------------------------------------- the shared head

class FCOSHead(nn.Module):
    """Two towers of 3x3 conv + GroupNorm + ReLU, shared by every pyramid level (FCOS, Fig. 2).

    pyramid: list of (b, d, h_l, w_l) -> per level (class logits (b, K, h_l, w_l), distances l, t, r, b
    (b, 4, h_l, w_l) in pixels (>= 0), centre-ness logits (b, 1, h_l, w_l)). The distances are
    ReLU(scale_l * conv) * stride_l: a learnable scale per level lets one head serve every stride.
    """

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int], num_convs: int = 4,
                 prior_prob: float = 0.01):
        super().__init__()
        if not (is_count(channels) and channels >= 2):
            raise ValueError(f"the FCOS head needs an int >= 2 channels (fpn_channels; FCOS uses 256), got "
                             f"{channels!r}: its GroupNorm needs two channels per group")
        self.strides = tuple(strides)
        # GroupNorm(32, d) as in FCOS; fewer groups for narrow heads, and at least two channels per group: with one,
        # a 1x1 map (stride 32 on a small image) has a single value to normalise, which torch refuses. This only
        # changes d = 2, 4, 8, 16, 32 (one channel per group before); 256 (FCOS) and 64 (the demo) keep 32 groups.
        groups = min(math.gcd(32, channels), channels // 2)
        tower = lambda: nn.Sequential(*[m for _ in range(num_convs) for m in (  # noqa: E731
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU())])
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        # Focal loss init: every class starts at probability prior_prob, so the many easy negatives
        # do not swamp the first updates (RetinaNet Sec. 4.1).
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, pyramid: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """One (b, d, h_l, w_l) map per stride -> per level (b, K, h_l, w_l), (b, 4, h_l, w_l), (b, 1, h_l, w_l)."""
        outputs = []
        for level, (feat, stride) in enumerate(zip(pyramid, self.strides)):
            cls_feat, box_feat = self.cls_tower(feat), self.box_tower(feat)
            ltrb = F.relu(self.scales[level] * self.bbox_pred(box_feat)) * stride
            outputs.append((self.cls_logits(cls_feat), ltrb, self.centerness(box_feat)))
        return outputs


# ---------------------------------------------------------------- locations, targets, losses

def level_points(height: int, width: int, stride: int, device=None) -> Tensor:
    """(h * w, 2) pixel centres (x, y) = ((j + 1/2) s, (i + 1/2) s) of a stride-s map, row by row."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return (torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() + 0.5) * stride


def fcos_regress_ranges(strides: Sequence[int], factor: float = 8.0) -> tuple[tuple[float, float], ...]:
    """Level l takes boxes whose largest side distance m = max(l, t, r, b) lies in (factor s_{l-1}, factor s_l].

    factor 8 on strides 8..128 gives FCOS's (0, 64], (64, 128], (128, 256], (256, 512], (512, inf).
    """
    bounds = [0.0] + [factor * s for s in strides[:-1]] + [math.inf]
    return tuple(zip(bounds[:-1], bounds[1:]))


def assign_targets(points: Tensor, strides: Tensor, regress_ranges: Tensor, boxes: Tensor, labels: Tensor,
                   center_sampling_radius: float = 1.5) -> tuple[Tensor, Tensor]:
    """FCOS target assignment for one image.

    points (P, 2) xy, strides (P,), regress_ranges (P, 2) for every location of every level; boxes (N, 4)
    xyxy, labels (N,) class indices 0..K-1. A location is positive for box g when it lies inside g, within
    ``center_sampling_radius * stride`` of g's centre along x and y (centre sampling, FCOS improvements),
    and max(l, t, r, b) to g's sides lies in (lo, hi] of its level. Several candidates: the smallest area wins.
    Returns (P,) class index or -1 for background, and (P, 4) the matched box (zeros for background).
    """
    num_points = len(points)
    if len(boxes) == 0:
        return labels.new_full((num_points,), -1), boxes.new_zeros(num_points, 4)
    x, y = points[:, 0, None], points[:, 1, None]                                          # (P, 1)
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=-1)  # (P, N, 4)
    inside = ltrb.min(dim=-1).values > 0
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2                                            # (N, 2)
    radius = center_sampling_radius * strides[:, None]                                     # (P, 1) pixels
    near_centre = ((x - centres[:, 0]).abs() < radius) & ((y - centres[:, 1]).abs() < radius)
    max_distance = ltrb.max(dim=-1).values
    right_level = (max_distance > regress_ranges[:, 0, None]) & (max_distance <= regress_ranges[:, 1, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])                      # (N,)
    cost = torch.where(inside & near_centre & right_level, areas, torch.full_like(areas, math.inf))
    best_cost, best = cost.min(dim=1)
    matched_labels = torch.where(best_cost.isfinite(), labels[best], labels.new_full((), -1))
    matched_boxes = torch.where(best_cost.isfinite()[:, None], boxes[best], boxes.new_zeros(()))
    return matched_labels, matched_boxes


def decode_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """(..., 2) centres and (..., 4) distances -> (..., 4) xyxy = (x - l, y - t, x + r, y + b)."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS Eq. 3: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each point in its box. (P,)"""
    l, t = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    r, b = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr = torch.minimum(l, r) / torch.maximum(l, r)
    tb = torch.minimum(t, b) / torch.maximum(t, b)
    return (lr * tb).clamp(min=0).sqrt()


def fcos_losses(cls_logits: Tensor, ltrb: Tensor, ctr_logits: Tensor, points: Tensor, target_labels: Tensor,
                target_boxes: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The three FCOS losses, each summed and divided by the number of positive locations (at least 1).

    cls_logits (b, P, K), ltrb (b, P, 4) pixels, ctr_logits (b, P), points (P, 2),
    target_labels (b, P) in -1..K-1, target_boxes (b, P, 4). Focal loss (alpha 0.25, gamma 2) over all
    locations and classes; GIoU loss and centre-ness BCE over the positives only.
    """
    positive = target_labels >= 0
    num_pos = positive.sum().clamp(min=1).float()
    one_hot = F.one_hot(target_labels.clamp(min=0), num_classes).to(cls_logits.dtype) * positive[..., None]
    loss_cls = sigmoid_focal_loss(cls_logits, one_hot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    pos_points = points.expand(len(ltrb), -1, -1)[positive]
    pred_boxes, gt_boxes = decode_boxes(pos_points, ltrb[positive]), target_boxes[positive]
    loss_box = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / num_pos
    loss_ctr = F.binary_cross_entropy_with_logits(
        ctr_logits[positive], centerness_target(pos_points, gt_boxes), reduction="sum") / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}
