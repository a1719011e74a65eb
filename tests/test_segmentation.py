"""UperNet segmenter: shapes, batch-1 BatchNorm, ignored pixels, sliding windows, checkpoints, paper parameter
counts."""
import pytest
import torch
import torch.nn.functional as F

from asmlp_min.backbone import create_model
from asmlp_min.checkpoint import CheckpointError
from asmlp_min.segmentation import (ConvBNReLU, SemanticSegmenter, UperHead, balanced_class_weights, class_map,
                                    class_pixel_counts, segmentation_loss)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, channels=32, aux_channels=16)


def tiny(num_classes=3, **kw):
    torch.manual_seed(0)
    return SemanticSegmenter("asmlp_tiny", num_classes=num_classes, **{**TINY, **kw})


def iou_per_class(pred, target, num_classes):
    """Hand-written IoU: |pred == c and target == c| / |pred == c or target == c| over labelled pixels."""
    valid = target != 255
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum()
        if union > 0:
            ious.append(((p & t).sum() / union).item())
    return ious


@pytest.mark.parametrize("batch", [1, 2])
def test_eval_logits_have_input_size_for_odd_sizes(batch):
    model = tiny(num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, 3, 97, 131))
    assert logits.shape == (batch, 5, 97, 131)


def test_train_mode_batch_one_odd_size_gives_losses_and_gradients():
    model = tiny(num_classes=4).train()
    images, masks = torch.randn(1, 3, 97, 131), torch.randint(0, 4, (1, 97, 131))
    assert model(images).shape == (1, 4, 97, 131)  # BatchNorm with one sample must not crash
    losses = model(images, masks)
    assert set(losses) == {"loss_seg", "loss_aux"}
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0


def test_single_value_per_channel_uses_running_statistics():
    """Batch 1 through the 1x1 pooled branch: normalise like eval mode and keep the running stats unchanged."""
    block = ConvBNReLU(8, 4)
    block.bn.running_mean.uniform_(-1, 1)
    block.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 8, 1, 1)
    before = block.bn.running_mean.clone()
    out = block.train()(x)
    conv = F.conv2d(x, block.conv.weight)
    bn = block.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + 1e-5)).view(1, -1, 1, 1)
    expected = torch.relu((conv - before.view(1, -1, 1, 1)) * scale + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out, expected)
    assert torch.equal(block.bn.running_mean, before)
    block(torch.randn(2, 8, 1, 1))  # two values per channel: ordinary batch statistics, stats move
    assert not torch.equal(block.bn.running_mean, before)


def test_ignored_pixels_contribute_no_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    masks = torch.randint(0, 3, (2, 5, 6))
    masks[0, :2] = 255
    masks[1, :, 4:] = 255
    valid = masks != 255
    log_p = torch.log_softmax(logits, 1)
    expected = -torch.stack([log_p[b, masks[b, i, j], i, j] for b, i, j in valid.nonzero().tolist()]).mean()
    loss = segmentation_loss(logits, masks)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    ignored = (~valid)[:, None].expand_as(logits)
    assert torch.equal(logits.grad[ignored], torch.zeros(int(ignored.sum())))
    changed = logits.detach().clone()
    changed[ignored] = 100.0  # whatever the model says on ignored pixels does not matter
    torch.testing.assert_close(segmentation_loss(changed, masks), expected.detach())


def test_class_weighted_loss_is_the_weighted_mean_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    masks = torch.randint(0, 3, (2, 5, 6))
    masks[0, :2] = 255
    w = torch.tensor([1.0, 3.0, 0.5])
    log_p = torch.log_softmax(logits, 1)
    pixels = (masks != 255).nonzero().tolist()
    terms = torch.stack([-w[masks[b, i, j]] * log_p[b, masks[b, i, j], i, j] for b, i, j in pixels])
    expected = terms.sum() / torch.stack([w[masks[b, i, j]] for b, i, j in pixels]).sum()
    torch.testing.assert_close(segmentation_loss(logits, masks, class_weight=w), expected)
    assert not torch.allclose(segmentation_loss(logits, masks), expected)  # the weights change the loss


