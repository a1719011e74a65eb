"""Real-format loaders (ImageFolder, COCO, ADE20K-style) read what export_shapes writes, transforms move
targets with the pixels, and bad files fail early with the file and field named."""
import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from asmlp_min.data.datasets import (ADE20KSegmentation, CocoDetection, ImageFolderClassification,
                                     detection_collate, load_coco)
from asmlp_min.data.images import is_image_file
from asmlp_min.data.rle import run_lengths
from asmlp_min.data.shapes import CLASSES, ShapesDetection, export_shapes, make_scene, scene_rng
from asmlp_min.data.transforms import (IMAGENET_MEAN, classification_transforms, detection_transforms,
                                       eval_resize_size, rescaled_size, segmentation_transforms)
from asmlp_min.metrics import coco_evaluate

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


@pytest.fixture(scope="module")
def coco_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, export_shapes(root, task="det", n=4, seed=5)


def test_coco_round_trip(coco_export):
    root, ann_file = coco_export
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(ann_file))                         # pycocotools reading our JSON on its own
    dataset = CocoDetection(root / "train", ann_file)
    assert len(dataset) == 4
    for i in range(4):
        scene = make_scene(scene_rng(5, "train", i))
        anns = reference.imgToAnns[i + 1]
        ref_masks = np.stack([reference.annToMask(a) for a in anns]).astype(bool)
        intersection = (ref_masks & scene.masks).sum((1, 2))
        union = (ref_masks | scene.masks).sum((1, 2))
        assert (intersection == union).all()                    # mask IoU 1.0
        ref_xywh = np.array([a["bbox"] for a in anns], np.float32)
        assert np.abs(ref_xywh[:, :2] + ref_xywh[:, 2:] - scene.boxes_xyxy[:, 2:]).max() <= 1
        image, target = dataset[i]
        assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(scene.image).permute(2, 0, 1))
        assert torch.equal(target["masks"].bool(), torch.from_numpy(scene.masks))
        assert (target["boxes"] - torch.from_numpy(scene.boxes_xyxy)).abs().max() <= 1
        assert torch.equal(target["labels"], torch.from_numpy(scene.kinds) + 1)
        assert target["image_id"] == i + 1
    images, targets = detection_collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2


def test_coco_category_ids_with_gaps_are_kept_or_numbered_1_to_k(coco_export, tmp_path):
    """Real COCO has ids 1..90 with gaps; contiguous_labels numbers the categories in id order, as mmdet does."""
    root, ann_file = coco_export
    coco = json.loads(ann_file.read_text())
    renamed = {1: 5, 2: 17, 3: 90}
    coco["categories"] = [{**c, "id": renamed[c["id"]]} for c in coco["categories"]]
    coco["annotations"] = [{**a, "category_id": renamed[a["category_id"]]} for a in coco["annotations"]]
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps(coco))
    as_ids, numbered = CocoDetection(root / "train", gaps), CocoDetection(root / "train", gaps, contiguous_labels=True)
    assert numbered.category_ids == [5, 17, 90]
    for i in range(len(numbered)):
        kinds = torch.from_numpy(make_scene(scene_rng(5, "train", i)).kinds)
        assert torch.equal(numbered[i][1]["labels"], kinds + 1)
        assert as_ids[i][1]["labels"].tolist() == [renamed[k + 1] for k in kinds.tolist()]


def test_image_folder_reads_the_exported_tree(tmp_path):
    root = export_shapes(tmp_path, task="cls", n=6, seed=6)
    dataset = ImageFolderClassification(root)
    present = sorted({make_scene(scene_rng(6, "train", i)).label for i in range(6)})
    assert dataset.classes == [CLASSES[k] for k in present]
    for path, label in dataset.samples:                         # the folder name is the dominant shape
        index = int(path.rsplit("/", 1)[1][:6])
        assert dataset.classes[label] == CLASSES[make_scene(scene_rng(6, "train", index)).label]
    image, label = dataset[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and len(dataset) == 6


def test_segmentation_folder_reads_the_exported_tree_and_not_its_hidden_files(tmp_path):
    root = export_shapes(tmp_path, task="seg", n=2, seed=7, split="val")
    for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):  # what a copy from a Mac adds beside each file
        (root / folder / "val" / f"._000000{suffix}").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    dataset = ADE20KSegmentation(root, split="val", num_classes=4, reduce_zero_label=False)
    assert [p.name for p in dataset.images] == sorted(p.name for p in (root / "images" / "val").glob("[!.]*"))
    assert len(dataset) == 2 and all(dataset[i][1].shape == (128, 128) for i in range(2))
    image, mask = dataset[1]
    assert torch.equal(mask, torch.from_numpy(make_scene(scene_rng(7, "val", 1)).semantic).long())


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _ade_tree(root, mask, image_size=(4, 4)):
    _write_png(root / "images/training/a.png", np.zeros((*image_size, 3)))
    _write_png(root / "annotations/training/a.png", mask)
    return root


def test_masks_saved_as_jpeg_are_refused_saying_so(tmp_path):
    """A JPEG's compression noise is read as class ids: 9% of an audit's mask pixels, some of classes never drawn."""
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "annotations/training/a.png", format="JPEG")
    with pytest.raises(ValueError, match=r"a.png: mask is JPEG data, not PNG.*save the masks as PNG"):
        ADE20KSegmentation(root, num_classes=2)[0]
    (root / "annotations/training/a.png").rename(root / "annotations/training/a.jpg")
    with pytest.raises(ValueError, match=r"have no mask, e.g. .*a.png; a.jpg is there, but masks must be PNG \(lossy"):
        ADE20KSegmentation(root, num_classes=2)


