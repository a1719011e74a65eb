"""SimpleFPNDetector (FCOS-style) and the paper's Mask R-CNN: targets by hand, losses by formula, behaviour."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from asmlp_min.backbone import IMAGENET_MEAN, IMAGENET_STD, create_model
from asmlp_min.block import DropPath
from asmlp_min.checkpoint import CheckpointError
from asmlp_min.complexity import count_params
from asmlp_min.detection import SimpleFPNDetector, build_maskrcnn, sanitize_boxes
from asmlp_min.fcos import FCOSHead, assign_targets, centerness_target, fcos_losses, fcos_regress_ranges, level_points

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), fpn_channels=32, num_convs=1, drop_path_rate=0.0)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_detector(**kw) -> SimpleFPNDetector:
    torch.manual_seed(0)
    return SimpleFPNDetector("asmlp_tiny", num_classes=3, **{**TINY, **kw})


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


# ---------------------------------------------------------------- target assignment

def two_level_points():
    """A 32x32 image: stride 8 (4x4 centres at 4, 12, 20, 28) and stride 16 (2x2 centres at 8, 24)."""
    points = torch.cat([level_points(4, 4, 8), level_points(2, 2, 16)])
    strides = torch.tensor([8.0] * 16 + [16.0] * 4)
    ranges = torch.tensor([[0.0, 12.0]] * 16 + [[12.0, math.inf]] * 4)
    return points, strides, ranges


def test_level_points_are_pixel_centres_row_by_row():
    assert level_points(2, 3, 8).tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_assign_targets_on_hand_made_boxes():
    """A = [0, 0, 16, 16] (class 0), B = [8, 8, 32, 32] (class 1); worked out location by location.

    Stride 8: the four centres in A have max(l, t, r, b) = 12 <= 12, positive for A, including (12, 12)
    which B also contains but whose distances to B reach 20 (too big for this level). In B only (20, 20)
    has max distance 12; the others reach 20. Stride 16: A's only centre (8, 8) has max distance 8, not
    > 12; (24, 24) reaches 16 in B and is within 1.5 * 16 of B's centre (20, 20). The other centres lie on
    a side of B (distance 0 is not inside).
    """
    points, strides, ranges = two_level_points()
    boxes = torch.tensor([[0.0, 0, 16, 16], [8, 8, 32, 32]])
    labels, matched = assign_targets(points, strides, ranges, boxes, torch.tensor([0, 1]), 1.5)
    expected_p3 = [[0, 0, -1, -1],
                   [0, 0, -1, -1],
                   [-1, -1, 1, -1],
                   [-1, -1, -1, -1]]
    expected_p4 = [[-1, -1],
                   [-1, 1]]
    assert labels[:16].view(4, 4).tolist() == expected_p3
    assert labels[16:].view(2, 2).tolist() == expected_p4
    assert torch.equal(matched[labels == 0], boxes[0].expand(4, 4))
    assert torch.equal(matched[labels == 1], boxes[1].expand(2, 4))
    assert torch.equal(matched[labels == -1], torch.zeros(14, 4))


def test_smallest_box_wins_and_centre_sampling_limits_positives():
    points = level_points(4, 4, 8)
    strides, ranges = torch.full((16,), 8.0), torch.tensor([[0.0, math.inf]]).expand(16, 2)
    nested = torch.tensor([[0.0, 0, 16, 16], [0, 0, 24, 24]])
    labels, _ = assign_targets(points, strides, ranges, nested, torch.tensor([2, 1]), 1.5)
    assert labels[0] == 2           # (4, 4) lies in both: the smaller box (area 256 < 576) wins
    assert labels[10] == 1          # (20, 20) lies only in the big box
    wide = torch.tensor([[0.0, 0, 32, 16]])  # centre (16, 8): with radius 1.5 only |x - 16| < 12 qualifies
    near, _ = assign_targets(points, strides, ranges, wide, torch.tensor([0]), 1.5)
    anywhere, _ = assign_targets(points, strides, ranges, wide, torch.tensor([0]), 100.0)
    assert (near[:8] == 0).tolist() == [False, True, True, False] * 2
    assert (anywhere[:8] == 0).all() and (anywhere[8:] == -1).all()


def test_fcos_regress_ranges_follow_the_paper():
    assert fcos_regress_ranges((8, 16, 32, 64, 128)) == (
        (0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))


def test_no_boxes_means_all_background():
    points, strides, ranges = two_level_points()
    labels, matched = assign_targets(points, strides, ranges, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (labels == -1).all() and not matched.any()


# ---------------------------------------------------------------- losses

def test_fcos_losses_by_formula():
    """Logits 0 everywhere (p = 1/2) and a perfect box: every term is known in closed form.

    Focal loss of p = 1/2: alpha (1/2)^2 ln 2 per positive entry, (1 - alpha) (1/2)^2 ln 2 per negative
    entry; GIoU of identical boxes is 1 (loss 0); BCE of logit 0 is ln 2 whatever the target.
    """
    points = level_points(2, 2, 8)                                        # 4 locations, 3 classes
    target_labels = torch.tensor([[1, -1, -1, -1]])
    target_boxes = torch.tensor([[[0.0, 0, 10, 12], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    ltrb = torch.zeros(1, 4, 4)
    ltrb[0, 0] = torch.tensor([4.0, 4, 6, 8])                             # (4, 4) -> box [0, 0, 10, 12]
    losses = fcos_losses(torch.zeros(1, 4, 3), ltrb, torch.zeros(1, 4), points, target_labels, target_boxes, 3)
    expected_cls = (0.25 * 1 + 0.75 * 11) * 0.25 * math.log(2) / 1        # 1 positive entry, 11 negative
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_centerness"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_single_image_overfit():
    """60 AdamW steps on one scene: the loss falls >= 5x towards its floor and the best box lands on a real one.

    Centre-ness is a BCE against soft targets c, so the total loss cannot go below their mean entropy
    H(c) = -c log c - (1 - c) log(1 - c) (a constant here: one image, fixed targets); focal and GIoU losses go to 0.
    """
    from asmlp_min.data import ShapesDetection
    image, tgt = ShapesDetection(1, seed=3, image_size=64, size_range=(12, 30))[0]
    model = tiny_detector()
    _, _, _, clean = model.preprocess([image], [tgt])
    points = torch.cat([level_points(64 // s, 64 // s, s) for s in model.strides])
    labels, boxes = model.location_targets(points, [(64 // s, 64 // s) for s in model.strides], clean)
    positive = labels[0] >= 0
    c = centerness_target(points[positive], boxes[0, positive])
    floor = F.binary_cross_entropy(c, c).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(60):
        losses = model([image], [tgt])
        history.append(sum(losses.values()).item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[0] - floor >= 5 * (history[-1] - floor) and history[-1] > floor
    model.eval()
    with torch.no_grad():
        best = model([image])[0]
    from torchvision.ops import box_iou
    assert box_iou(best["boxes"][:1], tgt["boxes"].as_subclass(torch.Tensor)).max() > 0.5
    assert best["labels"][0] in tgt["labels"]


# ---------------------------------------------------------------- call convention and inputs

def test_eval_output_format():
    model = tiny_detector(score_thresh=0.0, detections_per_img=7).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 40)]
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, img in zip(outputs, images):
        assert set(out) == {"boxes", "scores", "labels"}
        assert out["boxes"].shape == (7, 4) and out["scores"].shape == (7,) and out["labels"].shape == (7,)
        assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()           # sorted, best first
        h, w = img.shape[-2:]
        boxes = out["boxes"]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()


def test_postprocess_by_hand():
    """Four locations of one level, 3 classes, each box 20x20 around its point (l = t = r = b = 10):
    A (class 0, strong) and B (class 1, beside A, IoU 0.82) both stay: NMS works per class. C (class 0, weaker,
    IoU 0.82 with A) goes. D scores below score_thresh. Scores sqrt(sigmoid(class) * sigmoid(centre-ness)); boxes
    scaled from the 40x40 network input to the 80x120 original (x 3 across, x 2 down)."""
    model = tiny_detector().eval()
    points = torch.tensor([[20.0, 20], [21, 20], [22, 20], [30, 30]])
    cls_logits = torch.full((4, 3), -20.0)
    cls_logits[0, 0], cls_logits[1, 1], cls_logits[2, 0], cls_logits[3, 2] = 3.0, 1.0, 2.0, -7.0
    ctr_logits = torch.tensor([1.0, 0.5, 0.0, 0.0])
    ltrb = torch.full((4, 4), 10.0)
    out = model.postprocess(cls_logits, ltrb, ctr_logits, points, [4], (40, 40), (80, 120))

    def score(a, c):
        return math.sqrt(1 / (1 + math.exp(-a)) / (1 + math.exp(-c)))

    assert out["labels"].tolist() == [1, 2]
    torch.testing.assert_close(out["scores"], torch.tensor([score(3.0, 1.0), score(1.0, 0.5)]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[30.0, 20, 90, 60], [33, 20, 93, 60]]))
    assert score(2.0, 0.0) > model.score_thresh > score(-7.0, 0.0)  # C is removed by NMS, D by the threshold


def test_train_mode_returns_three_finite_losses_with_gradients():
    model = tiny_detector().train()
    losses = model([torch.rand(3, 64, 64)], [target([[8, 8, 40, 36]], [2])])
    assert set(losses) == {"loss_cls", "loss_box", "loss_centerness"}
    assert all(v.dim() == 0 and v.isfinite() for v in losses.values())
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


def test_images_of_different_sizes_in_one_batch():
    model = tiny_detector().train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 33), torch.rand(3, 96, 40)]
    batch, sizes, originals, _ = model.preprocess(images)
    assert batch.shape == (3, 3, 96, 96) and sizes == originals == [(64, 80), (50, 33), (96, 40)]
    assert (batch[1, :, 50:] == 0).all() and (batch[1, :, :, 33:] == 0).all()   # zero padding right/bottom
    targets = [target([[0, 0, 30, 30]], [1]), target([[5, 5, 30, 45]], [2]), target([[10, 50, 40, 90]], [3])]
    losses = model(images, targets)
    assert all(v.isfinite() for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out, (h, w) in zip(outputs, originals):
        assert (out["boxes"][:, [0, 2]] <= w).all() and (out["boxes"][:, [1, 3]] <= h).all()


def test_an_images_detections_do_not_depend_on_its_batch_mates():
    """GroupNorm(1, c) averages over the padded map, so a 96x128 image padded to 128x128 beside a 128x96 one
    would get other features and boxes; in eval each size runs as its own batch."""
    model = tiny_detector(score_thresh=0.0, detections_per_img=20).eval()
    torch.manual_seed(1)
    landscape, portrait = torch.rand(3, 96, 128), torch.rand(3, 128, 96)
    with torch.no_grad():
        alone, alone_portrait = model([landscape])[0], model([portrait])[0]
        batched = model([landscape, portrait, landscape])
        padded_together = model._detect([landscape, portrait])[0]  # one padded batch, what eval avoids
    for got, want in [(batched[0], alone), (batched[1], alone_portrait), (batched[2], alone)]:
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    assert (padded_together["scores"] - alone["scores"]).abs().max() > 1e-3  # the padding does change them


def test_resizing_scales_boxes_in_and_out():
    model = tiny_detector(min_size=100, max_size=150).eval()
    batch, sizes, originals, targets = model.preprocess([torch.rand(3, 50, 100)], [target([[10, 20, 30, 40]], [1])])
    assert sizes == [(75, 150)] and originals == [(50, 100)]            # 1.5x: the long side hits max_size
    assert batch.shape == (1, 3, 96, 160)
    assert targets[0]["boxes"].tolist() == [[15, 30, 45, 60]] and targets[0]["labels"].tolist() == [0]
    # A 2x nearest-upsampled copy is resized back to exactly the same pixels: same scores, boxes x2.
    model = tiny_detector(min_size=64, max_size=64, score_thresh=0.0).eval()
    small = torch.rand(3, 64, 64)
    large = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    with torch.no_grad():
        out_small, out_large = model([small]), model([large])
    torch.testing.assert_close(out_large[0]["scores"], out_small[0]["scores"])
    torch.testing.assert_close(out_large[0]["boxes"], 2 * out_small[0]["boxes"])


def test_a_tensor_batch_is_accepted():
    model = tiny_detector().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert len(model(images)) == 2


def test_image_without_boxes_trains_and_predicts():
    model = tiny_detector().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 64, 64)], [empty])
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    assert losses["loss_cls"].isfinite() and losses["loss_cls"] > 0    # every location is a negative
    sum(losses.values()).backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    mixed = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [empty, target([[4, 4, 40, 40]], [1])])
    assert all(v.isfinite() for v in mixed.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.zeros(3, 64, 64)])[0]
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["labels"])


def test_degenerate_and_out_of_image_boxes_are_clipped_or_dropped_with_a_warning():
    boxes = torch.tensor([[-10.0, -5, 20, 20],        # sticks out: clipped to [0, 0, 20, 20]
                          [70, 70, 90, 90],           # wholly outside the 64x64 image: dropped
                          [10, 10, 10, 30],           # zero width: dropped
                          [30, 40, 20, 50],           # x2 < x1: dropped
                          [float("nan"), 0, 5, 5],    # not finite: dropped
                          [40, 40, 80, 80]])          # clipped to [40, 40, 64, 64]
    with pytest.warns(UserWarning, match="dropped 4 of 6 boxes"):
        kept, labels = sanitize_boxes(boxes, torch.arange(6), (64, 64))
    assert kept.tolist() == [[0, 0, 20, 20], [40, 40, 64, 64]] and labels.tolist() == [0, 5]
    model = tiny_detector().train()
    with pytest.warns(UserWarning, match="dropped 4 of 6 boxes"):
        losses = model([torch.rand(3, 64, 64)], [{"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1, 2, 3])}])
    assert all(v.isfinite() for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_crowd_boxes_are_ignored():
    model = tiny_detector()
    _, _, _, targets = model.preprocess([torch.rand(3, 64, 64)], [{**target([[0, 0, 9, 9], [5, 5, 30, 30]], [1, 2]),
                                                                    "iscrowd": torch.tensor([1, 0])}])
    assert targets[0]["boxes"].tolist() == [[5, 5, 30, 30]] and targets[0]["labels"].tolist() == [1]


def test_bad_inputs_raise_clear_errors():
    model = tiny_detector().train()
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="needs targets"):
        model([image])
    with pytest.raises(ValueError, match=r"category ids in 1\.\.3"):
        model([image], [target([[0, 0, 9, 9]], [0])])
    with pytest.raises(ValueError, match="one dict per image"):
        model([image, image], [target([[0, 0, 9, 9]], [1])])
    with pytest.raises(TypeError, match="floats in"):
        model([torch.zeros(3, 64, 64, dtype=torch.uint8)], [target([[0, 0, 9, 9]], [1])])
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        model([torch.rand(1, 64, 64)], [target([[0, 0, 9, 9]], [1])])
    with pytest.raises(TypeError, match="images must be a non-empty list"):
        model([], [])
    with pytest.raises(ValueError, match=r"targets\[0\] must be a dict with 'boxes'"):
        model([image], [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match=r"frozen_stages must be in \[-1, 4\], got 5"):
        tiny_detector(frozen_stages=5)
    with pytest.raises(ValueError, match="regress_ranges"):
        tiny_detector(regress_ranges=[(0, 64), (64, 128)])
    with pytest.raises(ValueError, match="num_classes"):
        SimpleFPNDetector("asmlp_tiny", num_classes=0)


# ---------------------------------------------------------------- backbone options

def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    model = tiny_detector(frozen_stages=1, drop_path_rate=0.1).train()
    frozen = [model.backbone.patch_embed, model.backbone.layers[0]]
    assert all(not m.training for m in frozen) and model.backbone.layers[1].training
    sum(model([torch.rand(3, 64, 64)], [target([[8, 8, 40, 40]], [1])]).values()).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in model.backbone.layers[1].parameters())


def test_channels_last_gives_the_same_predictions():
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        plain = tiny_detector(score_thresh=0.0).eval()(images)[0]
        nhwc = tiny_detector(score_thresh=0.0, channels_last=True).eval()(images)[0]
    torch.testing.assert_close(nhwc["scores"], plain["scores"], rtol=1e-4, atol=1e-5)


def test_pretrained_backbone_from_an_official_classification_checkpoint():
    torch.manual_seed(1)
    classifier = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=10)
    model = tiny_detector(pretrained_backbone={"model": classifier.state_dict()})
    weight = "layers.2.blocks.0.axial_shift.conv2_1.weight"
    assert torch.equal(model.backbone.state_dict()[weight], classifier.state_dict()[weight])
    assert set(model.backbone_load_report.missing) == {f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def test_narrow_head_on_a_small_image_whose_top_map_is_1x1_in_eval_mode():
    """min_size 32 resizes 40 x 40 to 32 x 32, so the stride-32 map is 1x1: a GroupNorm group needs two channels."""
    model = SimpleFPNDetector("asmlp_tiny", num_classes=3, fpn_channels=16, min_size=32, embed_dim=8,
                              depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 40, 40)])[0]
    assert out["boxes"].shape[1:] == (4,) and out["scores"].isfinite().all()
    norms = {c: FCOSHead(c, 3, (8, 16, 32)).cls_tower[1] for c in (256, 64, 48, 32, 16, 2)}
    assert {c: n.num_groups for c, n in norms.items()} == {256: 32, 64: 32, 48: 16, 32: 16, 16: 8, 2: 1}
    top = torch.tensor([[[[1.0]], [[3.0]]]])  # (1, 2, 1, 1): one group of two values, mean 2, variance 1
    torch.testing.assert_close(norms[2](top).flatten(), torch.tensor([-1.0, 1.0]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="needs an int >= 2 channels .*got 1"):
        tiny_detector(fpn_channels=1)


def test_a_backbone_of_three_stages_feeds_every_stage_but_the_first():
    model = tiny_detector(depths=(1, 1, 1)).eval()
    assert model.backbone.out_indices == (1, 2) and model.strides == (8, 16)
    assert tiny_detector().strides == (8, 16, 32)  # four stages: FCOS's P3-P5, as before
    with torch.no_grad():
        assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1:] == (4,)


def test_pretrained_backbone_with_another_stage_depth_is_refused():
    deeper = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 3, 1), num_classes=10)  # tiny vs small, in small
    with pytest.raises(CheckpointError, match=r"another variant.*layers\.2\.blocks\.1\."):
        tiny_detector(pretrained_backbone={"model": deeper.state_dict()})


# ---------------------------------------------------------------- Mask R-CNN (paper setup)

def tiny_maskrcnn(**kw):
    torch.manual_seed(0)
    return build_maskrcnn("asmlp_tiny", num_classes=4, embed_dim=16, depths=(1, 1, 1, 1), min_size=64, max_size=64,
                          maskrcnn_kwargs=dict(rpn_batch_size_per_image=32, box_batch_size_per_image=32,  # small
                                               rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=32,
                                               box_detections_per_img=10), **kw)


def test_maskrcnn_pyramid_has_the_papers_levels():
    model = tiny_maskrcnn().eval()
    with torch.no_grad():
        pyramid = model.backbone(torch.rand(1, 3, 128, 192))
    assert list(pyramid) == ["0", "1", "2", "3", "pool"]
    assert [tuple(p.shape) for p in pyramid.values()] == [(1, 256, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]


def test_maskrcnn_forward_in_train_and_eval_mode():
    model = tiny_maskrcnn().train()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 35:60, 20:50] = 1
    targets = [{"boxes": torch.tensor([[10.0, 8, 40, 30], [20, 35, 50, 60]]), "labels": torch.tensor([1, 3]),
                "masks": masks}]
    losses = model([torch.rand(3, 64, 64)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.isfinite() for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert {"boxes", "labels", "scores", "masks"} <= set(out)
    assert out["masks"].shape[1:] == (1, 64, 64)


def test_maskrcnn_ignores_crowd_regions_in_training_and_batch_mates_in_eval():
    model = tiny_maskrcnn().train()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 35:60, 20:50] = 1
    with_crowd = {"boxes": torch.tensor([[10.0, 8, 40, 30], [20, 35, 50, 60]]), "labels": torch.tensor([1, 3]),
                  "masks": masks, "iscrowd": torch.tensor([0, 1])}
    by_hand = {"boxes": torch.tensor([[10.0, 8, 40, 30]]), "labels": torch.tensor([1]), "masks": masks[:1]}
    image = torch.rand(3, 64, 64)
    torch.manual_seed(5)  # the same drop-path and proposal-sampling draws
    got = model([image], [with_crowd])
    torch.manual_seed(5)
    want = model([image], [by_hand])
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    model.eval()
    wide, tall = torch.rand(3, 32, 64), torch.rand(3, 64, 32)  # alone 32x64; padded together 64x64
    with torch.no_grad():
        alone, batched = model([wide])[0], model([wide, tall])[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(batched[key], alone[key], rtol=1e-4, atol=1e-4)


def test_maskrcnn_asmlp_t_matches_the_papers_48m_parameters():
    """Paper (../shared/PAPER.md Sec. 6): Mask R-CNN AS-MLP-T, 80 COCO classes, 48M parameters.
    torchvision counts background as a class, so 80 classes are num_classes=81."""
    params = count_params(build_maskrcnn("asmlp_tiny", num_classes=81))
    assert abs(params / 1e6 - 48) <= 1, params


def test_maskrcnn_backbone_uses_the_papers_detection_drop_path():
    """PAPER.md Sec. 8: the Mask R-CNN configs set drop path 0.2 for T and S (ImageNet: T 0.2, S 0.3); base has
    no Mask R-CNN config and keeps its own 0.5. The rate is that of the last block (it grows linearly)."""
    def last_rate(model):
        return max(m.p for m in model.backbone.body.modules() if isinstance(m, DropPath))
    for name, rate in (("asmlp_tiny", 0.2), ("asmlp_small", 0.2), ("asmlp_base", 0.5)):
        assert last_rate(build_maskrcnn(name, num_classes=4, embed_dim=16, depths=(1, 1, 1, 1))) == pytest.approx(rate)
    given = build_maskrcnn("asmlp_small", num_classes=4, embed_dim=16, depths=(1, 1, 1, 1), drop_path_rate=0.1)
    assert last_rate(given) == pytest.approx(0.1)


def test_maskrcnn_loads_mmdet_backbone_weights():
    torch.manual_seed(2)
    body = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), features_only=True)
    state = {f"backbone.{k}": v for k, v in body.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 16, 1, 1)  # mmdet neck/heads: not the backbone's
    model = tiny_maskrcnn(pretrained_backbone={"state_dict": state, "meta": {}})
    assert model.backbone_load_report.ok
    for key, value in body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="does not fit"):
        build_maskrcnn("asmlp_tiny", num_classes=4, embed_dim=32, depths=(1, 1, 1, 1),
                       pretrained_backbone={"state_dict": state})


def test_iscrowd_of_another_length_than_labels_is_a_clear_error():
    model = tiny_detector()
    for iscrowd in ([0], [0, 0, 1]):
        with pytest.raises(ValueError, match=r"targets\[0\]: 'iscrowd' must be \(n,\) like 'labels' \(2\)"):
            model.preprocess([torch.rand(3, 64, 64)], [{**target([[0, 0, 9, 9], [5, 5, 30, 30]], [1, 2]),
                                                        "iscrowd": torch.tensor(iscrowd)}])


@pytest.mark.parametrize("build", [tiny_detector, tiny_maskrcnn])
@pytest.mark.parametrize("size", [(0, 0), (0, 48), (48, 0)])
def test_empty_images_are_refused_with_a_clear_message(build, size):
    # before: torch's interpolate error (SimpleFPNDetector), a ZeroDivisionError (Mask R-CNN)
    model = build().eval()
    with pytest.raises(ValueError, match=rf"images\[1\] is empty, shape \(3, {size[0]}, {size[1]}\): height and width "
                                         "must be >= 1"):
        model([torch.rand(3, 64, 64), torch.rand(3, *size)])


def test_detector_arguments_it_cannot_use_are_refused():
    for kwargs, message in [(dict(in_chans=1), "leave in_chans at 3, got 1"),
                            (dict(score_thresh=2.0), r"score_thresh and nms_thresh in \[0, 1\].*got 2.0, 0.6, 100"),
                            (dict(nms_thresh=-1.0), "got 0.05, -1.0, 100"),
                            (dict(detections_per_img=0), "detections_per_img >= 1; got 0.05, 0.6, 0")]:
        with pytest.raises(ValueError, match=message):
            tiny_detector(**kwargs)
    # these named ASMLP.__init__ and build_backbone, which the student never called
    with pytest.raises(TypeError, match=r"argument\(s\) 'fpn_channel': neither the detector's or segmenter's own"):
        tiny_detector(fpn_channel=64)
    with pytest.raises(ValueError, match=r"^out_indices: set by the detector or segmenter itself; leave out \(the "
                                         r"detector's stages are its 'levels' argument\)"):
        tiny_detector(out_indices=(0, 1))


def test_images_in_0_255_or_normalised_and_boxes_in_0_1_are_warned_about():
    """All train without an error and learn nothing useful: 255 x the expected input, images normalised twice,
    boxes under a pixel."""
    model = tiny_detector().train()
    with pytest.warns(UserWarning, match=r"images in \[0, 1\].*divide 0-255 images by 255"):
        model([torch.rand(3, 64, 64) * 255], [target([[8, 8, 40, 40]], [1])])
    mean, std = (torch.tensor(v).reshape(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    normalised = (torch.rand(3, 64, 64) - mean) / std   # a habit from classification: it got the 0-255 advice
    with pytest.warns(UserWarning, match=r"below -0.5, as if normalised \(x - mean\) / std already: pass the images "
                                         r"in \[0, 1\]"):
        model([normalised], [target([[8, 8, 40, 40]], [1])])
    with pytest.warns(UserWarning, match=r"targets\[0\]: every box lies within \[0, 1\], as if normalised"):
        model([torch.rand(3, 64, 64)], [target([[0.1, 0.1, 0.5, 0.6]], [1])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # in range: no warning
        model([torch.rand(3, 64, 64)], [target([[8, 8, 40, 40]], [1])])
