"""Metrics against hand-computed values: top-k, COCO AP (101-point interpolation), confusion-matrix mIoU."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from asmlp_min.data.shapes import ShapesDetection
from asmlp_min.metrics import COCO_STAT_NAMES, SegmentationMeter, coco_evaluate, topk_accuracy


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.7, 0.2],    # target 1: top-1 hit
                           [0.5, 0.3, 0.2],    # target 1: second best
                           [0.6, 0.3, 0.1]])   # target 2: last
    target = torch.tensor([1, 1, 2])
    acc = topk_accuracy(logits, target, ks=(1, 2, 5))
    assert acc == {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0}    # k=5 > 3 classes: clamped, all hit
    with pytest.raises(ValueError, match="target"):
        topk_accuracy(logits, target[:2])


# ---------------------------------------------------------------- COCO

@pytest.fixture(scope="module")
def shapes_gt():
    dataset = ShapesDetection(6, seed=9)
    return dataset.coco_dict(), [dataset[i][1] for i in range(len(dataset))]


def _as_detections(targets, with_masks=True):
    return [{"image_id": t["image_id"], "boxes": t["boxes"], "labels": t["labels"],
             "scores": torch.linspace(1.0, 0.5, len(t["labels"])),
             **({"masks": t["masks"]} if with_masks else {})} for t in targets]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_detections_scores_one(shapes_gt, iou_type, capsys):
    coco, targets = shapes_gt
    stats = coco_evaluate(coco, _as_detections(targets), iou_type=iou_type)
    assert list(stats) == list(COCO_STAT_NAMES)
    assert stats["AP"] == stats["AP50"] == stats["AP75"] == stats["AR100"] == 1.0
    assert capsys.readouterr().out == ""                          # COCOeval's timing prints are swallowed


def _one_image_gt():
    # two 40x40 boxes (area 1600: "medium", between 32^2 and 96^2)
    return {"images": [{"id": 1, "height": 200, "width": 200, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "area": 1600,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "circle"}]}


def test_one_miss_and_one_false_positive_by_hand():
    # Detections, best score first: a false positive (0.9, far from both objects), then an exact hit on
    # object 1 (0.8); object 2 is missed. At every IoU threshold the ranked list gives
    #   after det 1: TP=0, FP=1 -> recall 0.0, precision 0.0
    #   after det 2: TP=1, FP=1 -> recall 0.5, precision 0.5
    # COCO makes precision non-increasing from the right (p_interp(r) = max precision at recall >= r),
    # so p = 0.5 for recall 0.0..0.5, and 0 beyond 0.5 (never reached). Sampled at the 101 recall points
    # 0.00, 0.01, ..., 1.00: 51 points (0.00..0.50) have 0.5, the other 50 have 0.
    #   AP = 51 * 0.5 / 101 = 25.5 / 101 (same at all 10 IoU thresholds, so AP = AP50 = AP75).
    # Recall with 100 detections = 1/2; with 1 detection per image only the false positive counts: 0.
    detections = [{"image_id": 1, "boxes": torch.tensor([[150.0, 10.0, 190.0, 50.0], [10.0, 10.0, 50.0, 50.0]]),
                   "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    stats = coco_evaluate(_one_image_gt(), detections)
    for name in ("AP", "AP50", "AP75", "APm"):
        assert math.isclose(stats[name], 25.5 / 101, rel_tol=1e-9)
    assert stats["AR100"] == stats["AR10"] == stats["ARm"] == 0.5 and stats["AR1"] == 0.0
    assert stats["APs"] == stats["APl"] == -1.0                    # no small/large ground truth


def test_small_and_large_objects_are_scored_in_their_own_columns():
    """A 20x20 object (area 400 < 32^2: small) found exactly and a 120x120 one (area 14400 > 96^2: large) missed:
    small AP and AR are 1, large 0, medium undefined (-1); overall AP = AR100 = 1/2 at every threshold."""
    gt = {"images": [{"id": 1, "height": 300, "width": 300}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 120, 120], "area": 14400,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "dot"}]}
    stats = coco_evaluate(gt, [{"image_id": 1, "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
                                "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}])
    assert (stats["APs"], stats["APm"], stats["APl"]) == pytest.approx((1.0, -1.0, 0.0))
    assert (stats["ARs"], stats["ARm"], stats["ARl"]) == pytest.approx((1.0, -1.0, 0.0))
    assert math.isclose(stats["AP"], 51 / 101) and stats["AR100"] == 0.5   # precision 1 up to recall 0.5


def test_mask_probabilities_are_cut_at_one_half():
    """A mask of probability 0.6 on the object's square and 0.4 on a band around it is the square: segm AP 1.
    The same mask at 0.4 everywhere is empty: no object found."""
    gt = _one_image_gt()
    masks = torch.zeros(2, 200, 200)
    for k, (x, y) in enumerate([(10, 10), (100, 100)]):
        masks[k, y - 5:y + 45, x - 5:x + 45] = 0.4
        masks[k, y:y + 40, x:x + 40] = 0.6
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    detection = {"image_id": 1, "boxes": torch.tensor([[10.0, 10, 50, 50], [100, 100, 140, 140]]),
                 "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1]), "masks": masks}
    assert coco_evaluate(gt, [detection], iou_type="segm")["AP"] == 1.0
    faint = {**detection, "masks": torch.full((2, 200, 200), 0.4)}
    assert coco_evaluate(gt, [faint], iou_type="segm")["AP"] == 0.0


def test_coco_result_list_input_matches_dict_input():
    results = [{"image_id": 1, "category_id": 1, "bbox": [150, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.8}]
    assert math.isclose(coco_evaluate(_one_image_gt(), results)["AP"], 25.5 / 101, rel_tol=1e-9)


def _as_file_and_coco(gt: dict, tmp_path):
    """The same ground truth as the two other forms coco_evaluate takes: an instances JSON file and a COCO."""
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(gt))
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return path, coco


@pytest.fixture
def pycocotools_2_0_9(monkeypatch):
    """``COCO.loadRes`` as pycocotools 2.0.9 and 2.0.10 have it: it copies the ground truth's 'info' (KeyError
    without one; 2.0.11 made it optional, and the project allows >= 2.0.7)."""
    load_res = COCO.loadRes

    def strict_load_res(self, results):
        info = copy.deepcopy(self.dataset["info"])
        loaded = load_res(self, results)
        loaded.dataset["info"] = info
        return loaded
    monkeypatch.setattr(COCO, "loadRes", strict_load_res)


def test_ground_truth_without_info_evaluates_on_every_pycocotools(pycocotools_2_0_9, tmp_path):
    gt = _one_image_gt()                                           # hand-made, no "info", like many custom files
    path, coco = _as_file_and_coco(gt, tmp_path)
    results = [{"image_id": 1, "category_id": 1, "bbox": [150, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.8}]
    for source in (gt, path, coco):
        assert math.isclose(coco_evaluate(source, results)["AP"], 25.5 / 101, rel_tol=1e-9)
    assert "info" not in gt                                        # the caller's dict is left as it was


def test_shapes_ground_truth_evaluates_on_every_pycocotools(pycocotools_2_0_9, shapes_gt):
    coco, targets = shapes_gt
    assert "info" in coco
    assert coco_evaluate(coco, _as_detections(targets))["AP"] == 1.0


def _pycocotools_stats(gt: dict, results: list[dict], iou_type: str = "bbox") -> list[float]:
    """COCOeval's 12 stats, run directly; no results: a result COCO built by hand (loadRes crashes on [])."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats.tolist()


