"""The backbone: exact parameter counts, official key layout, an official-style forward, any input size."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asmlp_min import fast
from asmlp_min.backbone import create_model, list_models
from asmlp_min.fast import inference_pieces
from tests.test_block import functional_block, randomise

# Exact counts for 1000 classes (PAPER.md Sec. 3: 12d^2+17d per block, 8d^2+8d per merge).
PARAMS = {"asmlp_mobile": 9_597_480, "asmlp_tiny": 28_282_696, "asmlp_small": 49_594_696, "asmlp_base": 87_752_808}


def tiny(**kwargs):
    return create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 2, 1), **kwargs)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_are_exact(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def official_keys(depths=(2, 2, 6, 2)):
    """The official classification checkpoint's key list, written from the layout in PAPER.md / DESIGN.md."""
    block = ["norm1", "axial_shift.conv1", "axial_shift.norm1", "axial_shift.conv2_1", "axial_shift.conv2_2",
             "axial_shift.norm2", "axial_shift.conv3", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    for i, depth in enumerate(depths):
        for j in range(depth):
            keys += [f"layers.{i}.blocks.{j}.{m}.{p}" for m in block for p in ("weight", "bias")]
        if i < len(depths) - 1:
            keys += [f"layers.{i}.downsample.norm.weight", f"layers.{i}.downsample.norm.bias",
                     f"layers.{i}.downsample.reduction.weight"]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def test_state_dict_keys_are_the_official_layout():
    sd = create_model("asmlp_tiny").state_dict()
    assert list(sd) == official_keys()
    assert sd["patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    assert sd["layers.0.downsample.reduction.weight"].shape == (192, 384, 1, 1)
    assert sd["layers.3.blocks.1.axial_shift.conv2_1.weight"].shape == (768, 768, 1, 1)
    assert sd["head.weight"].shape == (1000, 768)


def test_features_model_keys_are_the_mmdet_backbone_layout():
    model = create_model("asmlp_tiny", features_only=True)
    want = official_keys()[:-4] + [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(model.state_dict()) == sorted(want)


def official_forward(p, x, depths, shift_size):
    """Official-style classification forward from a state dict, with functional ops only (test oracle)."""
    def gn(name, t):
        return F.group_norm(t, 1, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    x = gn("patch_embed.norm", F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=4))
    for i, depth in enumerate(depths):
        for j in range(depth):
            prefix = f"layers.{i}.blocks.{j}."
            x = functional_block({k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}, x, shift_size)
        if i < len(depths) - 1:
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)
            x = F.conv2d(gn(f"layers.{i}.downsample.norm", x), p[f"layers.{i}.downsample.reduction.weight"])
    x = gn("norm", x).mean((2, 3))
    return F.linear(x, p["head.weight"], p["head.bias"])


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_logits_match_official_style_forward(size):
    torch.manual_seed(0)
    model = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 3, 1), num_classes=10).eval()
    with torch.no_grad():  # non-trivial norm affines and biases
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    x = torch.randn(2, 3, *size)
    want = official_forward(model.state_dict(), x, (1, 1, 3, 1), 5)
    assert (model(x) - want).abs().max().item() <= 1e-4


def test_forward_features_and_head_follow_timm():
    model = tiny(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 2, 2) and model.num_features == 64
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_feature_maps_for_tiny_at_224_have_paper_channels_and_strides():
    model = create_model("asmlp_tiny", features_only=True).eval()
    assert [f["num_chs"] for f in model.feature_info] == [96, 192, 384, 768]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]


@pytest.mark.parametrize("size,want", [
    ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)]),   # odd: ceil at the stem and at every merge
    ((8, 8), [(2, 2), (1, 1), (1, 1), (1, 1)]),
    ((1, 1), [(1, 1), (1, 1), (1, 1), (1, 1)]),
])
def test_feature_shapes_at_odd_and_tiny_sizes(size, want):
    model = tiny(features_only=True).eval()
    feats = model(torch.randn(1, 3, *size))
    assert [tuple(f.shape[-2:]) for f in feats] == want
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert all(torch.isfinite(f).all() for f in feats)


