"""The same model on a CUDA GPU: shift bit-exact, logits equal to the CPU's, fp16 autocast, an AMP training run.

CI has no GPU, so this module is skipped there; it runs wherever ``torch.cuda.is_available()`` (``make test`` on a
GPU machine). Matrix products run in full float32 here (TF32 off), so CPU and GPU logits agree to rounding.
"""
import pytest
import torch
import torch.nn.functional as F

from asmlp_min import fast
from asmlp_min.backbone import create_model
from asmlp_min.fast import GroupNorm1
from asmlp_min.detection import SimpleFPNDetector
from asmlp_min.engine import Trainer, TrainConfig, load_trained
from asmlp_min.segmentation import SemanticSegmenter
from asmlp_min.shift import axial_shift
from tests.test_bench import assert_fast_model_equals_official_configuration
from tests.test_block import randomise
from tests.test_shift import algorithm1

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 rounds matmul inputs to 10 mantissa bits; the CPU comparison needs plain float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dims", [(-1, 3), (-2, 2)])
@pytest.mark.parametrize("channels,shift_size", [(96, 5), (97, 5), (768, 7), (3, 3)])
def test_shift_on_cuda_equals_algorithm1_forward_and_backward(dtype, layout, dims, channels, shift_size):
    ours, theirs = dims
    x = torch.randn(2, channels, 7, 11, device=CUDA, dtype=dtype)
    x_ours = x.contiguous(memory_format=layout).requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, want = axial_shift(x_ours, shift_size, ours), algorithm1(x_ref, shift_size, theirs)
    assert out.is_contiguous(memory_format=layout) and torch.equal(out, want)
    grad = torch.randn_like(want)
    (g_ours,) = torch.autograd.grad(out, x_ours, grad)
    (g_ref,) = torch.autograd.grad(want, x_ref, grad)
    assert torch.equal(g_ours, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("channels,shift_size,dilation", [(96, 5, 1), (97, 5, 2), (768, 7, 1), (3, 3, 1)])
def test_triton_shift_on_cuda_equals_the_torch_shift(dtype, layout, dim, channels, shift_size, dilation,
                                                     monkeypatch):
    """The fast model's shift: one Triton kernel launch, forward and backward, bit-equal to shift.axial_shift."""
    pytest.importorskip("triton")
    monkeypatch.setattr(fast, "slice_shift", None)   # the kernel must run, not the slice copies
    x = torch.randn(2, channels, 7, 11, device=CUDA, dtype=dtype).contiguous(memory_format=layout)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fast.axial_shift(x_fast, shift_size, dim, dilation), axial_shift(x_ref, shift_size, dim, dilation)
    assert out.is_contiguous(memory_format=layout) and torch.equal(out, want)
    grad = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(out, x_fast, grad)[0], torch.autograd.grad(want, x_ref, grad)[0])


