"""Static graphs: torch.export of the classifier and the features model, FX tracing, torchvision's feature extractor."""
import functools
import types
from pathlib import Path

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from asmlp_min.backbone import create_model
from asmlp_min.export import export_onnx
from tests.test_block import randomise


def tiny(**kwargs):
    return randomise(create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), **kwargs)).eval()


def test_export_classifier_runs_like_the_model():
    model = tiny(num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    exported = program.module()
    other = torch.randn(2, 3, 64, 64)  # not the example input: the graph is general, not a recording of one call
    for inp in (x, other):
        torch.testing.assert_close(exported(inp), model(inp), rtol=1e-5, atol=1e-5)
    assert len(program.graph_signature.parameters) == len(list(model.parameters()))


def test_export_features_model_returns_the_four_maps():
    model = tiny(features_only=True)
    x = torch.randn(1, 3, 48, 80)
    exported = torch.export.export(model, (x,)).module()
    got, want = exported(x), model(x)
    assert [tuple(f.shape) for f in got] == [(1, 16, 12, 20), (1, 32, 6, 10), (1, 64, 3, 5), (1, 128, 2, 3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_export_at_an_odd_size_keeps_the_padding():
    model = tiny(num_classes=3)
    x = torch.randn(1, 3, 37, 50)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_fx_symbolic_trace_of_the_whole_model():
    model = tiny(num_classes=5)
    traced = torch.fx.symbolic_trace(model)
    called = {node.target.__name__ for node in traced.graph.nodes if node.op == "call_function"
              and hasattr(node.target, "__name__")}
    assert {"axial_shift", "gelu", "group_norm_1", "check_image_batch"} <= called  # kept as leaves
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        traced(torch.randn(1, 1, 32, 32))  # the input check still runs inside the traced graph


EVAL_ONLY = pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in eval mode")


@EVAL_ONLY
def test_create_feature_extractor_taps_stages_and_a_shift():
    model = tiny(num_classes=5)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "layers.0.blocks.0.axial_shift.axial_shift" in eval_nodes  # the shift is a node of its own
    extractor = create_feature_extractor(model, return_nodes={
        "layers.0.blocks.0.axial_shift.axial_shift": "shifted_w", "layers.0": "stage0", "layers.3": "stage3",
        "norm": "features", "head": "logits"})
    x = torch.randn(2, 3, 64, 64)
    out = extractor(x)
    assert tuple(out["shifted_w"].shape) == (2, 16, 16, 16)
    assert tuple(out["stage0"].shape) == (2, 32, 8, 8)  # stage 0 ends with its merge
    assert tuple(out["stage3"].shape) == (2, 128, 2, 2)
    torch.testing.assert_close(out["features"], model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)


@EVAL_ONLY
def test_with_the_fast_leaf_modules_the_fast_model_has_the_plain_models_node_names_and_values():
    """Traced into, the fast GELU's three calls in a block became nodes of their own, and "...actn" named the last
    one, where on the plain model it names the first."""
    from asmlp_min import fast
    model = tiny(num_classes=5)
    plain = fast.enable(create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=5), False)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    leaves = {"leaf_modules": list(fast.FX_LEAF_MODULES)}
    for quick, want in zip(get_graph_node_names(model, tracer_kwargs=leaves), get_graph_node_names(plain)):
        assert [n for n in quick if n != "patch_embed.to_fast_layout"] == want
    nodes = ["layers.1.blocks.0.axial_shift.actn", "layers.1.blocks.0.axial_shift.actn_2", "layers.2.blocks.0.norm1"]
    assert all(n in get_graph_node_names(plain)[1] for n in nodes)
    x = torch.randn(2, 3, 64, 64)
    got = create_feature_extractor(model, nodes, tracer_kwargs=leaves)(x)
    want = create_feature_extractor(plain, nodes)(x)
    for n in nodes:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)


@EVAL_ONLY
def test_create_feature_extractor_on_the_features_model():
    model = tiny(features_only=True)
    extractor = create_feature_extractor(model, return_nodes={f"norm{i}": f"p{i + 2}" for i in range(4)})
    x = torch.randn(1, 3, 64, 64)
    out = extractor(x)
    assert list(out) == ["p2", "p3", "p4", "p5"]
    for got, want in zip(out.values(), model(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@EVAL_ONLY
def test_intermediate_outputs_are_not_overwritten_during_inference():
    """Forward hooks and create_feature_extractor keep references to module outputs: no later in-place op (a GELU,
    a residual sum) may change them, with or without autograd."""
    model = tiny(num_classes=5)
    names = ["layers.0.blocks.0.axial_shift.norm1", "layers.0.blocks.0.axial_shift.conv2_1",
             "layers.0.blocks.0.axial_shift", "layers.0.blocks.0.mlp.fc1", "layers.1.blocks.0.mlp"]
    x = torch.randn(2, 3, 64, 64)
    kept, copied = {}, {}

    def keep(module, args, out, name):
        kept[name], copied[name] = out, out.clone()

    for name in names:
        model.get_submodule(name).register_forward_hook(functools.partial(keep, name=name))
    with torch.no_grad():
        model(x)
    for name in names:
        torch.testing.assert_close(kept[name], copied[name], rtol=0, atol=0, msg=name)
    extractor = create_feature_extractor(tiny(num_classes=5), return_nodes=names + ["norm"])
    with torch.no_grad():
        inference = extractor(x)
    training_mode = extractor(x)  # autograd on
    for name in names:
        torch.testing.assert_close(inference[name], training_mode[name], rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------- ONNX (asmlp-min export), run in onnxruntime

@pytest.fixture(scope="module")
def official_layout_weights(tmp_path_factory):
    """A randomised small classifier saved as the official checkpoints are, {"model": state_dict}: the export CLI
    loads it, and the test compares onnxruntime with this very model in eager mode."""
    torch.manual_seed(0)
    model = randomise(create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, num_classes=7))
    path = tmp_path_factory.mktemp("weights") / "small.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model.eval()


ONNX_EXPORTER = pytest.mark.skipif(torch.__version__ < "2.5", reason="torch.onnx.export(dynamo=True) is torch 2.5's")


@ONNX_EXPORTER
@pytest.mark.slow  # ~10 s an export on 2 cores: two exports cover both outputs and sizes
@pytest.mark.parametrize("size, features_only", [((64, 64), False), ((36, 52), True)],  # 36 x 52 pads at the stem
                         ids=["classifier", "backbone-padded"])                       # and at two merges
def test_onnx_export_runs_in_onnxruntime_like_eager_for_any_batch(official_layout_weights, tmp_path, capsys,
                                                                  features_only, size):
    import onnx
    import onnxruntime

    from asmlp_min.checkpoint import load_backbone_checkpoint
    from asmlp_min.cli import main
    weights, classifier = official_layout_weights
    model = classifier
    if features_only:
        model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, features_only=True)
        load_backbone_checkpoint(model, weights)
        model.eval()
    out = tmp_path / "model.onnx"
    argv = ["export", "--embed-dim", "8", "--depths", "1,1,1,1", "--shift-size", "3", "--num-classes", "7",
            "--weights", str(weights), "--image-size", *map(str, size), "--output", str(out)]
    assert main(argv + ["--features-only"] * features_only) == 0
    assert str(out) in capsys.readouterr().out and not list(tmp_path.glob(".*.tmp"))  # renamed into place
    ops = {node.op_type for node in onnx.load(out).graph.node}
    if torch.__version__ >= "2.7":  # before it torch.compiler.is_exporting is False in the exporter's tracing
        assert {"Pad", "Concat"} <= ops and "ScatterND" not in ops   # the shift as pad and cat (shift.py)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == (["stage0", "stage1", "stage2", "stage3"] if features_only
                                                        else ["logits"])
    for batch in (1, 3):  # the export traced a batch of 2
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            want = model(x)
        got = session.run(None, {"images": x.numpy()})
        for g, w in zip(got, want if features_only else [want], strict=True):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=1e-4)
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):  # another size is refused, not misread
        session.run(None, {"images": torch.randn(1, 3, size[0] + 32, size[1]).numpy()})