def test_balanced_class_weights_are_sqrt_of_frequency_ratio():
    weights = balanced_class_weights(torch.tensor([900, 100, 25, 0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 3.0, 6.0, 1.0]))  # sqrt(900/100), sqrt(900/25); absent: 1
    with pytest.raises(ValueError, match="counts >= 0 with some pixels"):
        balanced_class_weights(torch.zeros(3))


def test_class_pixel_counts_skip_ignored_pixels_and_reject_bad_labels():
    masks = [torch.tensor([[0, 0, 1], [255, 2, 2]]), torch.tensor([[0, 255, 255], [1, 1, 1]])]
    data = [(None, m) for m in masks]
    assert class_pixel_counts(data, 3).tolist() == [3, 4, 2]
    assert class_pixel_counts(data, 3, max_images=1).tolist() == [2, 1, 2]
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 2\)"):
        class_pixel_counts(data, 2)


def test_class_weight_reaches_both_heads_and_stays_out_of_the_state_dict():
    model = tiny(num_classes=3)
    x, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    torch.manual_seed(1)
    plain = model(x, masks)
    model.set_class_weight([1.0, 5.0, 2.0])
    torch.manual_seed(1)
    weighted = model(x, masks)
    assert all(not torch.allclose(plain[k], weighted[k]) for k in ("loss_seg", "loss_aux"))
    assert "class_weight" not in model.state_dict()
    SemanticSegmenter("asmlp_tiny", num_classes=3, **TINY).load_state_dict(model.state_dict())  # strict: same keys
    with pytest.raises(ValueError, match="3 positive numbers, one per class"):
        model.set_class_weight([1.0, 2.0])
    with pytest.raises(ValueError, match="3 positive numbers"):
        model.set_class_weight([1.0, 0.0, 2.0])


def test_all_ignored_batch_gives_zero_loss_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_aux_loss_weighted_on_stage_two_and_only_in_training():
    model = tiny(dropout=0.0).train()
    images, masks = torch.randn(2, 3, 64, 48), torch.randint(0, 3, (2, 64, 48))
    losses = model(images, masks)
    feats = model.backbone(images)
    assert feats[2].shape[1] == 4 * 16  # stage index 2 has 4C channels
    aux = F.interpolate(model.auxiliary_head(feats[2]), size=(64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * F.cross_entropy(aux, masks))
    assert set(model.eval()(images, masks)) == {"loss_seg"}
    assert set(tiny(aux=False).train()(images, masks)) == {"loss_seg"}


def test_slide_inference_averages_overlapping_windows():
    model = tiny(inference="slide", crop_size=64, stride=32).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        left, right = model.forward_logits(images[..., :64]), model.forward_logits(images[..., 32:])
        slid = model(images)
    torch.testing.assert_close(slid[..., :32], left[..., :32])
    torch.testing.assert_close(slid[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    torch.testing.assert_close(slid[..., 64:], right[..., 32:])


def test_slide_inference_with_crop_larger_than_image_is_whole_image():
    model = tiny(inference="slide", crop_size=128, stride=64).eval()
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.forward_logits(images))


def test_parameter_names_follow_mmseg():
    keys = set(tiny().state_dict())
    for key in ["backbone.patch_embed.proj.weight", "backbone.norm3.weight",
                "decode_head.psp_modules.0.1.conv.weight", "decode_head.psp_modules.3.1.bn.running_var",
                "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.bn.bias",
                "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.conv.weight",
                "decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
                "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"]:
        assert key in keys, key


def test_mmseg_checkpoint_loads_into_backbone(tmp_path):
    source = tiny(num_classes=7)
    checkpoint = {"meta": {}, "state_dict": {k: v for k, v in source.state_dict().items()}}
    path = tmp_path / "upernet_asmlp.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    model = SemanticSegmenter("asmlp_tiny", num_classes=3, pretrained_backbone=path, **TINY)
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.backbone_load_report.ok  # every backbone.* tensor, including norm0..3, found; heads not touched
    assert not torch.equal(model.decode_head.bottleneck.conv.weight, source.decode_head.bottleneck.conv.weight)


def test_classification_checkpoint_loads_into_backbone_with_fresh_norms():
    torch.manual_seed(2)
    classifier = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=10)
    model = tiny(pretrained_backbone={"model": classifier.state_dict()})
    assert torch.equal(model.backbone.layers[3].blocks[0].mlp.fc2.weight, classifier.layers[3].blocks[0].mlp.fc2.weight)
    assert sorted(k.split(".")[0] for k in model.backbone_load_report.missing) == ["norm0"] * 2 + ["norm1"] * 2 + \
        ["norm2"] * 2 + ["norm3"] * 2


def test_checkpoint_of_another_variant_is_refused():
    other = create_model("asmlp_tiny", embed_dim=24, depths=(1, 1, 1, 1), features_only=True)
    with pytest.raises(CheckpointError, match="does not fit"):
        tiny(pretrained_backbone={"state_dict": {f"backbone.{k}": v for k, v in other.state_dict().items()}})


def test_checkpoint_with_fewer_blocks_is_refused():
    shallower = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=10)
    with pytest.raises(CheckpointError, match=r"another variant.*layers\.2\.blocks\.1\."):
        tiny(depths=(1, 1, 2, 1), pretrained_backbone={"model": shallower.state_dict()})