def test_classifier_accepts_any_size():
    model = tiny(num_classes=5).eval()
    for size in [(97, 131), (256, 256), (3, 5)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_padding_is_right_bottom_zeros_like_the_official_stem():
    """A 62x62 image gives the same features as the same image zero-padded to 64x64 by hand."""
    model = tiny(features_only=True).eval()
    x = torch.randn(1, 3, 62, 62)
    by_hand = model(F.pad(x, (0, 2, 0, 2)))
    for ours, ref in zip(model(x), by_hand):
        torch.testing.assert_close(ours, ref)


def test_out_indices_select_and_allow_negative():
    model = tiny(features_only=True, out_indices=(1, -1))
    assert model.out_indices == (1, 3)
    assert [f.shape[1] for f in model(torch.randn(1, 3, 32, 32))] == [16, 64]
    with pytest.raises(ValueError, match="out_indices"):
        tiny(features_only=True, out_indices=(0, 4))


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name):
    model = create_model(name, num_classes=7, depths=(1, 1, 1, 1), embed_dim=8)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_in_chans_option():
    model = tiny(in_chans=1, num_classes=2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_bad_inputs_get_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="unknown model 'asmlp_huge'.*asmlp_tiny"):
        create_model("asmlp_huge")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D image batch.*x\\[None\\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="expected an image tensor"):
        model([1, 2, 3])
    with pytest.raises(ValueError, match="shift_size must be odd"):
        create_model("asmlp_tiny", shift_size=4)
    with pytest.raises(ValueError, match="connection must be one of"):
        create_model("asmlp_tiny", connection="both")
    with pytest.raises(ValueError, match="padding must be one of"):
        create_model("asmlp_tiny", padding="mirror")
    with pytest.raises(TypeError):
        create_model("asmlp_tiny", embed_dims=96)  # a typo is not silently ignored
    with pytest.raises(ValueError, match="load_official_checkpoint"):
        create_model("asmlp_tiny", pretrained=True)


def test_image_dtype_and_size_are_checked():
    model = tiny().eval()
    with pytest.raises(TypeError, match=r"expected float images, got torch.uint8.*x.float\(\) / 255"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images are torch.float64 but the weights are torch.float32"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty image batch"):
        model(torch.zeros(1, 3, 0, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input itself
        assert model(torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 1000)


@pytest.mark.parametrize("option,match", [
    (dict(num_classes=-1), "num_classes must be an integer >= 0"), (dict(num_classes=2.5), "num_classes"),
    (dict(embed_dim=0), "embed_dim must be an integer >= 1"), (dict(patch_size=0), "patch_size"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be > 0")])
def test_bad_sizes_are_refused_at_construction(option, match):
    with pytest.raises(ValueError, match=match):
        create_model("asmlp_tiny", **option)


@pytest.mark.parametrize("option,match", [
    (dict(depths=(1.5, 1, 1, 1)), r"depths needs one block count >= 1 per stage.*got \(1\.5, 1, 1, 1\)"),
    (dict(depths="2262"), "depths needs one block count >= 1 per stage.*got '2262'"),
    (dict(depths=4), "depths needs one block count >= 1 per stage.*got 4"),
    (dict(depths=(True, 1, 1, 1)), r"depths needs one block count >= 1 per stage.*got \(True, 1, 1, 1\)"),
    (dict(embed_dim=True), "embed_dim must be an integer >= 1, got True"),
    (dict(num_classes=True), "num_classes must be an integer >= 0 .*got True"),
    (dict(mlp_ratio="4"), "mlp_ratio must be > 0"), (dict(drop_path_rate="0.1"), "drop_path_rate must be a number")])
def test_arguments_of_the_wrong_type_are_refused_by_name(option, match):
    """Python's True is the int 1 and a string is a sequence: neither is a block count, width or class count."""
    with pytest.raises(ValueError, match=match):
        create_model("asmlp_tiny", **{"embed_dim": 8, "depths": (1, 1, 1, 1), **option})


def test_mlp_ratio_must_leave_each_mlp_a_hidden_channel():
    with pytest.raises(ValueError, match=r"int\(embed_dim \* mlp_ratio\) >= 1 .*got 0.1 with embed_dim 8"):
        create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), mlp_ratio=0.1)  # int(0.8) = 0 hidden channels
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), mlp_ratio=0.125, num_classes=3)
    assert model.layers[0].blocks[0].mlp.fc1.out_channels == 1  # int(8 * 0.125)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_numpy_scalars_are_numbers_for_the_rates():
    """A sweep over np.linspace hands numpy scalars: they are real numbers, as they were before the type checks."""
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), num_classes=3,
                         drop_path_rate=np.float32(0.1), mlp_ratio=np.float32(2.0))
    assert model.layers[0].blocks[0].mlp.fc1.out_channels == 16  # int(8 * 2.0)
    assert model.layers[-1].blocks[-1].drop_path.p == pytest.approx(0.1)  # the last block gets the full rate


def test_out_indices_default_to_every_stage_of_any_depth():
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1), features_only=True)
    assert model.out_indices == (0, 1, 2)
    assert [tuple(m.shape) for m in model(torch.randn(1, 3, 32, 32))] == [(1, 8, 8, 8), (1, 16, 4, 4), (1, 32, 2, 2)]
    assert tiny(features_only=True, out_indices=slice(1, None)).out_indices == (1, 2, 3)


def test_reset_classifier_refuses_a_negative_class_count():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        tiny().reset_classifier(-3)


def test_inference_pieces_count():
    x = torch.zeros(16, 96, 56, 56)  # AS-MLP-T stage 0: a 77 MiB hidden layer (384 channels)
    with torch.no_grad():
        assert inference_pieces(x, 384) == 5  # ceil(77 / 16 MiB)
        assert inference_pieces(x[:1], 384) == 1
        assert inference_pieces(torch.zeros(3, 8, 512, 512), 10_000) == 3  # never more pieces than images
        assert inference_pieces(torch.fx.Proxy.__new__(torch.fx.Proxy), 384) == 1  # FX tracing: no cut
    assert inference_pieces(x, 384) == 1  # autograd: the whole batch


