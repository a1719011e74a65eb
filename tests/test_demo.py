"""``asmlp-min demo``: its scenes are well posed, its targets are issue 16's and lie above chance.

The demo's training itself is covered by the quick run in test_cli.py; nothing here trains.
"""
import json

import numpy as np
import pytest
from PIL import Image

from asmlp_min.data.shapes import make_scene, scene_rng
from asmlp_min.demo import SCENES, TARGETS, chance_levels, demo_configs, export_data, missed_targets


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The quick demo's three datasets, written as the demo writes them."""
    root = tmp_path_factory.mktemp("demo")
    configs = demo_configs(root / "runs", root / "data", quick=True)
    return {task: (cfg, export_data(cfg)) for task, cfg in configs.items()}


def border(array: np.ndarray) -> np.ndarray:
    """The one-pixel frame of an (h, w, ...) array, as (4 * (side - 1), ...)."""
    return np.concatenate([array[0, :-1], array[:-1, -1], array[-1, 1:], array[1:, 0]])


def test_every_demo_scene_on_disk_keeps_its_shapes_inside_the_image(exported):
    """Issue 16: a shape cut by the border can carry the wrong label (half a square reads as a triangle)."""
    cfg, root = exported["cls"]
    images = sorted(root.glob("*/*/*.png"))
    assert len(images) == cfg.train_size + cfg.val_size
    for path in images:  # only flat grey (one level +- the noise of 16) may touch the border, never a shape
        frame = border(np.asarray(Image.open(path)).astype(int))
        assert frame.max() - frame.min() <= 32, path
    cfg, root = exported["seg"]
    masks = sorted((root / "annotations").glob("*/*.png"))
    assert len(masks) == cfg.train_size + cfg.val_size
    assert all(not border(np.asarray(Image.open(path))).any() for path in masks)
    cfg, root = exported["det"]
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
        for ann in coco["annotations"]:
            (x, y, w, h), (width, height) = ann["bbox"], sizes[ann["image_id"]]
            assert x >= 1 and y >= 1 and x + w <= width - 1 and y + h <= height - 1, ann


def test_classification_uses_the_generators_well_posed_scenes_and_det_seg_whole_shapes_on_grey():
    from asmlp_min.data.shapes import CLS_SCENE
    assert SCENES["cls"] == CLS_SCENE
    assert all(SCENES[task]["whole"] and SCENES[task]["background"] == "flat" for task in ("det", "seg"))


def test_targets_are_issue_16s_and_a_miss_is_named():
    assert TARGETS == {"cls": ("top1", 0.95), "det": ("AP", 0.7), "seg": ("mIoU", 0.6)}
    missed = missed_targets({"cls": {"top1": 0.949}, "det": {"AP": 0.7}, "seg": {"mIoU": float("nan")}})
    assert missed == ["classification: top1 0.949 < target 0.95", "semantic segmentation: mIoU nan < target 0.6"]
    assert missed_targets({"cls": {"top1": 0.95}, "det": {"AP": 0.8}, "seg": {"mIoU": 0.6}}) == []


def test_chance_levels_match_a_hand_count_and_lie_below_the_targets(exported):
    cfg, root = exported["cls"]
    per_class = [len(list(folder.glob("*.png"))) for folder in sorted((root / "val").iterdir())]
    assert chance_levels("cls", cfg.seed, cfg.val_size)["top1"] == max(per_class) / cfg.val_size
    n = 12
    semantic = np.stack([make_scene(scene_rng(0, "val", i), **SCENES["seg"]).semantic for i in range(n)])
    # all background: IoU(background) = its pixel share, every shape class present in the truth scores 0
    expected = (semantic == 0).mean() / len(np.unique(semantic))
    seg = chance_levels("seg", 0, n)
    assert seg["all background"] == pytest.approx(expected, abs=1e-12)
    assert expected < seg["class guessed"] < TARGETS["seg"][1]
    assert chance_levels("det", 0, n)["AP"] < 0.02 < TARGETS["det"][1]