def test_frozen_stages_stay_frozen_through_train():
    """As the detector's: no gradient, and eval mode after .train(), so drop path leaves their output fixed."""
    model = tiny(frozen_stages=2, drop_path_rate=0.5).train()
    frozen = [model.backbone.patch_embed, *model.backbone.layers[:2]]
    assert all(not m.training for m in frozen) and model.backbone.layers[2].training
    x = torch.randn(2, 3, 64, 64)
    first, again = model.backbone(x)[1], model.backbone(x)[1]
    assert torch.equal(first, again)
    sum(model(x, torch.randint(0, 3, (2, 64, 64))).values()).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in model.backbone.layers[2].parameters())


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50': choose from \['asmlp_base'"):
        SemanticSegmenter("resnet50", num_classes=3)
    with pytest.raises(ValueError, match="^features_only: set by the detector or segmenter itself"):
        SemanticSegmenter("asmlp_tiny", num_classes=3, features_only=False)
    # a misspelt argument of the segmenter's own reached the backbone: "ASMLP.__init__() got an unexpected ..."
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'channel': neither the detector's or "
                                        r"segmenter's own nor one of the AS-MLP backbone's \(create_model\)"):
        SemanticSegmenter("asmlp_tiny", num_classes=3, channel=64)
    with pytest.raises(ValueError, match="inference"):
        tiny(inference="tiles")
    model = tiny()
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"\(b, H, W\)"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        UperHead((8, 16, 32, 64), channels=8)([torch.randn(1, 8, 8, 8)] * 4)
    with pytest.raises(ValueError, match=r"UperHead needs >= 2 input levels.*got \(8,\)"):
        UperHead((8,), channels=8, num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=1: a softmax over one class .* object against background is "
                                         r"num_classes=2, with masks of 0 and 1"):     # trained to a loss of 0
        SemanticSegmenter("asmlp_tiny", num_classes=1, embed_dim=8, depths=(1, 1, 1, 1))


def test_a_training_call_checks_the_images_before_reading_the_masks_against_them():
    """The masks' expected shape comes from the images: a list of images, or one image without its batch axis, was
    reported as an AttributeError or as masks of the wrong shape ((3, H, W): the colours read as the batch)."""
    model, images, masks = tiny().train(), torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(TypeError, match=r"expected an image tensor \(b, 3, h, w\), got list"):
        model(list(images), masks)
    with pytest.raises(ValueError, match=r"expected a 4-D image batch .*; add a batch dimension with x\[None\]"):
        model(images[0], masks[0])
    with pytest.raises(TypeError, match=r"got list; stack a list of \(H, W\) masks with torch.stack"):
        model(images, list(masks))
    with pytest.raises(ValueError, match=r"neither class ids in \[0, num_classes=3\) nor ignore_index=255; masks "
                                         r"whose 0 means 'no label', as ADE20K's, are read with reduce_zero_label"):
        model(images, masks + 3)