def test_triton_shift_on_cuda_rejects_what_the_torch_shift_rejects():
    pytest.importorskip("triton")
    x = torch.randn(1, 8, 4, 4, device=CUDA)
    for args, message in [((x, 5, 1), "dim must be a spatial axis"), ((x, 4, -1), "shift_size must be odd"),
                          ((x[0], 5, -1), "expects a .b, c, h, w. tensor")]:
        for shift_fn in (fast.axial_shift, axial_shift):
            with pytest.raises(ValueError, match=message):
                shift_fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inference_group_norm_on_cuda_equals_the_float64_group_norm(dtype, layout):
    """The var_mean path (CUDA, no autograd). A mean 7 standard deviations from 0, as in a residual stream:
    statistics or a multiply-add in fp16 would lose it."""
    norm = GroupNorm1(96).to(CUDA)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(4, 96, 14, 14, device=CUDA) * 3 + 20).to(dtype).contiguous(memory_format=layout)
    want = F.group_norm(x.double(), 1, norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        out = norm(x)
        with torch.autocast("cuda", dtype=torch.float16):
            mixed = norm(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, want.to(dtype))  # dtype's default tolerance: one or two units of rounding
    assert mixed.dtype == torch.float32  # as F.group_norm under autocast
    torch.testing.assert_close(mixed, want.float(), rtol=1e-5, atol=1e-5)


def test_training_group_norm_on_cuda_is_pytorchs():
    """With autograd the native kernel runs (its backward is faster): the same bits as F.group_norm."""
    norm = GroupNorm1(64).to(CUDA)
    x = torch.randn(3, 64, 9, 10, device=CUDA, requires_grad=True)
    assert torch.equal(norm(x), F.group_norm(x, 1, norm.weight, norm.bias, norm.eps))
    with torch.no_grad():
        assert not torch.equal(norm(x), F.group_norm(x, 1, norm.weight, norm.bias, norm.eps))  # the other path


@pytest.mark.parametrize("features_only", [False, True])
def test_asmlp_t_on_cuda_gives_the_cpu_logits(features_only):
    """Full AS-MLP-T at 224x224 with non-trivial weights: GPU outputs within 1e-4 of the CPU's (float32)."""
    model = randomise(create_model("asmlp_tiny", features_only=features_only)).eval()
    for p in model.parameters():
        p.data.mul_(0.5)  # randomise's 0.2-scaled weights grow the logits to ~1e3 over 12 blocks; keep them ~1e1
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        got = model.to(CUDA)(x.to(CUDA))
    pairs = zip(got, want) if features_only else [(got, want)]
    for g, w in pairs:
        assert g.device.type == "cuda" and g.shape == w.shape
        scale = w.abs().max().item()
        assert (g.cpu() - w).abs().max().item() <= 1e-4 * max(1.0, scale), scale


def test_fast_model_equals_official_configuration_on_cuda_forward_and_backward():
    assert_fast_model_equals_official_configuration((50, 71), CUDA)


def test_fp16_autocast_follows_the_float32_logits():
    model = create_model("asmlp_tiny", num_classes=10).to(CUDA).eval()
    x = torch.randn(4, 3, 224, 224, device=CUDA)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cuda", dtype=torch.float16):
            got = model(x)
    assert got.dtype == torch.float16
    relative = ((got.float() - want).norm() / want.norm()).item()
    assert relative < 1e-2, relative  # fp16 operands: ~1e-3; a norm or shift in the wrong precision is far off


def test_amp_training_on_cuda_learns_and_its_checkpoint_loads_on_cpu(tmp_path):
    cfg = TrainConfig(task="cls", output=str(tmp_path / "run"), epochs=20, batch_size=8, train_size=8, val_size=8,
                      image_size=32, embed_dim=8, depths=(1, 1, 1, 1), drop_path=0.0, mixup=0.0, cutmix=0.0,
                      augment="none", label_smoothing=0.0, lr=3e-3, warmup_epochs=0, eval_every=20, device="cuda",
                      amp=True)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert trainer.scaler.is_enabled()
    dtypes = set()
    trainer.model.head.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    history = trainer.fit()
    assert dtypes == {torch.float16}
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    model, _, _ = load_trained(tmp_path / "run" / "checkpoint.pt", device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_detector_and_segmenter_train_and_predict_on_cuda():
    torch.manual_seed(0)
    detector = SimpleFPNDetector("asmlp_tiny", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1), fpn_channels=32,
                                 num_convs=1, drop_path_rate=0.0).to(CUDA).train()
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]], device=CUDA), "labels": torch.tensor([2], device=CUDA)}
    losses = detector([torch.rand(3, 64, 64, device=CUDA)], [target])
    assert all(v.isfinite() for v in losses.values())
    sum(losses.values()).backward()
    detector.eval()
    with torch.no_grad():
        (out,) = detector([torch.rand(3, 64, 80, device=CUDA)])
    assert out["boxes"].device.type == "cuda" and out["boxes"].shape[1] == 4

    segmenter = SemanticSegmenter("asmlp_tiny", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1),
                                  drop_path_rate=0.0, channels=32, aux_channels=16).to(CUDA).train()
    images, masks = torch.rand(2, 3, 64, 64, device=CUDA), torch.randint(0, 3, (2, 64, 64), device=CUDA)
    losses = segmenter(images, masks)
    assert all(v.isfinite() for v in losses.values())
    sum(losses.values()).backward()
    segmenter.eval()
    with torch.no_grad():
        logits = segmenter(torch.rand(1, 3, 45, 61, device=CUDA))
    assert logits.shape == (1, 3, 45, 61)


def test_predict_runs_on_the_gpu_and_agrees_with_the_cpu(tmp_path):
    import json

    from PIL import Image

    from asmlp_min.cli import main
    from asmlp_min.data.shapes import make_scene, scene_rng
    from tests.test_cli import tiny_for
    image = tmp_path / "scene.png"
    Image.fromarray(make_scene(scene_rng(7, "test", 0), 64).image).save(image)
    assert main(["train", "cls", *tiny_for("cls"), f"--output={tmp_path / 'run'}"]) == 0
    for device in ("cpu", "cuda"):
        assert main(["predict", f"--checkpoint={tmp_path / 'run' / 'checkpoint.pt'}", str(image), f"--device={device}",
                     f"--output={tmp_path / device}", f"--json={tmp_path / device}.json"]) == 0
    cpu, cuda = (json.loads((tmp_path / f"{d}.json").read_text())[0]["top"] for d in ("cpu", "cuda"))
    assert [c["class"] for c in cpu] == [c["class"] for c in cuda]
    assert [c["probability"] for c in cpu] == pytest.approx([c["probability"] for c in cuda], abs=1e-4)
