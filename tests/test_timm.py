"""timm interop, side by side with real timm models: the calls timm's own tests and tools make give the same kinds of
results for AS-MLP as for convnext / swin, and ``import asmlp_min.timm`` puts the variants in timm's registry."""
import ast
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import FeatureHookNet, adapt_input_conv as timm_adapt_input_conv
from timm.models import FeatureInfo as TimmFeatureInfo
from timm.models._features import feature_take_indices

import asmlp_min.timm
from asmlp_min.backbone import create_model
from asmlp_min.checkpoint import CheckpointError
from asmlp_min.features import take_indices
from tests.test_block import randomise

SMALL = dict(embed_dim=16, depths=(1, 1, 1, 1))


def small(**kwargs):
    return randomise(create_model("asmlp_tiny", **SMALL, **kwargs)).eval()


def timm_convnext(**kwargs):
    return timm.create_model("convnext_atto", dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), **kwargs).eval()


def timm_swin(**kwargs):  # NHWC inside, a ClassifierHead with timm's pooling choices
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1), img_size=64,
                             window_size=2, num_heads=(1, 1, 1, 1), **kwargs).eval()


def timm_default_cfg_checks(model, x):
    """The body of timm's tests/test_models.py::test_model_default_cfgs, for one model on x of its default size."""
    cfg, state_dict = model.default_cfg, model.state_dict()
    pool_size = cfg["pool_size"]
    assert x.shape[1:] == cfg["input_size"]
    assert model.forward_features(x).shape[-2:] == pool_size
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).dim() == 4 and model(x).shape[-2:] == pool_size
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    return model(x)


@torch.no_grad()
def test_timms_default_cfg_test_passes_as_for_convnext():
    x = torch.randn(1, 3, 224, 224)
    assert timm_default_cfg_checks(timm_convnext(), x).dim() == 4  # the checks are timm's, not tailored to AS-MLP
    model = small(num_classes=7)
    assert model.default_cfg is model.pretrained_cfg and model.default_cfg["pool_size"] == (7, 7)
    features = model.forward_features(x)
    torch.testing.assert_close(timm_default_cfg_checks(model, x), features, rtol=0, atol=0)  # '' passes the map


@torch.no_grad()
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool_is_timms_pooling_and_sizes_the_head_as_swin(pool):
    swin, model = timm_swin(), small(num_classes=7)
    for m in (swin, model):
        m.reset_classifier(5, pool)
        assert m.head_hidden_size == m.num_features * (2 if pool == "catavgmax" else 1)
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    x = torch.randn(2, 3, 40, 56)
    want = SelectAdaptivePool2d(pool_type=pool, flatten=True)(model.forward_features(x))
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), want, rtol=0, atol=0)
    built = small(num_classes=5, global_pool=pool)  # the same head from the constructor
    assert built.head.weight.shape == model.head.weight.shape == (5, model.head_hidden_size)


def test_global_pool_errors_say_what_to_pass():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        small(global_pool="fast")
    with pytest.raises(ValueError, match="global_pool='' keeps the .* num_classes=0"):
        small(num_classes=3, global_pool="")
    assert small(num_classes=0, global_pool="")(torch.randn(1, 3, 64, 64)).shape == (1, 128, 2, 2)


@pytest.mark.parametrize("indices", [None, 1, 2, 4, [0, 2], [-1], (1, -1), [3, 0]])
def test_indices_are_read_as_timm_reads_them(indices):
    assert take_indices(4, indices) == feature_take_indices(4, indices)


@pytest.mark.parametrize("indices", [0, 5, [4], [-5]])
def test_out_of_range_indices_are_refused(indices):
    with pytest.raises(ValueError, match="indices"):
        take_indices(4, indices)


def hook_outputs(model, names):
    """An independent path to stage maps: forward hooks keep what the named modules return during model(x)."""
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
    return seen


