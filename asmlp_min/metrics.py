"""Evaluation metrics of the paper's three tables: ImageNet top-1, COCO AP (bbox and segm), ADE20K mIoU.

All values are fractions in [0, 1]; multiply by 100 for the paper's numbers.

- ``topk_accuracy``: share of samples whose target is among the k highest logits.
- ``coco_evaluate``: pycocotools ``COCOeval`` (10 IoU thresholds 0.50:0.05:0.95, 101-point interpolated
  precision, maxDets 1/10/100), silenced, with torchvision-style inputs converted to COCO results.
- ``SegmentationMeter``: mmseg's ``IoUMetric`` semantics: one confusion matrix summed over the whole
  dataset (not per-image IoUs averaged), ``ignore_index`` pixels dropped, classes absent from both the
  prediction and the ground truth left out of the mean (nan-mean).
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import box_convert

from .checks import is_finite_number
from .data.datasets import coco_index, polygons_of, read_json, validate_coco
from .data.rle import mask_to_rle

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def topk_accuracy(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: fraction of rows of ``logits`` (n, classes) whose ``target`` (n,) is in the top k.

    A k larger than the number of classes is clamped to it (every target is then in the top k).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1] or not len(target):
        raise ValueError(f"expected logits (n, classes) and target (n,), n >= 1, got {logits.shape}, {target.shape}")
    bad = (target < 0) | (target >= logits.shape[1])
    if bad.any():
        raise ValueError(f"target has class indices {sorted(set(target[bad].tolist()))[:5]} outside [0, "
                         f"{logits.shape[1]}) for logits of {logits.shape[1]} classes; targets are 0-based indices")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                              # (n, kmax), best first
    hit = top == target[:, None]
    return {f"top{k}": hit[:, :min(k, kmax)].any(1).sum().item() / len(target) for k in ks}


# ---------------------------------------------------------------- COCO AP

def coco_evaluate(gt: COCO | dict | str | os.PathLike, detections: Sequence[dict] | str | os.PathLike,
                  iou_type: str = "bbox") -> OrderedDict[str, float]:
    """COCO AP/AR of ``detections`` against ``gt``; returns the 12 ``COCOeval.stats`` by name.

    gt: a pycocotools ``COCO``, a COCO dict, or the path of an ``instances_*.json``; checked with
    ``data.datasets.validate_coco`` (clear errors for bad fields, defaults for missing ``iscrowd``/``area``) and
    scored whole, as COCOeval scores it: degenerate boxes and short polygons count as objects to find.
    ``iou_type="segm"`` needs every image's ``height``/``width`` and every annotation's ``segmentation``.
    detections: either torchvision-style per-image dicts ``{"image_id", "boxes" (k, 4) xyxy, "scores" (k,),
    "labels" (k,) category ids, optional "masks" (k, h, w) or (k, 1, h, w), probabilities cut at 0.5}``,
    or a ready COCO result list (dicts with ``image_id``, ``category_id``, ``score`` and ``bbox`` xywh /
    ``segmentation`` RLE; numbers may be numpy or torch) or the path of such a list's JSON file. No detections
    at all score 0 where there is ground truth (COCOeval on an empty result; ``loadRes`` itself would crash). An
    area range with no ground truth (e.g. no small objects) is -1, as in COCOeval. Boxes and scores must be finite,
    labels category ids of ``gt`` and masks of their image's size (ValueError otherwise: a NaN box or score, a
    0-based label or a mask at another resolution would be scored silently).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    coco_gt = _as_coco(gt, iou_type)
    results = to_coco_results(detections, iou_type)
    if iou_type == "segm" and any("segmentation" not in r for r in results):
        raise ValueError("iou_type='segm' needs 'masks' in every detection dict ('segmentation' in COCO results)")
    bad = next((r for r in results if not all(map(is_finite_number, [r.get("score"), *r.get("bbox", [])]))), None)
    if bad is not None:  # COCOeval would rank a NaN anywhere and report an AP without a word
        raise ValueError(f"detections for image_id={bad.get('image_id')}: 'score' is {bad.get('score')!r}; scores must "
                         f"be finite and boxes finite xyxy boxes, got {bad.get('bbox')} (COCO results: xywh); "
                         "did training diverge?")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections refer to image ids not in the ground truth: {sorted(unknown)[:5]}")
    known = set(coco_gt.getCatIds())
    unknown = {r["category_id"] for r in results} - known
    if unknown:
        raise ValueError(f"detections have labels {sorted(unknown)[:10]} that are not category ids of the ground "
                         f"truth {sorted(known)[:10]}; labels are category ids (COCO: from 1), not 0-based indices")
    if iou_type == "segm":
        _check_mask_sizes(results, coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):      # COCOeval prints timings ("DONE (t=0.01s)")
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else _no_results(coco_gt)  # loadRes edits dicts
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return OrderedDict((name, float(v)) for name, v in zip(COCO_STAT_NAMES, evaluator.stats))