def test_inference_in_pieces_equals_the_whole_batch(monkeypatch):
    model = randomise(create_model("asmlp_tiny", embed_dim=16, depths=(1, 2, 1, 1), num_classes=5)).eval()
    features = randomise(create_model("asmlp_tiny", embed_dim=16, depths=(1, 2, 1, 1), features_only=True)).eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        whole, whole_maps = model(x), features(x)
        monkeypatch.setattr(fast, "PIECE_BYTES", 2 * 64 * 16 * 16 * 4)  # stage 0: 3 pieces, stage 1: 2
        cut, cut_maps = model(x), features(x)
        traced = torch.fx.symbolic_trace(model)(x)  # traces the whole-batch path
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced, whole, rtol=1e-5, atol=1e-5)
    for got, want in zip(cut_maps, whole_maps):
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in eval mode")  # torchvision's note
@pytest.mark.parametrize("features_only", [False, True])
def test_feature_info_names_the_module_whose_output_is_each_map(features_only):
    from torchvision.models.feature_extraction import create_feature_extractor
    model = create_model("asmlp_tiny", embed_dim=16, depths=(1, 2, 1, 1), num_classes=5,
                         features_only=features_only).eval()
    info = model.feature_info
    assert info.channels() == [16, 32, 64, 128] and info.reduction() == [4, 8, 16, 32]
    assert info.channels(1) == 32 and info.module_name(1) == info[1]["module"]
    extractor = create_feature_extractor(model, return_nodes=info.module_name())
    x = torch.randn(2, 3, 64, 64)
    maps = list(extractor(x).values())
    expected = [(2, c, 64 // r, 64 // r) for c, r in zip(info.channels(), info.reduction())]
    assert [tuple(m.shape) for m in maps] == expected
    if features_only:  # the tapped maps are the ones the model returns
        for got, want in zip(maps, model(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("depths", [(), (2, 0, 6, 2), (2, -1)])
def test_depths_without_blocks_are_refused(depths):
    with pytest.raises(ValueError, match="depths needs one block count >= 1 per stage"):
        create_model("asmlp_tiny", depths=depths)


def test_grad_checkpointing_gives_the_same_gradients_and_stores_less():
    model = create_model("asmlp_tiny", embed_dim=8, depths=(2, 1, 1, 1), num_classes=3, drop_path_rate=0.3).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def step():
        torch.manual_seed(0)  # the same drop-path draws in both runs
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], sum(saved)

    loss, grads, stored = step()
    model.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in model.layers)
    loss_ckpt, grads_ckpt, stored_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for got, want in zip(grads_ckpt, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert stored_ckpt < stored / 2  # only each block's input is kept through the forward pass
    model.set_grad_checkpointing(False)
    assert step()[2] == stored


def test_forward_features_of_a_features_model_says_what_to_call():
    with pytest.raises(ValueError, match="model\\(x\\) returns its feature maps"):
        tiny(features_only=True).forward_features(torch.randn(1, 3, 32, 32))


def test_pretrained_cfg_is_the_data_config_of_the_official_weights():
    from asmlp_min.data.transforms import classification_transforms
    cfg = tiny(num_classes=7).pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 7 and cfg["classifier"] == "head"
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert isinstance(tiny().get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    resize = classification_transforms(train=False, size=224).transforms[1]  # what evaluation applies
    assert resize.size == [int(224 / cfg["crop_pct"])] and resize.interpolation.value == cfg["interpolation"]
    assert tiny(features_only=True).pretrained_cfg["classifier"] is None


def test_input_mistakes_get_the_fix_that_fits_them():
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), num_classes=3)
    for x, message in [(torch.rand(1, 32, 32, 3), r"\(b, h, w, c\) image batch goes in as x.permute\(0, 3, 1, 2\)"),
                       (torch.rand(1, 1, 32, 32), r"got 1 \(axis 1\): pass in_chans=1 to create_model"),
                       (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"x.float\(\) / 255 and normalise them with "
                                                                     "IMAGENET_MEAN and IMAGENET_STD")]:
        with pytest.raises((ValueError, TypeError), match=message):
            model(x)
    model.reset_classifier(0, "")
    with pytest.raises(ValueError, match=r"or pool for a head of 5 classes \(reset_classifier\(5, 'avg'\)\)"):
        model.reset_classifier(5)


@pytest.mark.parametrize("name,rate,blocks", [("asmlp_tiny", 0.2, 12), ("asmlp_small", 0.3, 24)])
def test_stochastic_depth_grows_linearly_from_zero_over_the_blocks(name, rate, blocks):
    """The official rule: block i of n (counted through all stages) drops with rate * i / (n - 1)."""
    model = create_model(name)
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([rate * i / (blocks - 1) for i in range(blocks)], abs=1e-7)