@torch.no_grad()
def test_forward_intermediates_are_the_stage_maps_feature_info_names():
    model = small(num_classes=7)
    last_blocks = [f"layers.{i}.blocks.0" for i in range(4)]  # each stage's map before its merge
    seen = hook_outputs(model, model.feature_info.module_name() + last_blocks)
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    final, maps = model.forward_intermediates(x, norm=True)
    assert [tuple(m.shape) for m in maps] == [(2, 16 * 2 ** i, 16 >> i, 24 >> i) for i in range(4)]
    for name, m in zip(model.feature_info.module_name(), maps):  # stage 3's module is the norm that norm=True applies
        torch.testing.assert_close(m, seen[name], rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=0)
    final, maps = model.forward_intermediates(x, indices=[0, -1])
    torch.testing.assert_close(final, seen["norm"], rtol=0, atol=0)
    torch.testing.assert_close(maps, [seen[last_blocks[0]], seen[last_blocks[3]]], rtol=0, atol=0)
    only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(only, [seen[last_blocks[2]], seen[last_blocks[3]]], rtol=0, atol=0)


@torch.no_grad()
def test_stop_early_runs_no_later_stage_and_returns_like_convnext():
    model, convnext = small(num_classes=7), timm_convnext()
    seen = hook_outputs(model, ["layers.1.downsample", "layers.2"])
    x = torch.randn(1, 3, 64, 64)
    final, maps = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert not seen  # neither stage 1's merge nor stage 2 ran
    torch.testing.assert_close(final, maps[-1], rtol=0, atol=0)
    theirs = convnext.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert type(theirs) is tuple and [m.shape[1] for m in theirs[1]] == [m.shape[1] for m in maps] == [16, 32]
    for m in (model, convnext):
        assert isinstance(m.forward_intermediates(x, indices=1, intermediates_only=True), list)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_prune_intermediate_layers_as_convnext():
    model, convnext = small(num_classes=7), timm_convnext()
    x = torch.randn(2, 3, 64, 64)
    before = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for m in (model, convnext):
        assert m.prune_intermediate_layers(indices=(0, 1)) == [0, 1]
        assert m.num_features == m.head_hidden_size == m.feature_info[1]["num_chs"] == 32
        assert m(x).shape == (2, 32, 8, 8)  # the unpooled stage-1 map, at stride 8
    torch.testing.assert_close(model.forward_intermediates(x, indices=(0, 1), intermediates_only=True), before,
                               rtol=0, atol=0)
    torch.testing.assert_close(model.forward_features(x), before[1], rtol=0, atol=0)
    kept = small(num_classes=7)
    logits = kept(x)
    assert kept.prune_intermediate_layers(indices=4, prune_head=False) == [0, 1, 2, 3]
    torch.testing.assert_close(kept(x), logits, rtol=0, atol=0)  # nothing after the last tap: nothing pruned


def test_feature_info_indexes_as_timms_feature_info():
    model = small(features_only=True, out_indices=(1, 3))
    convnext = timm_convnext(features_only=True, out_indices=(1, 3))
    info = model.feature_info
    for fi in (info, convnext.feature_info):  # every stage is listed; out_indices picks what the model returns
        assert len(fi) == 4 and tuple(fi.out_indices) == (1, 3) and len(fi.channels()) == 2
        assert fi.channels(1) == fi.channels()[0] and fi.reduction([0, 3]) == [4, 32]
    theirs = TimmFeatureInfo([dict(entry) for entry in info], (1, 3))
    for idx in (None, 0, 2, [0, 2]):
        for key in ("num_chs", "reduction", "module", "index"):
            assert info.get(key, idx) == theirs.get(key, idx)
        assert info.get_dicts(idx=idx) == theirs.get_dicts(idx=idx)
        assert info.get_dicts(["num_chs"], idx) == theirs.get_dicts(["num_chs"], idx)
    other = info.from_other((0, 2))
    assert other.channels() == theirs.from_other((0, 2)).channels() == [16, 64] and info.out_indices == (1, 3)
    assert [m.shape[1] for m in model(torch.randn(1, 3, 64, 64))] == info.channels()