def to_coco_results(detections: Sequence[dict] | str | os.PathLike, iou_type: str = "bbox") -> list[dict]:
    """torchvision-style per-image outputs -> COCO result list (xyxy -> xywh, masks -> compressed RLE); COCO
    results, given as a list or the path of its JSON file, come back with plain int ids and float numbers."""
    if isinstance(detections, (str, os.PathLike)):
        detections = read_json(detections)
    if not isinstance(detections, (list, tuple)) or not all(isinstance(det, dict) for det in detections):
        raise TypeError(f"detections must be a list of dicts (torchvision-style outputs or COCO results) or the path "
                        f"of a COCO results JSON, got {_kind(detections)}")
    results = []
    for det in detections:
        if "category_id" in det:                          # already a COCO result
            results.append(_plain_coco_result(det))
            continue
        missing = {"image_id", "boxes", "scores", "labels"} - set(det)
        boxes = _numpy(det.get("boxes", [])).reshape(-1, 4).astype(np.float64)
        scores, labels = (_numpy(det.get(key, [])).reshape(-1) for key in ("scores", "labels"))
        if missing or not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"a detection dict needs image_id, boxes (k, 4), scores (k,), labels (k,); missing "
                             f"{sorted(missing)}, lengths {len(boxes)}, {len(scores)}, {len(labels)}")
        xywh = box_convert(torch.from_numpy(boxes), "xyxy", "xywh").numpy()
        masks = _numpy(det["masks"]) if iou_type == "segm" and "masks" in det else None
        if masks is not None and len(boxes):
            masks = masks.reshape(len(boxes), *masks.shape[-2:]) > 0.5
        for i in range(len(boxes)):
            result = {"image_id": int(det["image_id"]), "category_id": int(labels[i]), "score": float(scores[i]),
                      "bbox": [float(v) for v in xywh[i]]}
            if masks is not None:
                result["segmentation"] = mask_to_rle(masks[i])
            results.append(result)
    return results


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _kind(value) -> str:
    """What a wrong ``detections`` argument is ("dict", "list of str"), for the error message."""
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of " + next(type(v).__name__ for v in value if not isinstance(v, dict))
    return type(value).__name__


# A ready COCO result's numbers: (field, how many, numpy kinds allowed, type COCOeval needs)
RESULT_NUMBERS = (("image_id", 1, "iu", int), ("category_id", 1, "iu", int), ("score", 1, "iuf", float),
                  ("bbox", 4, "iuf", float))


def _plain_coco_result(result: dict) -> dict:
    """A copy of a COCO result with ids as ints, ``score`` a float and ``bbox`` 4 floats, whatever held them (numpy,
    tuple, tensor): COCOeval fails on those without saying why."""
    missing = [field for field in ("image_id", "category_id", "score") if field not in result]
    if missing or not {"bbox", "segmentation"} & set(result):
        raise ValueError(f"a COCO result needs image_id, category_id, score and bbox (or segmentation), got the "
                         f"fields {sorted(result)}")
    plain = dict(result)
    for field, count, kinds, kind in RESULT_NUMBERS:
        if field not in result:
            continue
        values = _numpy(result[field]).reshape(-1)
        if values.size != count or values.dtype.kind not in kinds:
            raise ValueError(f"a COCO result's '{field}' must be {count} number(s) ({kind.__name__}), got "
                             f"{result[field]!r} for image_id={result['image_id']!r}")
        plain[field] = [kind(v) for v in values] if field == "bbox" else kind(values[0])
    return plain


def _check_mask_sizes(results: list[dict], coco_gt: COCO) -> None:
    """Every result's RLE is as large as its image: COCOeval would score a mask at another resolution 0 in silence."""
    for result in results:
        image, rle = coco_gt.imgs[result["image_id"]], result["segmentation"]
        size = list(rle.get("size", ())) if isinstance(rle, dict) else None
        if size != [image["height"], image["width"]]:
            raise ValueError(f"detections for image_id={result['image_id']}: a mask of size {size} (height, width) "
                             f"but the image is {image['height']}x{image['width']}; resize masks to their image's own "
                             "size (COCO results: RLE dicts with 'counts' and 'size')")