@pytest.mark.parametrize("num_classes", [2.5, True, "3"])
def test_class_and_channel_counts_must_be_integers(num_classes):
    """True is the int 1 in Python, 2.5 and '3' are not counts: each is refused by name, before any layer is built."""
    with pytest.raises(ValueError, match=f"all integers >= 1; got .*, 32, {num_classes!r}$"):
        tiny(num_classes=num_classes)
    with pytest.raises(ValueError, match=f"all integers >= 1; got \\(8, 16\\), \\(1, 2\\), {num_classes!r}, 3"):
        UperHead((8, 16), channels=num_classes, pool_scales=(1, 2), num_classes=3)
    with pytest.raises(ValueError, match=f"FCNHead needs .* integers >= 1; got 64, {num_classes!r}, 3"):  # stage 2: 4C
        tiny(aux_channels=num_classes)


def test_a_backbone_of_three_stages_feeds_all_three():
    model = tiny(depths=(1, 1, 1), aux_index=1).eval()
    assert model.backbone.out_indices == (0, 1, 2) and model.decode_head.in_channels == (16, 32, 64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_single_image_overfit_reaches_miou_09():
    """A tiny model memorises one scene (a square and a disc on noise) in 100 steps."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[8:30, 10:34] = 1
    mask[(yy - 44) ** 2 + (xx - 40) ** 2 <= 12 ** 2] = 2
    colours = torch.tensor([[0.2, 0.3, 0.3], [0.9, 0.2, 0.1], [0.1, 0.4, 0.9]])
    image = colours[mask].permute(2, 0, 1) + 0.1 * torch.randn(3, 64, 64, generator=gen)
    images, masks = image[None], mask[None]
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = sum(model.train()(images, masks).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model.eval()(images).argmax(1)
    ious = iou_per_class(pred, masks, 3)
    assert len(ious) == 3 and sum(ious) / 3 >= 0.9, ious


# Paper Sec. 7 (AS-MLP + UperNet + auxiliary FCN head, 150 classes): 60M / 81M / 121M;
# Sec. 8: the mmseg configs use shift 5 / 3 / 5 for T / S / B.
@pytest.mark.parametrize("name, paper_millions, shift", [("asmlp_tiny", 60, 5), ("asmlp_small", 81, 3),
                                                         pytest.param("asmlp_base", 121, 5, marks=pytest.mark.slow)])
def test_parameter_count_matches_paper(name, paper_millions, shift):
    model = SemanticSegmenter(name, num_classes=150)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - paper_millions * 1e6) <= 1e6, total
    assert model.backbone.layers[2].blocks[0].axial_shift.shift_size == shift


def test_head_parameters_match_the_mmseg_layout_by_hand():
    """UperNet(512) + FCN(256) on C = 96, 150 classes, counted from the mmseg layer list (conv without bias + BN)."""
    cb = lambda c_in, c_out, k: c_in * c_out * k * k + 2 * c_out  # noqa: E731  conv (no bias) + BN weight/bias
    uper = (4 * cb(768, 512, 1)                       # PPM, scales 1, 2, 3, 6
            + cb(768 + 4 * 512, 512, 3)               # bottleneck
            + cb(96, 512, 1) + cb(192, 512, 1) + cb(384, 512, 1)  # lateral convs
            + 3 * cb(512, 512, 3)                     # fpn convs
            + cb(4 * 512, 512, 3)                     # fpn bottleneck
            + 512 * 150 + 150)                        # conv_seg
    aux = cb(384, 256, 3) + 256 * 150 + 150
    head = UperHead((96, 192, 384, 768), 512, (1, 2, 3, 6), 150)
    model_aux = SemanticSegmenter("asmlp_tiny", num_classes=150, channels=8).auxiliary_head
    assert sum(p.numel() for p in head.parameters()) == uper
    assert sum(p.numel() for p in model_aux.parameters()) == aux


def functional_uper_head(p, feats, pool_scales, eps=1e-5):
    """mmseg's UPerHead in eval mode, written out from its state dict for this test: pyramid pooling on the top
    map, 1x1 laterals, top-down sums, 3x3 fpn convs, fuse at stride 4, 1x1 classifier; every resize bilinear with
    align_corners=False; BatchNorm with the running statistics."""
    def cbr(name, x):
        kernel = p[f"{name}.conv.weight"]
        x = F.conv2d(x, kernel, padding=kernel.shape[-1] // 2)
        bn = [p[f"{name}.bn.{key}"] for key in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(x, *bn, training=False, eps=eps))

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    top = feats[3]
    pooled = [up(cbr(f"psp_modules.{i}.1", F.adaptive_avg_pool2d(top, s)), top) for i, s in enumerate(pool_scales)]
    l1, l2, l3 = (cbr(f"lateral_convs.{i}", feats[i]) for i in range(3))
    l4 = cbr("bottleneck", torch.cat([top, *pooled], 1))
    l3 = l3 + up(l4, l3)
    l2 = l2 + up(l3, l2)
    l1 = l1 + up(l2, l1)
    p1, p2, p3 = (cbr(f"fpn_convs.{i}", lateral) for i, lateral in enumerate((l1, l2, l3)))
    fused = cbr("fpn_bottleneck", torch.cat([p1, up(p2, p1), up(p3, p1), up(l4, p1)], 1))
    return F.conv2d(fused, p["conv_seg.weight"], p["conv_seg.bias"])


def test_uper_head_is_mmsegs_upernet_written_out():
    torch.manual_seed(0)
    head = UperHead((8, 16, 32, 64), channels=16, pool_scales=(1, 2, 3, 6), num_classes=5).eval()
    with torch.no_grad():
        for name, tensor in head.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():       # weights, biases, running means: none left at 0 or 1
                tensor.copy_(torch.randn_like(tensor) * 0.3)
    feats = [torch.randn(2, c, 16 // 2 ** i, 24 // 2 ** i) for i, c in enumerate((8, 16, 32, 64))]  # non-square
    want = functional_uper_head(head.state_dict(), feats, (1, 2, 3, 6))
    torch.testing.assert_close(head(feats), want, rtol=1e-5, atol=1e-5)
    assert want.shape == (2, 5, 16, 24)


def test_mask_values_beyond_num_classes_are_a_clear_error():
    model = tiny(num_classes=3).train()
    masks = torch.zeros(1, 32, 32, dtype=torch.long)
    masks[0, 0, :3] = torch.tensor([7, 255, -1])                   # 255 is ignored; 7 and -1 are not classes
    with pytest.raises(ValueError, match=r"values \[-1, 7\].*num_classes=3"):
        model(torch.randn(1, 3, 32, 32), masks)
    with pytest.raises(ValueError, match=r"values \[7\].*num_classes=3"):
        segmentation_loss(torch.randn(1, 3, 4, 4), torch.tensor([[[0, 1, 2, 7]] * 4]))


@pytest.mark.parametrize("weight", [[1.0, float("inf"), 2.0], [1.0, float("nan"), 2.0], [1.0, -2.0, 2.0]])
def test_class_weight_must_be_finite_and_positive(weight):
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match="3 positive numbers, one per class, all finite"):
        model.set_class_weight(weight)
    assert model.class_weight is None                              # the refused weights were not kept


@pytest.mark.parametrize("logit_size, size, rows", [((13, 21), (100, 250), 64), ((16, 16), (64, 64), 7),
                                                     ((20, 30), (10, 15), 4), ((7, 9), (5, 20), 1)])
def test_class_map_in_row_bands_is_the_argmax_of_the_whole_bilinear_upsampling(logit_size, size, rows):
    """The oracle is torch's interpolate of all the logits at once; pixels whose two best classes are within
    1e-4 are left out, where the bands' different rounding may pick either."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, *logit_size)
    whole = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    top2 = whole.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    banded = class_map(logits, size, rows)
    assert banded.shape == (2, *size) and banded.dtype == torch.int64
    assert torch.equal(banded[clear], whole.argmax(1)[clear]) and clear.float().mean() > 0.99
    assert torch.equal(class_map(logits, logit_size), logits.argmax(1))   # at its own size: the argmax


def test_masks_of_another_dtype_are_named_by_their_dtype():
    model = tiny().train()
    with pytest.raises(TypeError, match=r"int64 tensor \(b, H, W\) of class ids, got torch.int32; use masks.long\(\)"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.int32))