@torch.no_grad()
def test_feature_hook_net_taps_the_feature_info_modules():
    model = small(num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    want = model.forward_intermediates(x, indices=(1, 3), norm=True, intermediates_only=True)
    hooked = FeatureHookNet(model, out_indices=(1, 3))
    assert hooked.feature_info.channels() == [32, 128]
    torch.testing.assert_close(hooked(x), want, rtol=0, atol=0)


def test_grad_checkpointing_attribute_as_resnet():
    resnet, model = timm.create_model("resnet10t"), small()
    for m in (resnet, model):
        assert m.grad_checkpointing is False
        m.set_grad_checkpointing()
        assert m.grad_checkpointing is True
    assert all(stage.grad_checkpointing for stage in model.layers)


# ---------------------------------------------------------------- registration and pretrained files

@pytest.mark.parametrize("in_chans", [1, 2, 4, 6])
def test_first_conv_is_adapted_as_timm_adapts_it(in_chans):
    weight = torch.randn(16, 3, 4, 4)
    torch.testing.assert_close(asmlp_min.timm.adapt_input_conv(weight, in_chans),
                               timm_adapt_input_conv(in_chans, weight), rtol=0, atol=0)


def test_first_conv_of_another_width_than_rgb_is_refused():
    with pytest.raises(CheckpointError, match="has 4 input channels: only RGB adapts to in_chans=1"):
        asmlp_min.timm.adapt_input_conv(torch.randn(16, 4, 4, 4), 1)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A small randomised ImageNet-shaped classifier in the official key layout, {"model": state_dict}."""
    model = small(num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "asmlp_test.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model


@torch.no_grad()
@pytest.mark.parametrize("in_chans", [1, 3, 6])
def test_pretrained_file_loads_through_timm_with_in_chans_and_a_new_head(official_file, in_chans):
    path, rgb = official_file
    model = timm.create_model("asmlp_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              in_chans=in_chans, num_classes=5, **SMALL).eval()
    image = torch.randn(2, 3, 64, 64)
    if in_chans == 1:  # a grey image: the RGB weights see the same grey in every channel
        image = image[:, :1].expand(-1, 3, -1, -1)
    same = image[:, :1] if in_chans == 1 else image.repeat(1, in_chans // 3, 1, 1)
    torch.testing.assert_close(model.forward_features(same), rgb.forward_features(image), rtol=1e-5, atol=1e-5)
    assert model.head.weight.shape == (5, 128) and model.pretrained_cfg["input_size"] == (in_chans, 224, 224)
    backbone = timm.create_model("asmlp_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 features_only=True, **SMALL)
    torch.testing.assert_close(backbone.layers[2].state_dict(), rgb.layers[2].state_dict(), rtol=0, atol=0)
    if in_chans == 3:  # timm's own loader (checkpoint_path) reads the official layout too
        loaded = timm.create_model("asmlp_tiny", checkpoint_path=str(path), num_classes=1000, **SMALL)
        torch.testing.assert_close(loaded.state_dict(), rgb.state_dict(), rtol=0, atol=0)


def test_a_pretrained_file_that_states_another_shift_size_is_refused_through_timm_too(tmp_path):
    """The official AS-MLP-S det/seg files are named "shift5" and use 3; only their config says so. timm's
    pretrained=True goes through the same check as load_official_checkpoint."""
    weights = small(num_classes=1000, shift_size=3).state_dict()
    dense = tmp_path / "mmseg.pth"      # mmdet/mmseg: backbone.* keys, the config text in meta
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in weights.items()},
                "meta": {"config": "model = dict(backbone=dict(type='ASMLP', shift_size=3))"}}, dense)
    classifier = tmp_path / "cls.pth"   # the official trainer's config, as load_checkpoint keeps it
    torch.save({"model": weights, "official_config": {"MODEL": {"ASMLP": {"SHIFT_SIZE": 3}}}}, classifier)
    for path, kwargs in [(dense, dict(features_only=True)), (classifier, dict(num_classes=1000))]:
        with pytest.raises(CheckpointError, match="config says shift_size=3, this model shifts by 5"):
            timm.create_model("asmlp_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs,
                              **SMALL)
        model = timm.create_model("asmlp_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  shift_size=3, **kwargs, **SMALL)
        torch.testing.assert_close(model.layers[1].state_dict(), {k.removeprefix("layers.1."): v for k, v in
                                   weights.items() if k.startswith("layers.1.")}, rtol=0, atol=0)


def test_the_data_config_of_an_overlay_is_kept_as_timm_keeps_it():
    from timm.data import resolve_model_data_config
    overlay = dict(input_size=(3, 256, 256), test_input_size=(3, 288, 288), crop_pct=1.0)
    ours = timm.create_model("asmlp_mobile", pretrained_cfg_overlay=overlay)
    theirs = timm.create_model("convnext_atto", pretrained_cfg_overlay=overlay)
    assert resolve_model_data_config(ours) == resolve_model_data_config(theirs)
    assert resolve_model_data_config(ours)["input_size"] == (3, 256, 256)
    grey = timm.create_model("asmlp_mobile", pretrained_cfg_overlay=overlay, in_chans=1)
    assert grey.pretrained_cfg["input_size"] == (1, 256, 256)


def test_pretrained_without_a_file_says_how_to_give_one():
    with pytest.raises(ValueError, match=r"no weights can be downloaded.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("asmlp_tiny", pretrained=True)


@pytest.mark.parametrize("option", [dict(feature_cls="getter"), dict(feature_cls="hook"), dict(output_stride=16)])
def test_timms_feature_wrapping_options_are_refused_naming_features_only(option):
    """timm would wrap or dilate the model for them; it gives its features itself. Before: a TypeError from
    ASMLP.__init__ about an unexpected keyword."""
    with pytest.raises(ValueError, match=f"asmlp_tiny: {next(iter(option))}=.* is not supported; features_only=True"):
        timm.create_model("asmlp_tiny", features_only=True, **option)


def test_timm_create_model_builds_the_asmlp_min_model():
    assert timm.list_models("asmlp*") == ["asmlp_base", "asmlp_mobile", "asmlp_small", "asmlp_tiny"]
    backbone = timm.create_model("asmlp_tiny", features_only=True, out_indices=(1, 3)).eval()
    assert backbone.feature_info.channels() == [192, 768]
    assert [m.shape[1:] for m in backbone(torch.randn(1, 3, 64, 64))] == [(192, 8, 8), (768, 2, 2)]
    torch.manual_seed(0)
    theirs = timm.create_model("asmlp_mobile", num_classes=10, in_chans=1, global_pool="avgmax")
    torch.manual_seed(0)
    ours = create_model("asmlp_mobile", num_classes=10, in_chans=1, global_pool="avgmax")
    torch.testing.assert_close(theirs.state_dict(), ours.state_dict(), rtol=0, atol=0)
    assert theirs.global_pool.pool_type == "avgmax" and theirs.pretrained_cfg["architecture"] == "asmlp_mobile"


def test_only_the_timm_module_imports_timm_and_nothing_imports_onnx_at_import():
    package = Path(asmlp_min.__file__).parent
    for path in package.rglob("*.py"):
        imported = set()
        for node in ast.parse(path.read_text()).body:  # module level: what `import asmlp_min...` runs
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        allowed = {"timm"} if path.name == "timm.py" else set()
        assert imported & {"timm", "onnx", "onnxscript", "onnxruntime"} <= allowed, path


# ---------------------------------------------------------------- timm's training tools keep working

def test_timm_data_config_transform_ema_optimizer_and_scheduler():
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    model = small(num_classes=7).train()
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.875 and config["mean"] == (0.485, 0.456, 0.406)
    resize = create_transform(**config).transforms[0]  # evaluation: resize to 224 / 0.875 = 256, then crop 224
    assert resize.size == 256 and resize.interpolation.value == "bicubic"
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    head = [g["lr_scale"] for g in optimizer.param_groups if any(p is model.head.weight for p in g["params"])]
    stem = [g["lr_scale"] for g in optimizer.param_groups
            if any(p is model.patch_embed.proj.weight for p in g["params"])]
    assert head == [1.0] and stem == [min(scales)] and min(scales) < 0.1  # decays from the head down to the stem
    scheduler, epochs = create_scheduler_v2(optimizer, "cosine", num_epochs=3, warmup_epochs=1)
    ema = ModelEmaV3(model, decay=0.5)
    before = ema.module.head.weight.clone()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    scheduler.step(1)
    ema.update(model)
    torch.testing.assert_close(ema.module.head.weight, 0.5 * before + 0.5 * model.head.weight.detach())
    assert epochs == 3 and all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_compiles_as_one_graph_and_runs_channels_last():
    model = small(num_classes=7)
    x = torch.randn(2, 3, 48, 64).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