def _no_results(coco_gt: COCO) -> COCO:
    """A result COCO without detections (``loadRes`` crashes on an empty list): every object then counts as missed."""
    return coco_index({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []})


def _as_coco(gt, iou_type: str) -> COCO:
    """gt checked by ``validate_coco`` and indexed as a new pycocotools ``COCO`` (never edits what it is given);
    the check adds the ``info`` entry that ``loadRes`` of pycocotools 2.0.9 and 2.0.10 reads."""
    if isinstance(gt, (str, os.PathLike)):
        dataset, source = read_json(gt), str(gt)
    elif isinstance(gt, COCO):
        dataset, source = gt.dataset, "ground truth (a pycocotools COCO)"
    elif isinstance(gt, dict):
        dataset, source = gt, "ground truth (a COCO dict)"
    else:
        raise TypeError(f"gt must be a pycocotools COCO, a COCO dict or a path, got {type(gt).__name__}")
    dataset = validate_coco(dataset, source, require_size=iou_type == "segm")
    return coco_index(_rasterisable(dataset, source) if iou_type == "segm" else dataset)


def _rasterisable(dataset: dict, source: str) -> dict:
    """The ground truth with masks pycocotools can draw: polygons of fewer than 3 points are left out (it crashes on
    them), and an annotation left with none gets an empty mask, so it still counts as an object to find, as its box
    does in bbox AP. An annotation without a mask (no 'segmentation', or []) cannot be scored: ValueError."""
    images = {image["id"]: image for image in dataset["images"]}
    annotations = []
    for ann in dataset["annotations"]:
        segmentation = ann.get("segmentation")
        if not segmentation:
            raise ValueError(f"{source}: annotation id={ann['id']} has no 'segmentation' (box only); iou_type='segm' "
                             "needs a mask for every ground-truth object, or use iou_type='bbox'")
        if isinstance(segmentation, list):
            segmentation = polygons_of(segmentation) or _empty_rle(images[ann["image_id"]])
        annotations.append({**ann, "segmentation": segmentation})
    return {**dataset, "annotations": annotations}


def _empty_rle(image: dict) -> dict:
    return mask_to_rle(np.zeros((image["height"], image["width"]), np.uint8))


# ---------------------------------------------------------------- mIoU

class SegmentationMeter:
    """Dataset-level confusion matrix for semantic segmentation (mmseg IoUMetric semantics).

    update(pred, target): pred (b, h, w) class ids or (b, classes, h, w) logits; target (b, h, w) with
    values in [0, num_classes) or ``ignore_index``. compute() -> {"mIoU", "aAcc", "mAcc", "IoU", "Acc"}:

        IoU_c = n_cc / (sum_j n_cj + sum_i n_ic - n_cc),   Acc_c = n_cc / sum_j n_cj

    with n_ij = pixels of ground-truth class i predicted as j. mIoU/mAcc are nan-means over classes
    (absent from prediction and ground truth -> nan -> skipped); aAcc = trace / total.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape "
                             "(resize logits to the label size before the meter)")
        pred, target = pred.reshape(-1).to("cpu", torch.int64), target.reshape(-1).to("cpu", torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        bad_target, bad_pred = (target < 0) | (target >= n), (pred < 0) | (pred >= n)
        if (bad_target | bad_pred).any():
            raise ValueError(f"target has values {target[bad_target].unique()[:5].tolist()} and pred values "
                             f"{pred[bad_pred].unique()[:5].tolist()} outside [0, {n}) and not ignore_index")
        self.confusion += torch.bincount(n * target + pred, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the confusion matrix over torch.distributed ranks (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            total = self.confusion.to(backend_device)
            torch.distributed.all_reduce(total)
            self.confusion = total.cpu()

    def compute(self) -> dict:
        cm = self.confusion.double()
        tp, gt_px, pred_px = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt_px + pred_px - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt_px > 0, tp / gt_px.clamp(min=1), torch.full_like(tp, float("nan")))
        total = cm.sum()
        return {"mIoU": iou.nanmean().item(), "aAcc": (tp.sum() / total).item() if total > 0 else float("nan"),
                "mAcc": acc.nanmean().item(), "IoU": iou.tolist(), "Acc": acc.tolist()}