def test_no_detections_score_as_cocoeval_scores_an_empty_result(shapes_gt):
    # two medium objects, none found: 0 for every stat over them, -1 for the small and large ranges (no objects)
    assert list(coco_evaluate(_one_image_gt(), []).values()) == [0, 0, 0, -1, 0, -1, 0, 0, 0, -1, 0, -1]
    coco, targets = shapes_gt
    empty = [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0),
              "masks": torch.zeros(0, 1, 128, 128)}]
    assert list(coco_evaluate(coco, empty, iou_type="segm").values()) == _pycocotools_stats(coco, [], "segm")


def _square(x: int, y: int, side: int = 20) -> list[int]:
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def _gt_with(first: dict) -> dict:
    """One 100x100 image: annotation 1 as given, annotation 2 a valid 20x20 square at (50, 50)."""
    valid = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [_square(50, 50)]}
    return {"images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 400, "iscrowd": 0, **first}, valid]}


def _hit_on_the_valid_square(with_mask: bool = False) -> list[dict]:
    mask = np.zeros((100, 100), np.uint8)
    mask[50:70, 50:70] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.9,
             **({"segmentation": rle} if with_mask else {})}]


@pytest.mark.parametrize("first", [
    {"bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 30]]},        # a valid box, a 2-point polygon
    {"bbox": [10, 10, 0, 20], "segmentation": [_square(10, 10)]},         # a box of width 0
    {"bbox": [10, 10, 20, 20], "segmentation": []},                       # box only
])
def test_ground_truth_that_training_skips_is_scored_as_pycocotools_scores_it(first, tmp_path):
    # one object of two found at precision 1: recall 0.5, so 51 of the 101 recall points have precision 1
    gt = _gt_with(first)
    expected = _pycocotools_stats(gt, _hit_on_the_valid_square())
    assert math.isclose(expected[0], 51 / 101, rel_tol=1e-9)
    path, coco = _as_file_and_coco(gt, tmp_path)
    for source in (gt, path, coco):
        assert list(coco_evaluate(source, _hit_on_the_valid_square()).values()) == expected


def test_segm_ground_truth_without_a_drawable_polygon_is_a_missed_object():
    # pycocotools cannot draw [[10, 10, 30, 30]] (it crashes); the object keeps an empty mask and is missed: AP 51/101
    gt = _gt_with({"bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 30]]})
    stats = coco_evaluate(gt, _hit_on_the_valid_square(with_mask=True), iou_type="segm")
    assert math.isclose(stats["AP"], 51 / 101, rel_tol=1e-9) and stats["AR100"] == 0.5


def test_segm_needs_a_mask_and_a_size_for_every_ground_truth_object():
    box_only = _gt_with({"bbox": [10, 10, 20, 20], "segmentation": []})
    with pytest.raises(ValueError, match=r"annotation id=1 has no 'segmentation' \(box only\); iou_type='segm'"):
        coco_evaluate(box_only, _hit_on_the_valid_square(with_mask=True), iou_type="segm")
    unsized = _gt_with({"bbox": [10, 10, 20, 20], "segmentation": [_square(10, 10)]})
    unsized["images"] = [{"id": 1, "file_name": "a.png"}]
    with pytest.raises(ValueError, match=r"images\[0\] \(id=1\) needs 'height' and 'width' .* to evaluate masks"):
        coco_evaluate(unsized, _hit_on_the_valid_square(with_mask=True), iou_type="segm")


def test_masks_of_another_size_than_their_image_are_an_error():
    gt = _gt_with({"bbox": [10, 10, 20, 20], "segmentation": [_square(10, 10)]})
    half = [{"image_id": 1, "boxes": torch.tensor([[25.0, 25.0, 35.0, 35.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([1]), "masks": torch.ones(1, 1, 50, 50)}]
    with pytest.raises(ValueError, match=r"image_id=1: a mask of size \[50, 50\] .* the image is 100x100"):
        coco_evaluate(gt, half, iou_type="segm")


@pytest.mark.parametrize("as_array", [np.array, tuple, torch.tensor])
def test_coco_results_held_in_numpy_tuples_or_tensors(as_array):
    results = [{"image_id": 1, "category_id": 1, "bbox": as_array([150.0, 10.0, 40.0, 40.0]), "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": as_array([10.0, 10.0, 40.0, 40.0]),
                "score": torch.tensor(0.8)}]
    assert math.isclose(coco_evaluate(_one_image_gt(), results)["AP"], 25.5 / 101, rel_tol=1e-9)


def test_coco_results_file_and_what_is_no_result_list(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [150, 10, 40, 40], "score": 0.9},
                                {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.8}]))
    for source in (path, str(path)):
        assert math.isclose(coco_evaluate(_one_image_gt(), source)["AP"], 25.5 / 101, rel_tol=1e-9)
    for wrong, kind in (({"image_id": 1}, "dict"), (["results.json"], "list of str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"detections must be a list of dicts .* got {kind}$"):
            coco_evaluate(_one_image_gt(), wrong)
    with pytest.raises(ValueError, match=r"'bbox' must be 4 number\(s\) \(float\), got \[10, 10, 40\]"):
        coco_evaluate(_one_image_gt(), [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40], "score": 0.8}])


def test_coco_evaluate_rejects_bad_input(shapes_gt):
    coco, targets = shapes_gt
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(coco, [], iou_type="keypoints")
    with pytest.raises(ValueError, match="masks"):
        coco_evaluate(coco, _as_detections(targets, with_masks=False), iou_type="segm")
    stray = [{**_as_detections(targets)[0], "image_id": 999}]
    with pytest.raises(ValueError, match="999"):
        coco_evaluate(coco, stray)
    no_scores = [{k: v for k, v in _as_detections(targets)[0].items() if k != "scores"}]
    with pytest.raises(ValueError, match=r"needs image_id, boxes .*missing \['scores'\]"):
        coco_evaluate(coco, no_scores)
    with pytest.raises(TypeError, match="gt must be a pycocotools COCO, a COCO dict or a path, got int"):
        coco_evaluate(7, _as_detections(targets))


# ---------------------------------------------------------------- mIoU

# 6 pixels, 3 classes; the last is ignored. Confusion (rows = ground truth, columns = prediction):
#   gt 0: pred 0 x1, pred 1 x1      IoU_0 = 1 / (2 + 2 - 1) = 1/3     Acc_0 = 1/2
#   gt 1: pred 1 x2                 IoU_1 = 2 / (2 + 3 - 2) = 2/3     Acc_1 = 1
#   gt 2: pred 0 x1                 IoU_2 = 0 / (1 + 0 - 0) = 0       Acc_2 = 0
# mIoU = (1/3 + 2/3 + 0) / 3 = 1/3, mAcc = 1/2, aAcc = 3 correct / 5 counted = 3/5
TARGET = torch.tensor([[0, 0, 1, 1, 2, 255]])
PRED = torch.tensor([[0, 1, 1, 1, 0, 2]])


def test_miou_by_hand():
    meter = SegmentationMeter(3)
    meter.update(PRED, TARGET)
    result = meter.compute()
    assert np.allclose(result["IoU"], [1 / 3, 2 / 3, 0.0])
    assert math.isclose(result["mIoU"], 1 / 3) and math.isclose(result["mAcc"], 0.5)
    assert math.isclose(result["aAcc"], 3 / 5)


def test_ignored_pixels_do_not_count():
    meter = SegmentationMeter(3)
    meter.update(torch.tensor([[0, 1, 1, 1, 0, 0]]), TARGET)     # different prediction at the ignored pixel
    assert math.isclose(meter.compute()["mIoU"], 1 / 3)
    assert meter.confusion.sum() == 5


def test_absent_classes_are_left_out_of_the_mean():
    meter = SegmentationMeter(5)                                  # classes 3 and 4 appear nowhere
    meter.update(PRED, TARGET)
    result = meter.compute()
    assert math.isnan(result["IoU"][3]) and math.isnan(result["IoU"][4])
    assert math.isnan(result["Acc"][3]) and math.isnan(result["Acc"][4])
    assert math.isclose(result["mIoU"], 1 / 3) and math.isclose(result["mAcc"], 0.5)


def test_a_class_only_predicted_scores_iou_0_and_counts_in_the_mean():
    """mmseg's rule: a class absent from the ground truth but predicted has union 1 and IoU 0, not nan; its
    accuracy (no ground-truth pixel) is nan. Target 0 0 1 1, prediction 0 0 1 2: IoU 1, 1/2, 0."""
    meter = SegmentationMeter(3)
    meter.update(torch.tensor([[0, 0, 1, 2]]), torch.tensor([[0, 0, 1, 1]]))
    result = meter.compute()
    assert np.allclose(result["IoU"], [1.0, 0.5, 0.0]) and math.isclose(result["mIoU"], 0.5)
    assert math.isnan(result["Acc"][2]) and math.isclose(result["mAcc"], 0.75)


def test_dataset_level_accumulation_and_logits():
    # split the example into two "images": totals are summed first, so the answer is unchanged
    meter = SegmentationMeter(3)
    meter.update(PRED[:, :3], TARGET[:, :3])
    logits = torch.nn.functional.one_hot(PRED[:, 3:], 3).permute(0, 2, 1).float()[..., None]  # (b, c, 3, 1)
    meter.update(logits, TARGET[:, 3:, None])
    assert math.isclose(meter.compute()["mIoU"], 1 / 3)
    meter.reset()
    assert meter.confusion.sum() == 0


def test_matches_the_per_class_set_formula():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16), generator=gen)
    target[0, :3] = 255
    pred = torch.randint(0, 4, (2, 16, 16), generator=gen)
    meter = SegmentationMeter(4)
    meter.update(pred, target)
    valid = target != 255
    for c, iou in enumerate(meter.compute()["IoU"]):
        p, t = (pred == c) & valid, (target == c) & valid
        assert math.isclose(iou, ((p & t).sum() / (p | t).sum()).item(), rel_tol=1e-6)


def test_bad_segmentation_input():
    meter = SegmentationMeter(3)
    with pytest.raises(ValueError, match=r"values \[7\]"):
        meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 2]]]))
    with pytest.raises(ValueError, match="same shape"):
        meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


