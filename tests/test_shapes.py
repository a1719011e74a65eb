"""The synthetic shapes generator: determinism, label definitions, difficulty, on-disk export."""
import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes

from asmlp_min.data import shapes
from asmlp_min.data.shapes import (CLASSES, MIN_VISIBLE_PX, ShapesClassification, ShapesDetection,
                                   ShapesSegmentation, export_shapes, make_scene, scene_rng, scenes)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


def _bytes(scene):
    return scene.image.tobytes() + scene.masks.tobytes() + scene.kinds.tobytes() + scene.semantic.tobytes()


def test_same_seed_gives_identical_bytes():
    a = make_scene(scene_rng(7, "train", 3))
    b = make_scene(scene_rng(7, "train", 3))
    assert _bytes(a) == _bytes(b)


def test_different_seed_split_or_index_gives_a_different_scene():
    ref = make_scene(scene_rng(7, "train", 3)).image.tobytes()
    for other in (scene_rng(8, "train", 3), scene_rng(7, "val", 3), scene_rng(7, "train", 4)):
        assert make_scene(other).image.tobytes() != ref


def test_labels_follow_their_definitions():
    for scene in scenes(12, seed=1):
        n = len(scene.kinds)
        assert 1 <= n <= 4 and scene.masks.shape == (n, 128, 128) and scene.image.shape == (128, 128, 3)
        assert scene.masks.sum(0).max() <= 1                              # visible masks never overlap
        expected_semantic = np.zeros((128, 128), np.uint8)
        for mask, kind in zip(scene.masks, scene.kinds):
            expected_semantic[mask] = kind + 1
        assert np.array_equal(scene.semantic, expected_semantic)
        pixels = [int(np.count_nonzero(m)) for m in scene.masks]
        assert min(pixels) >= MIN_VISIBLE_PX
        assert scene.label == scene.kinds[pixels.index(max(pixels))]      # dominant = largest visible, first on ties
        # torchvision's masks_to_boxes gives inclusive x2/y2; ours are pixel edges, one more
        oracle = masks_to_boxes(torch.from_numpy(scene.masks)) + torch.tensor([0, 0, 1, 1])
        assert torch.equal(torch.from_numpy(scene.boxes_xyxy), oracle)
        for ann, mask in zip(scene.coco_annotations(image_id=5, first_id=10), scene.masks):
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0 and ann["image_id"] == 5


def test_masks_are_exactly_the_drawn_pixels():
    # without noise each instance is one flat colour: the mask must cover exactly the pixels painted
    for seed in range(6):
        scene = make_scene(seed, noise=0)
        for mask in scene.masks:
            assert len(np.unique(scene.image[mask], axis=0)) == 1
            colour = scene.image[mask][0]
            ring = np.zeros_like(mask)                                  # pixels just outside the mask
            ring[:-1] |= mask[1:]
            ring[1:] |= mask[:-1]
            ring[:, :-1] |= mask[:, 1:]
            ring[:, 1:] |= mask[:, :-1]
            outside = ring & ~mask & (scene.semantic == 0)
            assert not (scene.image[outside] == colour).all(1).any()


def test_default_difficulty():
    batch = scenes(40, seed=2)
    kinds = np.concatenate([s.kinds for s in batch])
    counts = [len(s.kinds) for s in batch]
    boxes = np.concatenate([s.boxes_xyxy for s in batch])
    assert set(kinds.tolist()) == {0, 1, 2} and min(counts) == 1 and max(counts) == 4
    assert ((boxes[:, :2] == 0) | (boxes[:, 2:] == 128)).any(1).sum() >= 5         # cut by the border
    sides = boxes[:, 2:] - boxes[:, :2]
    assert sides.max() <= np.ceil(52 * np.sqrt(2)) + 1                             # a 52-px square, diagonal
    bg = np.concatenate([s.image[s.semantic == 0] for s in batch]).astype(float)
    assert bg.std(0).min() > 20                                                    # background is not flat
    # occlusion: some instance is visibly less than its whole shape while lying inside the image
    areas = np.concatenate([s.areas for s in batch])
    assert (areas < 0.9 * sides.prod(1)).any()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        scene_rng(0, "training")
    with pytest.raises(ValueError, match="seed"):
        scene_rng(-1)
    with pytest.raises(ValueError, match="size_range"):
        make_scene(0, size_range=(30, 10))
    with pytest.raises(ValueError, match="task"):
        export_shapes("unused", task="detection")
    with pytest.raises(ValueError, match="n must be"):
        ShapesClassification(0)