def test_reduce_zero_label_follows_mmseg(tmp_path):
    root = _ade_tree(tmp_path, [[0, 1, 2, 255]] * 4)
    _, mask = ADE20KSegmentation(root, num_classes=2, reduce_zero_label=True)[0]
    assert mask[0].tolist() == [255, 0, 1, 255]


def test_transforms_move_boxes_and_masks_with_pixels():
    image, target = ShapesDetection(3, seed=8)[2]
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), detection_transforms(train=False)])
    flipped, moved = flip(image, target)
    assert torch.equal(flipped, image.flip(-1))
    assert torch.equal(moved["masks"], target["masks"].flip(-1))
    assert torch.equal(moved["boxes"], masks_to_boxes(moved["masks"]) + torch.tensor([0, 0, 1, 1]))
    torch.manual_seed(0)
    pipeline = detection_transforms(train=True, size=64, scale=(0.05, 0.2))
    kept_fewer = False
    for i in range(3):
        image, target = ShapesDetection(3, seed=8)[i]
        out, crop = pipeline(image, target)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        n = len(crop["boxes"])
        assert len(crop["labels"]) == len(crop["area"]) == len(crop["iscrowd"]) == len(crop["masks"]) == n
        kept_fewer |= n < len(target["boxes"])
        # boxes are re-fitted to the resampled masks: exactly their pixel-edge extent
        assert torch.equal(crop["boxes"], masks_to_boxes(crop["masks"]) + torch.tensor([0, 0, 1, 1]))
    assert kept_fewer                                                      # small crops cut some shapes out


def test_classification_eval_follows_the_paper():
    assert eval_resize_size(224) == 256 and eval_resize_size(112) == 128
    mean_image = torch.tensor(IMAGENET_MEAN).mul(255).round().to(torch.uint8)[:, None, None].expand(3, 300, 400)
    out = classification_transforms(train=False, size=224)(mean_image)
    assert out.shape == (3, 224, 224) and out.abs().max() < 0.01           # the ImageNet mean maps to ~0
    assert classification_transforms(train=True, size=96)(Image.new("RGB", (50, 70))).shape == (3, 96, 96)


def test_segmentation_train_pads_with_ignore():
    torch.manual_seed(0)
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    mask = torch.ones(20, 30, dtype=torch.int64)
    out, crop = segmentation_transforms(train=True, size=64, ratio_range=(0.5, 0.5))(
        tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert out.shape == (3, 64, 64) and crop.dtype == torch.int64
    # mmseg's rescale at ratio 0.5: the scale (128, 32) fits 20x30 to 32x48 (factor min(32/20, 128/30) = 1.6),
    # then padded with 255 to the 64x64 crop
    assert set(crop.unique().tolist()) == {1, 255} and (crop == 1).sum() == 32 * 48


@pytest.mark.parametrize("size, short, long, expected", [
    ((512, 683), 512, 2048, (512, 683)),      # an ADE20K image already at the scale
    ((3024, 4032), 512, 2048, (512, 683)),    # a phone photo: the short side binds, 4032 * 512 / 3024 = 682.7
    ((10, 1000), 512, 2048, (20, 2048)),      # a panorama: the long side binds, scaled up 2.048x
    ((100, 250), 32, 128, (32, 80)),          # factor min(128 / 250, 32 / 100) = 0.32
    ((64, 64), 32, 128, (32, 32)),
    ((2, 5), 1, None, (1, 3)),                # 2.5 rounds half up as mmcv does (Python's round gives 2)
    ((3, 1), None, 2, (2, 1)),                # 0.67 -> 1: a side never rounds to 0
    ((7, 9), None, None, (7, 9))])
def test_rescaled_size_is_mmcvs_imrescale_to_fit_both_sides_for_detection_and_segmentation(size, short, long, expected):
    assert rescaled_size(*size, short, long) == expected


def test_segmentation_eval_rescales_the_image_to_the_test_scale_and_keeps_the_mask():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 100, 250), dtype=torch.uint8))
    mask = torch.randint(0, 4, (100, 250))
    out, kept = segmentation_transforms(train=False, size=32)(image, tv_tensors.Mask(mask))
    assert out.shape == (3, 32, 80) and out.dtype == torch.float32
    assert torch.equal(kept, mask)                                          # scored at the image's own size
    alone = segmentation_transforms(train=False, size=32)(image)           # predict: an image without a mask
    assert torch.equal(alone, out)


# ---------------------------------------------------------------- bad input: clear errors naming file and field

def _coco(tmp_path, **changes):
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "circle"}]}
    for key, value in changes.items():
        if value is None:
            del data[key]
        elif key == "annotations":
            data[key] = [{**data[key][0], **v} for v in value]
        else:
            data[key] = value
    path = tmp_path / "instances_bad.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_ground_truth_always_has_info(tmp_path):
    """pycocotools 2.0.9 and 2.0.10 need dataset['info'] in COCO.loadRes: every COCO dict we build or load has one."""
    assert isinstance(ShapesDetection(2, seed=1).coco_dict()["info"], dict)
    assert isinstance(json.loads(export_shapes(tmp_path, task="det", n=1, seed=1).read_text())["info"], dict)
    path = _coco(tmp_path)
    assert "info" not in json.loads(path.read_text())
    assert load_coco(path).dataset["info"] == {}