# ---------------------------------------------------------------- bad input: clear errors, nothing scored silently

def test_topk_accuracy_rejects_targets_out_of_range():
    logits = torch.zeros(2, 3)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"\[{bad}\] outside \[0, 3\)"):
            topk_accuracy(logits, torch.tensor([0, bad]))


def test_non_finite_box_is_an_error_not_a_perfect_score():
    exact = torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 140.0]])
    for value in (float("nan"), float("inf")):
        boxes = exact.clone()
        boxes[1, 2] = value
        detections = [{"image_id": 1, "boxes": boxes, "scores": torch.tensor([0.9, 0.8]),
                       "labels": torch.tensor([1, 1])}]
        with pytest.raises(ValueError, match="image_id=1.*finite xyxy boxes"):
            coco_evaluate(_one_image_gt(), detections)
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, float("nan"), 40], "score": 0.9}]
    with pytest.raises(ValueError, match="image_id=1.*finite"):
        coco_evaluate(_one_image_gt(), results)


def test_non_finite_score_is_an_error_not_a_silent_rank():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 140.0]])
    for value in (float("nan"), float("inf")):
        detections = [{"image_id": 1, "boxes": boxes, "scores": torch.tensor([0.9, value]),
                       "labels": torch.tensor([1, 1])}]
        with pytest.raises(ValueError, match=r"image_id=1: 'score' is (nan|inf); scores must be finite"):
            coco_evaluate(_one_image_gt(), detections)
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": np.float32("nan")}]
    with pytest.raises(ValueError, match=r"image_id=1: 'score' is (np.float32\(nan\)|nan)"):
        coco_evaluate(_one_image_gt(), results)