def _convex_hull(points):
    """Andrew's monotone chain: the hull of (n, 2) integer points, counter-clockwise."""
    pts = sorted(map(tuple, points))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])  # noqa: E731
    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]
    return np.array(half(pts) + half(pts[::-1]))


def test_whole_shapes_are_inside_the_image_and_uncovered():
    from matplotlib.path import Path as Polygon
    # circles, squares and triangles are convex: a whole, uncovered one fills its own convex hull, and a cut or
    # covered one does not (a border cut also shows as a mask touching the image edge)
    grid = np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), -1).reshape(-1, 2)
    n_shapes = 0
    for seed in range(40):
        scene = make_scene(seed, 64, max_shapes=3, size_range=(16, 40), whole=True, noise=0)
        for mask in scene.masks:
            n_shapes += 1
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            hull = Polygon(_convex_hull(np.argwhere(mask)))
            inside_hull = hull.contains_points(grid, radius=-1.0).reshape(64, 64)   # strictly inside, 1 px in
            assert mask[inside_hull].all()
    assert n_shapes > 40                                   # several shapes per scene, so covering was possible
    flat = make_scene(3, 64, whole=True, size_range=(16, 40), background="flat", noise=0)
    background = flat.image[flat.semantic == 0]
    assert len(np.unique(background, axis=0)) == 1 and len(set(background[0])) == 1     # one grey
    assert shapes.CLS_SCENE["whole"] and shapes.CLS_SCENE["max_shapes"] == 1


def test_whole_and_background_are_checked():
    with pytest.raises(ValueError, match="sqrt"):
        make_scene(0, 64, size_range=(16, 60), whole=True)
    with pytest.raises(ValueError, match="background"):
        make_scene(0, background="grey")


def test_datasets_return_documented_types():
    image, label = ShapesClassification(2, seed=3)[1]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label == make_scene(scene_rng(3, "train", 1)).label
    image, target = ShapesDetection(2, seed=3)[1]
    scene = make_scene(scene_rng(3, "train", 1))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["image_id"] == 2
    assert torch.equal(target["labels"], torch.from_numpy(scene.kinds) + 1)
    assert torch.equal(target["masks"].bool(), torch.from_numpy(scene.masks))
    image, mask = ShapesSegmentation(2, seed=3)[1]
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(scene.semantic).long())
    train = [image for image, _ in ShapesSegmentation(3, split="train")]
    val = [image for image, _ in ShapesSegmentation(3, split="val")]
    assert all(not torch.equal(a, b) for a in train for b in val)


def test_export_is_deterministic_and_reuses_files(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        ann_file = export_shapes(root, task="det", n=3, seed=4)
    assert (tmp_path / "a" / "annotations" / "instances_train.json").read_bytes() == \
        (tmp_path / "b" / "annotations" / "instances_train.json").read_bytes()
    assert (tmp_path / "a/train/000002.png").read_bytes() == (tmp_path / "b/train/000002.png").read_bytes()
    coco = json.loads(ann_file.read_text())
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))

    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.*")}
    export_shapes(tmp_path / "a", task="det", n=3, seed=4)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.*")} == stamp

    cls_root = export_shapes(tmp_path / "cls", task="cls", n=5, seed=4)
    for i in range(5):
        label = make_scene(scene_rng(4, "train", i)).label
        assert (cls_root / CLASSES[label] / f"{i:06d}.png").is_file()
    seg_root = export_shapes(tmp_path / "seg", task="seg", n=2, seed=4, split="val")
    assert sorted(p.name for p in (seg_root / "annotations" / "val").iterdir()) == ["000000.png", "000001.png"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real_replace = os.replace

    def interrupted_on_png(src, dst):
        if str(dst).endswith(".png"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", interrupted_on_png)
    with pytest.raises(KeyboardInterrupt):
        export_shapes(tmp_path, task="seg", n=1)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [".shapes-seg-train.json"]


def test_generation_uses_no_global_random_state():
    np.random.seed(0)
    torch.manual_seed(0)
    a = make_scene(11).image.tobytes()
    np.random.seed(1)
    torch.manual_seed(1)
    assert make_scene(11).image.tobytes() == a
    assert shapes.NUM_SEG_CLASSES == len(CLASSES) + 1


def test_export_refuses_to_mix_settings(tmp_path):
    export_shapes(tmp_path, task="seg", n=1, seed=1)
    with pytest.raises(ValueError, match="already holds shapes"):
        export_shapes(tmp_path, task="seg", n=1, seed=2)
    export_shapes(tmp_path, task="seg", n=1, seed=2, split="val")     # another split is another dataset