def test_a_detector_or_segmenter_is_refused_naming_its_backbone(tmp_path):
    from asmlp_min import SemanticSegmenter, SimpleFPNDetector
    tiny = dict(embed_dim=16, depths=(1, 1, 1, 1))
    for model in (SimpleFPNDetector("asmlp_tiny", num_classes=3, **tiny), SemanticSegmenter("asmlp_tiny", 4, **tiny)):
        with pytest.raises(TypeError, match=rf"not a {type(model).__name__} \(export its .backbone\)"):
            export_onnx(model, tmp_path / "x.onnx", (64, 64))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_three_image_sizes_in_one_line(capsys):
    from asmlp_min.cli import main
    assert main(["export", "--image-size", "64", "64", "64"]) == 2
    assert "--image-size takes one size or two" in capsys.readouterr().err


def test_export_without_a_head_says_it_writes_pooled_features(tmp_path, capsys, monkeypatch):
    from asmlp_min.cli import main
    shapes = []

    def traced(model, path, image_size):  # stands in for the ~10 s ONNX export: what would be exported
        shapes.append(tuple(model(torch.randn(2, 3, *image_size)).shape))
    monkeypatch.setattr("asmlp_min.export.export_onnx", traced)
    out = tmp_path / "features.onnx"
    argv = ["export", "--embed-dim=8", "--depths=1,1,1,1", "--image-size=32", f"--output={out}"]
    assert main(argv + ["--num-classes=0"]) == 0
    assert shapes == [(2, 64)]  # 8C = 64 pooled channels, no head
    captured = capsys.readouterr()
    assert captured.out.endswith(f"{out}: images (batch, 3, 32, 32) -> pooled features (batch, 64)\n")
    assert "tracing asmlp_tiny at 32x32 for ONNX (torch.export: a minute or two on a CPU)" in captured.err
    assert main(argv + ["--num-classes=7"]) == 0
    assert shapes[-1] == (2, 7) and capsys.readouterr().out.endswith("-> logits (batch, 7)\n")