@pytest.mark.parametrize("changes, field", [
    ({"images": None}, "'images'"),
    ({"annotations": [{"image_id": 2}]}, "'image_id'"),
    ({"annotations": [{"category_id": 9}]}, "'category_id'"),
    ({"annotations": [{"id": "1"}]}, "'id' must be an int"),
    ({"annotations": [{"bbox": [1, 2, 3]}]}, "'bbox'"),
    ({"images": [{"id": 1, "file_name": "x.png"}] * 2}, r"images\[1\] field 'id' must be an int and no duplicate"),
    ({"annotations": [{"bbox": [1, 1, float("nan"), 3]}]}, "'bbox' must be .* finite numbers"),
    ({"annotations": [{"bbox": [1, 1, float("inf"), 3]}]}, "'bbox' must be .* finite numbers"),
    ({"annotations": [{"bbox": [True, 1, 3, 3]}]}, "'bbox' must be .* finite numbers"),
    ({"categories": []}, "'categories' is empty"),
    ({"images": [{"id": 1, "file_name": "x.png", "height": "8", "width": "8"}]},
     r"images\[0\] \(id=1\) needs 'height' and 'width' as ints >= 1; got '8' x '8'"),
    ({"images": [{"id": 1, "file_name": "x.png", "height": 0, "width": 8}]}, "'height' and 'width' as ints >= 1"),
    ({"categories": [{"id": 1}]}, "needs a 'name'"),
    ({"categories": [{"id": -1, "name": "circle"}], "annotations": [{"category_id": -1}]}, "'id'=-1 must be >= 0"),
    ({"annotations": [{"iscrowd": "0"}]}, "'iscrowd' must be 0 or 1"),
    ({"annotations": [{"iscrowd": 2}]}, "'iscrowd' must be 0 or 1"),
    ({"annotations": [{"area": "9"}]}, "'area' must be a finite number"),
    ({"annotations": [{"image_id": "1"}]}, "'image_id' must be an int"),
    ({"annotations": [{"image_id": True}]}, "'image_id' must be an int"),
    ({"annotations": [{"segmentation": [1, 1, 4, 1, 4, 4]}]}, "'segmentation' must be a list of polygons"),
    ({"annotations": [{"segmentation": {"counts": "abc"}}]}, "'segmentation' must be .* RLE dict"),
    ({"annotations": [{"segmentation": "abc"}]}, "'segmentation' must be"),
    ({"annotations": [{"segmentation": {"counts": [0, 60], "size": [8, 8]}}]}, r"runs of 60 pixels .* 8x8 has 64"),
    ({"annotations": [{"segmentation": {"counts": [0, 66], "size": [8, 8]}}]}, r"runs of 66 pixels .* 8x8 has 64"),
    ({"annotations": [{"segmentation": {"counts": [10, -2, 56], "size": [8, 8]}}]}, r"smallest run -2"),
    ({"annotations": [{"segmentation": {"counts": [0, 64.0], "size": [8, 8]}}]}, r"'counts' must be a list of ints"),
    # each of these crashed the process inside pycocotools when the mask was drawn
    ({"annotations": [{"segmentation": [[1, 1, 4, 1, 4, None]]}]}, r"polygon 0: number 5 is null; every x, y must"),
    ({"annotations": [{"segmentation": [[1, 1, 4, 1, 4, 4], [1, float("nan"), 4, 1, 4, 4]]}]},
     r"polygon 1: number 1 is NaN"),
    ({"annotations": [{"segmentation": [[1, 1, float("inf"), 1, 4, 4]]}]}, r"polygon 0: number 2 is Infinity"),
    ({"annotations": [{"segmentation": [[1, 1, 4, 1, 4, 1e9]]}]}, r"number 5 is 1000000000.0; .* -100,000 and 100,000"),
    ({"annotations": [{"segmentation": [[1, 1, 4, 1, 4, "4"]]}]}, r"number 5 is \"4\""),
])
def test_malformed_coco_names_file_and_field(tmp_path, changes, field):
    path = _coco(tmp_path, **changes)
    with pytest.raises(ValueError, match=field) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_an_annotation_that_is_not_an_object_is_named(tmp_path):
    """It was an AttributeError ('NoneType' object has no attribute 'get') from inside the check."""
    path = _coco(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "annotations": [None]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] must be an object of fields .*, got null") as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_valid_segmentations_pass(tmp_path):
    polygon, rle = [[1, 1, 4, 1, 4, 4]], {"counts": [0, 64], "size": [8, 8]}
    coco = load_coco(_coco(tmp_path, annotations=[{"id": 1, "segmentation": polygon},
                                                  {"id": 2, "segmentation": rle}]))
    assert coco.annToMask(coco.anns[1]).sum() > 0 and coco.annToMask(coco.anns[2]).sum() == 64


def test_compressed_runs_are_read_as_pycocotools_writes_them():
    """The oracle: pycocotools compresses a list of runs we choose (signs, multi-character and delta-coded runs)."""
    for runs in ([0, 64], [5, 3, 56], [1, 40, 2, 1000, 17, 3, 0, 1, 33]):
        compressed = mask_utils.frPyObjects({"counts": runs, "size": [1, sum(runs)]}, 1, sum(runs))["counts"]
        assert run_lengths(compressed) == run_lengths(compressed.decode()) == runs
    assert run_lengths("52") == [5, 2]                           # by hand: '5' = 53 - 48 = 5, '2' = 2