def test_labels_that_are_not_category_ids_are_listed():
    # 0-based class indices instead of the ground truth's category ids (which start at 1)
    detections = [{"image_id": 1, "boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 140.0]]),
                   "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
    with pytest.raises(ValueError, match=r"labels \[0\] that are not category ids of the ground truth \[1\]"):
        coco_evaluate(_one_image_gt(), detections)


def _exact_results():
    return [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "score": 0.8}]


def test_ground_truth_without_iscrowd_and_area_gets_defaults(tmp_path):
    gt = _one_image_gt()
    for ann in gt["annotations"]:
        del ann["iscrowd"], ann["area"]
    _, coco = _as_file_and_coco(gt, tmp_path)
    for source in (gt, coco):
        assert coco_evaluate(source, _exact_results())["AP"] == 1.0
    assert "iscrowd" not in gt["annotations"][0]                   # the caller's dict is left as it was


def test_annotation_id_zero_is_renumbered_not_scored_as_unmatched(tmp_path):
    """Raw COCOeval reads a ground-truth id 0 as "unmatched" and scores this exact hit as a miss; Roboflow's
    exports start their annotation ids at 0."""
    gt = _one_image_gt()
    gt["annotations"][0]["id"] = 0
    path, coco = _as_file_and_coco(gt, tmp_path)
    for source in (gt, path, coco):
        assert coco_evaluate(source, _exact_results())["AP"] == 1.0


def test_bad_ground_truth_files_and_dicts_are_named(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON") as err:
        coco_evaluate(path, _exact_results())
    assert str(path) in str(err.value)
    gt = _one_image_gt()
    del gt["categories"]
    with pytest.raises(ValueError, match="'categories'"):
        coco_evaluate(gt, _exact_results())