def test_export_says_what_the_weights_filled_and_which_norms_kept_their_initial_values(official_layout_weights,
                                                                                      tmp_path, capsys, monkeypatch):
    from asmlp_min.cli import main
    monkeypatch.setattr("asmlp_min.export.export_onnx", lambda model, path, image_size: Path(path).write_bytes(b"x"))
    weights, classifier = official_layout_weights
    out = tmp_path / "model.onnx"
    argv = ["export", "--embed-dim=8", "--depths=1,1,1,1", "--shift-size=3", "--num-classes=7",
            f"--weights={weights}", "--image-size=32", f"--output={out}"]
    assert main(argv) == 0                                    # a classifier: every tensor of the file
    captured = capsys.readouterr()
    assert f"loaded {len(classifier.state_dict())} tensors\n" in captured.err and "initial values" not in captured.err
    assert main(argv + ["--features-only"]) == 0              # its backbone: the classifier has no norm0..norm3
    captured = capsys.readouterr()
    kept = "left at their initial values: norm0.weight, norm0.bias, norm1.weight, norm1.bias, ... (4 more)"
    assert kept in captured.err
    assert captured.out.endswith("(replaced an older file)\n")
    assert main(argv[:-1] + [f"--output={tmp_path}"]) == 2  # a folder: the hint names an .onnx file in it
    assert f"is a folder; give a file name such as '{tmp_path / 'asmlp_tiny.onnx'}'" in capsys.readouterr().err
    assert main([a.replace("--depths=1,1,1,1", "--depths=1,1,2,1") for a in argv]) == 2   # another variant
    assert "\nHere: --model, --embed-dim, --depths and --shift-size give the variant" in capsys.readouterr().err


@ONNX_EXPORTER
def test_onnx_export_hands_the_model_back_in_its_own_mode(monkeypatch, tmp_path):
    """Exported in eval mode (no drop path), without leaving a training model in eval mode afterwards."""
    pytest.importorskip("onnxscript")
    seen = []

    def export(model, *args, **kwargs):
        seen.append(model.training)
        return types.SimpleNamespace(model_proto=types.SimpleNamespace(SerializeToString=lambda: b"onnx"))
    monkeypatch.setattr(torch.onnx, "export", export)
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), num_classes=3).train()
    export_onnx(model, tmp_path / "m.onnx", (32, 32))
    assert seen == [False] and model.training and (tmp_path / "m.onnx").read_bytes() == b"onnx"


def test_onnx_export_on_a_torch_without_the_dynamo_exporter_says_which_torch_it_needs(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.4.1"))
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported on torch 2.4"))
    with pytest.raises(ValueError, match=r"needs torch >= 2\.5, .* this is torch 2\.4\.1: pip install -U torch"):
        export_onnx(create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1)), tmp_path / "m.onnx", (32, 32))
    assert list(tmp_path.iterdir()) == []