def test_compressed_rle_of_too_few_pixels_is_refused_when_read_not_decoded_from_stray_memory(tmp_path):
    short = mask_utils.frPyObjects({"counts": [10, 20], "size": [8, 8]}, 8, 8)["counts"].decode()
    path = _coco(tmp_path, annotations=[{"id": 5, "segmentation": {"counts": short, "size": [8, 8]}}])
    _write_png(tmp_path / "x.png", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"instances_bad.json: annotation id=5 RLE 'counts' are runs of 30 pixels"):
        CocoDetection(tmp_path, path)[0]


def test_rle_of_another_size_than_its_image_names_file_annotation_and_image(tmp_path):
    path = _coco(tmp_path, annotations=[{"id": 1}, {"id": 7, "segmentation": {"counts": [0, 48], "size": [6, 8]}}])
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id=7\) field 'segmentation' is an RLE of 'size' \[6, 8\]"
                                         r" .* image id=1 \(x.png\) is 8x8") as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_polygons_of_fewer_than_three_points_are_dropped_for_training_only(tmp_path):
    good, short = [1, 1, 4, 1, 4, 4], [1, 2, 3, 4]
    images = [{"id": i, "file_name": "x.png", "height": 8, "width": 8} for i in (1, 2)]
    path = _coco(tmp_path, images=images, annotations=[{"id": 1, "segmentation": [short, good]},
                                                       {"id": 2, "image_id": 2, "segmentation": [short]}])
    _write_png(tmp_path / "x.png", np.zeros((8, 8, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # evaluation keeps them all, without a word
        coco = load_coco(path)
    assert sorted(coco.anns) == [1, 2] and coco.anns[2]["segmentation"] == [short]
    with pytest.warns(UserWarning, match="dropped polygons of fewer than 3 points from 2 annotation.*keep their box"):
        dataset = CocoDetection(tmp_path, path)
    _, target = dataset[0]
    expected = coco.annToMask({**coco.anns[1], "segmentation": [good]})   # pycocotools draws the good polygon
    assert target["boxes"].tolist() == [[1, 1, 4, 4]] and torch.equal(target["masks"][0], torch.from_numpy(expected))
    _, target = dataset[1]                                           # no polygon left: the box stays, without a mask
    assert target["boxes"].tolist() == [[1, 1, 4, 4]] and target["labels"].tolist() == [1] and "masks" not in target


@pytest.mark.parametrize("changes", [{"annotations": []}, {"annotations": None}])
def test_split_without_annotations_warns_that_ap_is_undefined(tmp_path, changes):
    path = _coco(tmp_path, **changes)
    with pytest.warns(UserWarning, match=r"no annotations: AP will be -1 \(undefined\)") as caught:
        coco = load_coco(path)
    assert str(path) in str(caught[0].message) and coco.anns == {}


@pytest.mark.parametrize("file_name", [None, ""])
def test_images_without_file_name_fail_at_load_time_only_for_a_dataset(tmp_path, file_name):
    """An empty name is the image folder itself: it was reported as an unreadable image, at its batch."""
    image = {"id": 1, "height": 8, "width": 8} if file_name is None else {"id": 1, "file_name": "", "height": 8,
                                                                          "width": 8}
    path = _coco(tmp_path, images=[image])
    assert sorted(load_coco(path).imgs) == [1]                     # evaluation needs no file names
    with pytest.raises(ValueError, match=rf"images\[0\] \(id=1\) needs a 'file_name' .*, got {file_name!r}") as err:
        CocoDetection(tmp_path, path)
    assert str(path) in str(err.value)


def test_degenerate_boxes_are_skipped_for_training_with_one_counting_warning(tmp_path):
    path = _coco(tmp_path, annotations=[{"id": 1}, {"id": 2, "bbox": [0, 0, 0, 4]}, {"id": 3, "bbox": [0, 0, 5, -1]}])
    _write_png(tmp_path / "x.png", np.zeros((8, 8, 3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = load_coco(path)
        dataset = CocoDetection(tmp_path, path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 2 annotation" in messages[0] and str(path) in messages[0]
    assert sorted(coco.anns) == [1, 2, 3]                          # the ground truth COCOeval scores keeps them
    assert dataset[0][1]["boxes"].tolist() == [[1, 1, 4, 4]]


def test_image_size_disagreeing_with_json(tmp_path):
    path = _coco(tmp_path)
    _write_png(tmp_path / "x.png", np.zeros((8, 9, 3)))
    with pytest.raises(ValueError, match="'height'x'width'.*phone JPEG stored rotated with an EXIF orientation") as err:
        CocoDetection(tmp_path, path)[0]
    assert "x.png" in str(err.value)


def test_box_only_annotations_with_empty_segmentation_have_no_masks(tmp_path):
    """Box-only exports write "segmentation": [] (as a missing key: boxes, no masks)."""
    path = _coco(tmp_path, annotations=[{"segmentation": []}])
    _write_png(tmp_path / "x.png", np.zeros((8, 8, 3)))
    _, target = CocoDetection(tmp_path, path)[0]
    assert target["boxes"].tolist() == [[1, 1, 4, 4]] and "masks" not in target


def _boxes_gt(tmp_path, annotations, categories=({"id": 1, "name": "circle"},)):
    """One 16 x 16 image (x.png, written) with the given annotations: a dict of hand-written boxes, and its file."""
    gt = {"images": [{"id": 1, "file_name": "x.png", "height": 16, "width": 16}], "categories": list(categories),
          "annotations": [{"image_id": 1, "category_id": 1, "iscrowd": 0, **a} for a in annotations]}
    _write_png(tmp_path / "x.png", np.zeros((16, 16, 3)))
    path = tmp_path / "instances_boxes.json"
    path.write_text(json.dumps(gt))
    return gt, path


def _exact_detections(gt):
    """Each ground-truth box found exactly, as a COCO result."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9 - 0.1 * i}
            for i, a in enumerate(gt["annotations"])]


def test_category_id_0_as_roboflow_exports_it_trains_as_label_1_and_scores(tmp_path):
    categories = [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"}]
    gt, path = _boxes_gt(tmp_path, [{"id": 1, "category_id": 0, "bbox": [1, 2, 3, 4]},
                                    {"id": 2, "category_id": 1, "bbox": [8, 8, 5, 6]}], categories)
    dataset = CocoDetection(tmp_path, path, contiguous_labels=True)
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2] and target["boxes"].tolist() == [[1, 2, 4, 6], [8, 8, 13, 14]]
    assert [dataset.coco.cats[c]["name"] for c in dataset.category_ids] == ["circle", "square"]   # label k's name
    assert coco_evaluate(path, _exact_detections(gt))["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="category id 0 .*'circle'.* label 0, the detectors' background"):
        CocoDetection(tmp_path, path)                                # labels as ids: 0 would be background


def test_annotation_ids_0_and_repeats_are_renumbered_not_scored_as_unmatched(tmp_path):
    """pycocotools reads a ground-truth id 0 as "unmatched" (exact hits would score AP 0.25) and keeps one
    annotation per id; ids are free to change, since results never name them."""
    gt, path = _boxes_gt(tmp_path, [{"id": 0, "bbox": [1, 1, 4, 4]}, {"id": 0, "bbox": [8, 1, 5, 5]},
                                    {"id": 1, "bbox": [2, 9, 6, 5]}])
    for source in (gt, path):
        assert coco_evaluate(source, _exact_detections(gt))["AP"] == pytest.approx(1.0)
    assert [a["id"] for a in gt["annotations"]] == [0, 0, 1]           # the caller's dict is left as it was
    _, target = CocoDetection(tmp_path, path)[0]
    assert target["boxes"].tolist() == [[1, 1, 5, 5], [8, 1, 13, 6], [2, 9, 8, 14]]


def test_box_only_annotations_written_as_empty_or_short_polygons_keep_their_box(tmp_path):
    """Exporters write a box without a mask as [], [[]] or a stray short polygon: the box is trained on either way."""
    _, path = _boxes_gt(tmp_path, [{"id": 1, "bbox": [1, 1, 4, 4], "segmentation": [[]]},
                                   {"id": 2, "bbox": [8, 1, 5, 5], "segmentation": [[1, 2, 3, 4]]},
                                   {"id": 3, "bbox": [2, 9, 6, 5], "segmentation": []}])
    with pytest.warns(UserWarning, match="from 1 annotation"):         # [[]] is box-only, not a short polygon
        _, target = CocoDetection(tmp_path, path)[0]
    assert target["boxes"].tolist() == [[1, 1, 5, 5], [8, 1, 13, 6], [2, 9, 8, 14]]
    assert target["labels"].tolist() == [1, 1, 1] and "masks" not in target


def test_images_without_height_and_width_take_the_decoded_size(tmp_path):
    polygon = [[1, 1, 8, 1, 8, 5]]
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "x.png"}], annotations=[{"segmentation": polygon}])
    _write_png(tmp_path / "x.png", np.zeros((6, 10, 3)))
    _, target = CocoDetection(tmp_path, path)[0]
    with contextlib.redirect_stdout(io.StringIO()):
        sized = COCO(str(_coco(tmp_path, images=[{"id": 1, "file_name": "x.png", "height": 6, "width": 10}],
                               annotations=[{"segmentation": polygon}])))
    assert target["masks"].shape == (1, 6, 10)
    assert torch.equal(target["masks"][0], torch.from_numpy(sized.annToMask(sized.anns[1])))


def test_rle_of_another_size_than_an_image_without_height_and_width(tmp_path):
    rle = {"counts": [0, 48], "size": [6, 8]}
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "x.png"}], annotations=[{"id": 3, "segmentation": rle}])
    _write_png(tmp_path / "x.png", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"x.png: annotation id=3 is an RLE of 'size' \[6, 8\] but the image is 8x8"):
        CocoDetection(tmp_path, path)[0]


def test_missing_image_file_is_not_found_not_truncated(tmp_path):
    path = _coco(tmp_path)
    with pytest.raises(ValueError, match=r"x.png: image file not found; check the image folder .*'file_name'") as err:
        CocoDetection(tmp_path, path)[0]
    assert "unreadable" not in str(err.value)


def test_image_over_the_pil_pixel_limit_names_the_file_and_the_limit(tmp_path, monkeypatch):
    from asmlp_min.data.datasets import load_image
    _write_png(tmp_path / "big.png", np.zeros((8, 8, 3)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)            # 64 pixels > 2 x 10: PIL's DecompressionBombError
    with pytest.raises(ValueError, match=r"big.png: .*exceeds limit.* raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")


def test_annotation_json_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    import builtins

    from asmlp_min.data import datasets

    def latin1_locale_open(file, mode="r", *args, encoding=None, **kwargs):   # open() on a cp1252/latin-1 machine
        return builtins.open(file, mode, *args, encoding=encoding or "latin-1", **kwargs)
    monkeypatch.setattr(datasets, "open", latin1_locale_open, raising=False)
    path = tmp_path / "instances_utf8.json"
    path.write_text(json.dumps({**json.loads(_coco(tmp_path).read_text()), "categories": [{"id": 1, "name": "café"}]},
                               ensure_ascii=False), encoding="utf-8")
    assert load_coco(path).cats[1]["name"] == "café"


def test_truncated_image_names_the_file(tmp_path):
    _write_png(tmp_path / "cat" / "a.png", np.random.default_rng(0).integers(0, 255, (32, 32, 3)))
    data = (tmp_path / "cat" / "a.png").read_bytes()
    (tmp_path / "cat" / "a.png").write_bytes(data[:len(data) // 2])
    dataset = ImageFolderClassification(tmp_path)
    with pytest.raises(ValueError, match="truncated") as err:
        dataset[0]
    assert "a.png" in str(err.value)


def test_empty_folders_are_errors(tmp_path):
    (tmp_path / "cls" / "circle").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images") as err:
        ImageFolderClassification(tmp_path / "cls")
    assert "cls" in str(err.value)
    (tmp_path / "seg/images/training").mkdir(parents=True)
    (tmp_path / "seg/annotations/training").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images") as err:
        ADE20KSegmentation(tmp_path / "seg")
    assert "images/training" in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        ADE20KSegmentation(tmp_path / "missing")


@pytest.mark.parametrize("mask, image_size, message", [
    ([[0, 1], [9, 255]], (2, 2), r"values \[9\] are outside 0..3 \(num_classes=4"),
    ([[0, 1], [2, 3]], (3, 2), r"mask is 2x2 but image is 3x2 \(height x width\); if the image is a photo with an "
                               "EXIF orientation tag"),
])
def test_bad_masks_name_the_file(tmp_path, mask, image_size, message):
    root = _ade_tree(tmp_path, mask, image_size)
    with pytest.raises(ValueError, match=message) as err:
        ADE20KSegmentation(root, num_classes=4, reduce_zero_label=False)[0]
    assert "annotations/training/a.png" in str(err.value)


def test_truncated_mask_names_the_file(tmp_path):
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    mask = root / "annotations/training/a.png"
    mask.write_bytes(mask.read_bytes()[:20])
    with pytest.raises(ValueError, match="annotations/training/a.png: unreadable or truncated mask"):
        ADE20KSegmentation(root, num_classes=4)[0]


def test_coco_without_its_image_folder_or_images_is_refused(coco_export, tmp_path):
    root, ann_file = coco_export
    with pytest.raises(ValueError, match="nowhere: image folder not found"):
        CocoDetection(tmp_path / "nowhere", ann_file)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**json.loads(ann_file.read_text()), "images": [], "annotations": []}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no annotations: AP undefined
        with pytest.raises(ValueError, match="empty.json: field 'images' is empty"):
            CocoDetection(root / "train", empty)


def test_segmentation_train_transforms_need_a_crop_size():
    with pytest.raises(ValueError, match=r"segmentation_transforms\(train=True\) needs size"):
        segmentation_transforms(train=True)


def test_colour_mask_is_rejected(tmp_path):
    root = _ade_tree(tmp_path, np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        ADE20KSegmentation(root, num_classes=4)[0]


def test_missing_mask_is_reported_at_construction(tmp_path):
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    _write_png(root / "images/training/b.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="no mask.*b.png"):
        ADE20KSegmentation(root)


def test_two_images_of_one_name_are_refused_naming_both(tmp_path):
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    _write_png(root / "images/training/a.jpg", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"images/training/a.jpg and .*images/training/a.png: two images named 'a'"):
        ADE20KSegmentation(root, num_classes=4)


def test_masks_without_an_image_are_counted_in_a_warning(tmp_path):
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    _write_png(root / "annotations/training/b.png", np.zeros((4, 4)))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images/training/b.gif")   # not an image extension
    with pytest.warns(UserWarning, match=r"1 mask\(s\) have no image .*e.g. .*annotations/training/b.png"):
        dataset = ADE20KSegmentation(root, num_classes=4)
    assert [p.name for p in dataset.images] == ["a.png"]


def test_mask_extensions_match_in_any_case_as_image_extensions_do(tmp_path):
    _write_png(tmp_path / "images/training/a.JPG", np.zeros((2, 2, 3)))
    _write_png(tmp_path / "annotations/training/a.PNG", [[0, 3], [255, 1]])
    dataset = ADE20KSegmentation(tmp_path, num_classes=4, reduce_zero_label=False)
    assert [(p.name, m.name) for p, m in zip(dataset.images, dataset.masks)] == [("a.JPG", "a.PNG")]
    assert dataset[0][1].tolist() == [[0, 3], [255, 1]]


@pytest.mark.parametrize("num_classes, reduce_zero_label, most", [(256, False, 255), (255, True, 254), (0, False, 255)])
def test_num_classes_that_would_collide_with_the_ignore_value_255_are_refused(tmp_path, num_classes,
                                                                              reduce_zero_label, most):
    root = _ade_tree(tmp_path, np.zeros((4, 4)))
    with pytest.raises(ValueError, match=rf"num_classes must be in 1..{most} .* 255 marks unlabelled pixels"):
        ADE20KSegmentation(root, num_classes=num_classes, reduce_zero_label=reduce_zero_label)
    assert len(ADE20KSegmentation(root, num_classes=most, reduce_zero_label=reduce_zero_label)) == 1


def test_a_16_bit_mask_value_past_the_classes_is_refused_not_read_as_ignore(tmp_path):
    """With reduce_zero_label, file value 256 would be class 255 after the shift: an error, not an ignored pixel."""
    values = np.array([[0, 1], [256, 255]], np.uint16)
    root = _mask_tree(tmp_path, lambda p: Image.fromarray(values).save(p))
    with pytest.raises(ValueError, match=r"a.png: mask values \[256\] are outside 1..150 .* not ignored \(0 and 255\)"):
        ADE20KSegmentation(root)[0]


def _mask_tree(root, save_mask):
    _write_png(root / "images/training/a.png", np.zeros((2, 2, 3)))
    (root / "annotations/training").mkdir(parents=True)
    save_mask(root / "annotations/training/a.png")
    return root


@pytest.mark.parametrize("mode, values, num_classes", [
    ("I;16", np.array([[0, 1], [254, 255]], np.uint16), 255),     # values, not 16-bit intensities scaled to 8 bits
    ("1", np.array([[0, 1], [1, 0]], bool), 2),
    ("I", np.array([[0, 254], [3, 255]], np.int32), 255),
])
def test_16_bit_32_bit_and_1_bit_masks_are_class_ids(tmp_path, mode, values, num_classes):
    # Pillow cannot write mode I as PNG; a TIFF stands in for a 16-bit PNG that an older Pillow opens as I
    root = _mask_tree(tmp_path, lambda p: Image.fromarray(values).save(p, format="TIFF" if mode == "I" else "PNG"))
    with Image.open(root / "annotations/training/a.png") as written:
        assert written.mode == mode
    _, mask = ADE20KSegmentation(root, num_classes=num_classes, reduce_zero_label=False)[0]
    assert mask.tolist() == values.astype(int).tolist()


def test_negative_mask_values_are_refused(tmp_path):
    values = np.array([[0, 1], [-2, 255]], np.int32)
    root = _mask_tree(tmp_path, lambda p: Image.fromarray(values).save(p, format="TIFF"))
    with pytest.raises(ValueError, match=r"a.png: mask values \[-2\] are outside 0..3"):
        ADE20KSegmentation(root, num_classes=4, reduce_zero_label=False)[0]


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    from asmlp_min.data.datasets import load_image
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63000 of 65535
    Image.fromarray(values).save(tmp_path / "gray16.png")
    image = load_image(tmp_path / "gray16.png")
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    want = torch.from_numpy(np.round(values / 257.0).astype(np.uint8))
    assert torch.equal(image[0], want) and torch.equal(image[2], want)
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(tmp_path / "rgb8.png")
    assert torch.equal(load_image(tmp_path / "rgb8.png"), torch.full((3, 4, 4), 200, dtype=torch.uint8))


def test_32_bit_float_pixels_are_refused_not_read_as_a_black_image(tmp_path):
    """convert("RGB") truncated a TIFF of floats in 0-1 to 0 everywhere; no scale is standard, so it is refused."""
    from asmlp_min.data.datasets import load_image
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    with pytest.raises(ValueError, match=r"float.tif: 32-bit float pixels \(values 0 to 1\) have no standard 0-255 "
                                         "scale; save the image as 8-bit or 16-bit"):
        load_image(tmp_path / "float.tif")


def test_upright_applies_the_exif_orientation_and_datasets_keep_the_stored_pixels(tmp_path, monkeypatch):
    """A phone photo stored sideways with EXIF Orientation 6 ("turn 90 degrees clockwise to view"): drawn by hand,
    the stored 20 x 40 image with a red top-left block is shown 40 x 20 with the block at the top right."""
    from asmlp_min.data.datasets import load_image
    monkeypatch.setattr("asmlp_min.data.images._warned_turned", [])
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6                                            # the Orientation tag
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with pytest.warns(UserWarning, match="EXIF orientation tag is not applied"):
        as_stored = load_image(tmp_path / "phone.jpg")
    assert as_stored.shape == (3, 20, 40) and as_stored[0, :8, :8].float().mean() > 200
    upright = load_image(tmp_path / "phone.jpg", upright=True)
    assert upright.shape == (3, 40, 20)
    assert upright[0, :8, -8:].float().mean() > 200 and upright[0, :8, :8].float().mean() < 50


# The eight EXIF orientations written out by hand: how the stored (h, w, 3) array is shown
SHOWN = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.transpose(1, 0, 2),
         6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a.transpose(1, 0, 2), 2), 8: lambda a: np.rot90(a, 1)}
# EXIF of a camera that mistyped one tag (SamplesPerPixel written as the text "Maker"), beside Orientation 6:
# ImageOps.exif_transpose, which rewrites the EXIF block, fails on it with struct.error
MISTYPED_EXIF = bytes.fromhex("4578696600004d4d002a000000080002011500020000000600000026011200030000000100060000"
                              "000000004d616b657200")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_shows_each_exif_orientation_as_the_standard_says(tmp_path, orientation):
    from asmlp_min.data.datasets import load_image
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "x.png", exif=exif)
    want = torch.from_numpy(np.ascontiguousarray(SHOWN[orientation](stored))).permute(2, 0, 1)
    assert torch.equal(load_image(tmp_path / "x.png", upright=True), want)


def test_a_mistyped_exif_tag_still_turns_the_photo_and_unparsable_exif_keeps_the_stored_pixels(tmp_path):
    from asmlp_min.data.datasets import load_image
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(stored).save(tmp_path / "camera.png", exif=MISTYPED_EXIF)
    want = torch.from_numpy(np.ascontiguousarray(SHOWN[6](stored))).permute(2, 0, 1)
    assert torch.equal(load_image(tmp_path / "camera.png", upright=True), want)
    Image.fromarray(stored).save(tmp_path / "garbled.png", exif=MISTYPED_EXIF[:6] + b"ZZ" + MISTYPED_EXIF[8:])  # no
    # byte order: PIL cannot parse the EXIF at all (SyntaxError, as for a corrupt image)
    assert torch.equal(load_image(tmp_path / "garbled.png", upright=True), torch.from_numpy(stored).permute(2, 0, 1))


def test_a_detection_image_whose_tag_would_turn_it_is_read_as_stored_with_one_warning(tmp_path, monkeypatch):
    """Turned 180 degrees, its size is the same, so no size check catches boxes drawn on the upright picture."""
    import asmlp_min.data.images as images
    monkeypatch.setattr(images, "_warned_turned", [])
    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 3
    for name in ("a.png", "b.png"):
        Image.fromarray(stored).save(tmp_path / name, exif=exif)
    with pytest.warns(UserWarning, match=r"a.png: its EXIF orientation tag is not applied here") as seen:
        assert torch.equal(images.load_image(tmp_path / "a.png"), torch.from_numpy(stored).permute(2, 0, 1))
        images.load_image(tmp_path / "b.png")
        images.load_image(tmp_path / "b.png", upright=True)
    assert len(seen) == 1


def test_classification_folders_turn_photos_upright_as_predict_does(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6                                            # shown 40 x 20, the block at the top right
    (tmp_path / "cat").mkdir()
    Image.fromarray(stored).save(tmp_path / "cat" / "phone.jpg", exif=exif, quality=95)
    image, _ = ImageFolderClassification(tmp_path)[0]
    assert image.shape == (3, 40, 20) and image[0, :8, -8:].mean() > 0.8


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """Jupyter leaves .ipynb_checkpoints beside and inside class folders; macOS leaves ._ files."""
    for path in ("cat/a.png", "dog/b.png", ".ipynb_checkpoints/a.png", "cat/.ipynb_checkpoints/a.png", "dog/._b.png"):
        _write_png(tmp_path / path, np.zeros((4, 4, 3)))
    dataset = ImageFolderClassification(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(str(Path(p).relative_to(tmp_path)) for p, _ in dataset.samples) == ["cat/a.png", "dog/b.png"]
    for name in ("cat", "dog"):
        (tmp_path / name / "a.png").unlink(missing_ok=True)
        (tmp_path / name / "b.png").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no images"):       # only hidden files left: nothing to train on
        ImageFolderClassification(tmp_path)


@pytest.mark.parametrize("path, expected", [
    ("a.jpg", True), ("b.JPEG", True), ("dir.d/c.Png", True), ("d.webp", True), ("e.bmp", True),
    ("._a.jpg", False), (".a.png", False), ("a.txt", False), ("a.jpg.json", False), ("jpg", False)])
def test_an_image_file_is_a_visible_name_with_an_image_extension(path, expected):
    """The rule ImageFolder, ADE20K and predict share (data/images.py); the folder is not looked at."""
    assert is_image_file(path) is expected and is_image_file(Path(path)) is expected


def test_class_folders_hold_the_images_torchvision_finds_in_them(tmp_path):
    """TIFF, PPM and PGM too (scanners and microscopes write them), as torchvision's ImageFolder keeps them."""
    from torchvision.datasets import ImageFolder
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.jpg", "b.tif", "c.TIFF", "d.ppm", "e.pgm", "f.webp", "g.bmp", "notes.txt"]):
        path = tmp_path / ("cat" if i % 2 else "dog") / name
        path.parent.mkdir(exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
            continue
        pixels = rng.integers(0, 256, (5, 7) if name.endswith(".pgm") else (5, 7, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="TIFF" if name.lower().endswith(("tif", "tiff")) else None)
    ours = ImageFolderClassification(tmp_path)
    assert sorted(map(str, ours.samples)) == sorted(map(str, ImageFolder(tmp_path).samples))
    assert len(ours) == 7 and all(image.shape == (3, 5, 7) for image, _ in ours)


@pytest.mark.parametrize("empty", [["dog"], ["St. Bernard"], ["Mr. X", "dog"]])
def test_an_empty_class_folder_is_named_in_the_error(tmp_path, empty):
    """torchvision refuses a class folder without images; the message names it, not "no images found", and whole:
    "St. Bernard" was cut to "St"."""
    _write_png(tmp_path / "cat/a.png", np.zeros((4, 4, 3)))
    for name in empty:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("not an image")
    named = re.escape(", ".join(empty))
    with pytest.raises(ValueError, match=rf"class folder\(s\) {named} hold no images \(\.jpg, .*add images or remove"):
        ImageFolderClassification(tmp_path)


def test_ade20k_classes_are_named_and_other_layouts_by_their_id_in_the_masks(tmp_path):
    root = _ade_tree(tmp_path, [[0, 1, 2, 150]] * 4)
    ade = ADE20KSegmentation(root)
    assert len(ade.classes) == 150 and ade.classes[:3] == ["wall", "building", "sky"] and ade.classes[-1] == "flag"
    assert ade[0][1][0].tolist() == [255, 0, 1, 149]           # mask id 1 (wall) is index 0, named "wall"
    assert ADE20KSegmentation(root, num_classes=151, reduce_zero_label=True).classes[:2] == ["1", "2"]
    assert ADE20KSegmentation(root, num_classes=151, reduce_zero_label=False).classes[:2] == ["0", "1"]
