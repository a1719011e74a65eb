"""asmlp_min/fast.py against the reference modules of block.py / backbone.py: each fast piece, then whole models
(train and eval, forward and input gradient, NCHW and channels_last, odd and non-square sizes), in float64 where
the kernels allow it, so any difference beyond rounding shows."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asmlp_min import fast, shift
from asmlp_min.backbone import ASMLPStage, PatchEmbed, PatchMerging, create_model
from asmlp_min.block import AxialShiftMix
from asmlp_min.fast import (GELU, FastASMLPStage, FastPatchEmbed, FastPatchMerging, GroupNorm1,
                            var_mean_group_norm)
from tests.test_block import randomise
from tests.test_shift import algorithm1

CL = torch.channels_last
F64 = dict(rtol=1e-10, atol=1e-10)
LAYOUTS = [torch.contiguous_format, CL]


def forward_and_input_grad(module: nn.Module, x: torch.Tensor, grad: bool):
    """The output, and with ``grad`` the gradient of a fixed random projection of it with respect to x."""
    x = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = module(x)
    if not grad:
        return out, None
    outs = out if isinstance(out, list) else [out]
    torch.manual_seed(5)  # randn, not randn_like: the same values whatever the output's memory layout
    projection = sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs)
    (g,) = torch.autograd.grad(projection, x)
    return out, g


def assert_same_function(plain: nn.Module, quick: nn.Module, x: torch.Tensor, **tol):
    for layout in LAYOUTS:
        for grad in (False, True):
            want = forward_and_input_grad(plain, x.contiguous(memory_format=layout), grad)
            got = forward_and_input_grad(quick, x.contiguous(memory_format=layout), grad)
            for g, w in zip(got, want):
                if w is not None:
                    torch.testing.assert_close(g, w, **(tol or F64))


# ---------------------------------------------------------------- each fast piece against its plain module

@pytest.mark.parametrize("plain,cls", [(nn.GroupNorm(1, 12), GroupNorm1), (nn.GELU(), GELU)])
def test_each_fast_module_computes_its_plain_module(plain, cls):
    plain = randomise(plain).double()
    quick = fast.enable(copy.deepcopy(plain))
    assert type(quick) is cls and isinstance(quick, type(plain))
    assert list(quick.state_dict()) == list(plain.state_dict())
    assert_same_function(plain, quick, torch.randn(3, 12, 5, 7, dtype=torch.float64) * 2 + 1)


@pytest.mark.parametrize("size", [(9, 13), (8, 8), (1, 3)])
def test_fast_patch_embed_and_merging_compute_the_plain_ones(size):
    for plain in (PatchEmbed(4, 3, 16), PatchMerging(6)):
        plain = randomise(plain).double()
        quick = fast.enable(copy.deepcopy(plain))
        assert type(quick) in (FastPatchEmbed, FastPatchMerging)
        channels = 3 if isinstance(plain, PatchEmbed) else 6
        assert_same_function(plain, quick, torch.randn(2, channels, *size, dtype=torch.float64))
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    assert fast.enable(PatchMerging(6))(x).is_contiguous(memory_format=CL)  # the layout is kept through the merge
    assert fast.enable(PatchEmbed(4, 3, 16))(torch.randn(1, 3, 8, 8)).is_contiguous(memory_format=CL)  # on CPU


def test_fast_stage_computes_the_plain_stage_in_pieces(monkeypatch):
    plain = randomise(ASMLPStage(8, 2, 3, [0.0, 0.0], downsample=True)).double().eval()
    quick = fast.enable(copy.deepcopy(plain))
    assert type(quick) is FastASMLPStage
    monkeypatch.setattr(fast, "PIECE_BYTES", 8 * 32 * 6 * 5 * 8)  # one image's hidden layer: a piece per image
    assert_same_function(plain, quick, torch.randn(3, 8, 6, 5, dtype=torch.float64))


def test_a_fast_stage_in_train_mode_without_autograd_draws_drop_path_as_the_plain_one(monkeypatch):
    """An EMA teacher runs in train mode under no_grad: in pieces, its drop-path masks came piece by piece."""
    plain = randomise(ASMLPStage(8, 2, 3, [0.5, 0.5], downsample=False)).train()
    quick = fast.enable(copy.deepcopy(plain))
    monkeypatch.setattr(fast, "PIECE_BYTES", 32 * 6 * 5 * 4)  # one image's hidden layer
    x, outputs = torch.randn(4, 8, 6, 5), []
    for model in (plain, quick):
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook_on", ["block", "inside a block", "every module"])
def test_a_forward_hook_sees_the_whole_batch_once_as_on_the_plain_model(monkeypatch, hook_on):
    """A hook that keeps a block's output (a feature extractor) kept the last piece only: [1] of [1, 1, 1]."""
    plain = randomise(ASMLPStage(8, 2, 3, [0.0, 0.0], downsample=False)).eval()
    quick = fast.enable(copy.deepcopy(plain))
    monkeypatch.setattr(fast, "PIECE_BYTES", 32 * 6 * 5 * 4)  # one image's hidden layer: a piece per image
    x, outputs = torch.randn(3, 8, 6, 5), {}
    for model in (plain, quick):
        seen = outputs.setdefault(type(model), [])
        keep = lambda module, args, out, seen=seen: seen.append(out) if module is model.blocks[1].mlp else None
        if hook_on == "every module":
            handle = nn.modules.module.register_module_forward_hook(keep)
        else:
            handle = (model.blocks[1] if hook_on == "block" else model.blocks[1].mlp).register_forward_hook(
                lambda module, args, out, seen=seen: seen.append(out))
        with torch.no_grad():
            model(x)
        handle.remove()
    (plain_out,), (quick_out,) = outputs[ASMLPStage], outputs[FastASMLPStage]
    torch.testing.assert_close(quick_out, plain_out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without a hook the pieces run again
        pieces = []
        monkeypatch.setattr(quick, "run_blocks", lambda piece: pieces.append(len(piece)) or piece)
        quick(x)
    assert pieces == [1, 1, 1]


# ---------------------------------------------------------------- whole models

def model_pair(name, **kwargs):
    plain = randomise(create_model(name, fast=False, num_classes=7, **kwargs)).double()
    return plain, fast.enable(copy.deepcopy(plain))


@pytest.mark.parametrize("name,kwargs", [("asmlp_tiny", {}), ("asmlp_tiny", dict(embed_dim=16, depths=(1, 2, 1, 1))),
                                         ("asmlp_mobile", dict(features_only=True))])
@pytest.mark.parametrize("training", [False, True])
def test_fast_model_equals_the_plain_model(name, kwargs, training):
    plain, quick = model_pair(name, **kwargs)
    for model in (plain, quick):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # randomise's weights grow the outputs over 12 blocks; keep them moderate
        model.train(training)
    x = torch.randn(2, 3, 45, 70, dtype=torch.float64)  # odd, non-square: pads at the stem and at merges
    for layout in LAYOUTS:
        for grad in (False, True):
            torch.manual_seed(3)  # the same drop-path draws in both models
            want = forward_and_input_grad(plain, x.contiguous(memory_format=layout), grad)
            torch.manual_seed(3)
            got = forward_and_input_grad(quick, x.contiguous(memory_format=layout), grad)
            for g, w in zip(got, want):
                if w is not None:
                    for a, b in zip(g if isinstance(g, list) else [g], w if isinstance(w, list) else [w]):
                        scale = b.abs().max().item()
                        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, scale))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's import of torch.jit, not ours
def test_torch_func_grad_vmap_and_jvp_run_the_fast_model_as_the_plain_one():
    """Per-sample gradients (vmap of grad), input gradients and forward-mode derivatives: the shift's
    autograd.Function needed setup_context, a vmap rule and a jvp, and vmap refused the channels_last copy."""
    import torch.autograd.forward_ad as forward_ad
    from torch.func import functional_call, grad, jvp, vmap
    plain, quick = model_pair("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1))
    params = {k: v.detach() for k, v in plain.named_parameters()}
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 4, 6])
    results = []
    for model in (plain, quick.eval()):
        model.eval()
        loss = lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])  # noqa: B023
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        to_input = grad(lambda xi: functional_call(model, params, (xi,)).square().sum())(x)  # noqa: B023
        _, tangent = jvp(model, (x,), (torch.ones_like(x),))
        with forward_ad.dual_level():  # the weights require grad: the shift runs its autograd.Function
            dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, torch.ones_like(x)))).tangent
        results.append([per_sample[k] for k in params] + [to_input, tangent, dual])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_float32_fast_model_is_within_rounding_of_the_plain_one():
    plain, quick = model_pair("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1))
    plain, quick = plain.float().eval(), quick.float().eval()
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(quick(x), plain(x), rtol=1e-4, atol=1e-4)


def test_float32_fast_training_gradients_match_float64_plain_ones():
    """oneDNN's float32 kernels on channels_last (1x1 conv forward and backward, GELU on the (b, h, w, c) view)
    give every parameter the gradient of the plain float64 model, up to float32 rounding: the plain float32 model
    is off by at most 2e-6 of each gradient's largest entry."""
    torch.manual_seed(0)
    plain = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_classes=7, fast=False,
                         drop_path_rate=0.0).double()
    quick = fast.enable(copy.deepcopy(plain)).float()
    x, y = torch.randn(3, 3, 64, 96, dtype=torch.float64), torch.tensor([0, 3, 6])
    grads = []
    for model in (plain, quick):
        F.cross_entropy(model.train()(x.to(next(model.parameters()).dtype)), y).backward()
        grads.append({k: p.grad.double() for k, p in model.named_parameters()})
    want, got = grads
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5 * want[k].abs().max().item(), msg=k)


def test_switch_keeps_parameters_and_checkpoint_keys():
    model = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1))
    plain = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), fast=False)
    assert fast.is_enabled(model) and not fast.is_enabled(plain)
    params, keys = list(model.parameters()), list(model.state_dict())
    fast.enable(model, False)
    assert not fast.is_enabled(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    plain.load_state_dict(fast.enable(model).state_dict(), strict=True)
    norms = sum(isinstance(m, GroupNorm1) for m in model.modules())
    assert norms == 4 * 4 + 1 + 3 + 1  # 4 a block, stem, merges, final
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))  # oneDNN's conv as is


def test_enable_leaves_modules_it_cannot_compute_alone():
    others = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 1, stride=2), nn.GroupNorm(3, 3),
                           nn.GELU(approximate="tanh"), nn.GroupNorm(1, 3, affine=False))
    fast.enable(others)
    assert [type(m) for m in others] == [nn.Conv2d, nn.Conv2d, nn.GroupNorm, nn.GELU, nn.GroupNorm]
    assert not fast.is_enabled(others)
    others(torch.randn(2, 3, 9, 9, requires_grad=True)).sum().backward()   # GroupNorm1 read the missing weight


# ---------------------------------------------------------------- the norm: GroupNorm(1, c)

def test_group_norm_1_is_group_norm_on_cpu():
    """Same parameters and keys as nn.GroupNorm(1, c), and on CPU the same kernel: identical bits."""
    norm, reference = randomise(GroupNorm1(12)), randomise(torch.nn.GroupNorm(1, 12))
    assert isinstance(norm, torch.nn.GroupNorm) and norm.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 12, 5, 7)
    assert torch.equal(norm(x), reference(x))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_var_mean_group_norm_equals_group_norm_in_float64(layout):
    """The GPU inference formula y = x * s + t, checked on CPU: values, dtype, layout, and gradients."""
    torch.manual_seed(0)
    x = (torch.randn(3, 16, 6, 5, dtype=torch.float64) * 3 + 20).contiguous(memory_format=layout).requires_grad_()
    weight, bias = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    out = var_mean_group_norm(x, weight, bias, 1e-5)
    assert out.dtype == torch.float64 and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, F.group_norm(x, 1, weight, bias, 1e-5), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: var_mean_group_norm(x, weight, bias, 1e-5),
                                    (x[:1].detach().requires_grad_(),))


def test_var_mean_group_norm_keeps_float32_statistics_for_bfloat16_input():
    """A bfloat16 input far from zero: statistics in bfloat16 would be off by whole units, ours only by rounding."""
    torch.manual_seed(0)
    x = (torch.randn(2, 32, 8, 8) * 3 + 20).bfloat16()
    weight, bias = torch.randn(32), torch.randn(32)
    out = var_mean_group_norm(x, weight, bias, 1e-5)
    want = F.group_norm(x.double(), 1, weight.double(), bias.double(), 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.bfloat16())


def test_norm_after_a_frozen_part_trains_its_weights():
    """A channels_last input without gradient into a norm whose weights train (the first norm after frozen stages):
    PyTorch 2.11's CPU group_norm backward crashed here. The gradients equal those of the NCHW computation."""
    torch.manual_seed(0)
    norm = randomise(GroupNorm1(16))
    x = torch.randn(2, 16, 5, 6)
    grad = torch.randn_like(x)
    norm(x.contiguous(memory_format=torch.channels_last)).backward(grad)
    got = norm.weight.grad.clone(), norm.bias.grad.clone()
    norm.zero_grad()
    F.group_norm(x, 1, norm.weight, norm.bias, norm.eps).backward(grad)
    torch.testing.assert_close(got[0], norm.weight.grad)
    torch.testing.assert_close(got[1], norm.bias.grad)


# ---------------------------------------------------------------- the zero-padded shift, one write an element
@pytest.mark.parametrize("channels", [3, 97])
@pytest.mark.parametrize("shift_size", [1, 3, 5, 7])
@pytest.mark.parametrize("dims", [(-1, 3), (-2, 2)])
@pytest.mark.parametrize("hw", [(6, 9), (2, 3), (1, 1)])  # non-square; smaller than the shift reach
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("exporting", [False, True], ids=["eager", "export"])  # torch.export's pad-and-cat form
@pytest.mark.parametrize("dilation", [1, 2])
def test_fast_shift_equals_algorithm1_bit_for_bit(channels, shift_size, dims, hw, layout, exporting, dilation,
                                                  monkeypatch):
    """The slice copies (and under torch.export shift.axial_shift's pad and concat), forward and backward, against
    the test's own transcription of Algorithm 1; the output keeps the input's memory format."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting, raising=False)  # new in torch 2.6
    x = torch.randn(2, channels, *hw).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(2, channels, *hw)
    ours, theirs = dims
    out, want = fast.axial_shift(x, shift_size, ours, dilation), algorithm1(x, shift_size, theirs, dilation)
    assert torch.equal(out, want) and (exporting or out.stride() == x.stride())
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
    with torch.no_grad():                           # inference skips the autograd.Function
        assert torch.equal(fast.axial_shift(x, shift_size, ours, dilation), want)


def test_fast_shift_runs_on_a_torch_without_is_exporting(monkeypatch):
    """torch.compiler.is_exporting came with torch 2.6; pyproject allows torch 2.4."""
    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    x = torch.randn(2, 7, 3, 5, requires_grad=True)
    assert torch.equal(fast.axial_shift(x, 5, -1), algorithm1(x, 5, 3))


def test_fast_shift_of_no_channels_and_its_gradcheck():
    x = torch.zeros(2, 0, 4, 5, requires_grad=True)
    out = fast.axial_shift(x, 5, -1)
    assert out.shape == (2, 0, 4, 5)
    out.sum().backward()
    assert x.grad.shape == (2, 0, 4, 5)
    x = torch.randn(2, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    for dim, dilation in [(-1, 1), (-2, 2)]:
        assert torch.autograd.gradcheck(lambda t: fast.axial_shift(t, 5, dim, dilation), (x,))


class _Shift(nn.Module):
    def __init__(self, dilation: int):
        super().__init__()
        self.dilation = dilation

    def forward(self, x):
        return fast.axial_shift(x, 5, -1, self.dilation)


class _AskedIsCuda(torch.Tensor):
    @property
    def is_cuda(self):
        raise AssertionError("zero_shift asked x.is_cuda under tracing")


class _SaysCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def test_a_triton_that_cannot_build_its_kernel_leaves_the_shift_to_the_slices_after_one_warning(monkeypatch):
    """Triton imports but compiles its launcher with the system's C compiler, which PyTorch's runtime Docker images
    lack: every CUDA forward failed. The first failure warns; later calls go straight to the slices."""
    launches = []

    def cannot_build(*args, **kwargs):
        launches.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    monkeypatch.setattr(fast, "triton", fast.triton or object())
    monkeypatch.setattr(fast, "kernel_shift", cannot_build)
    monkeypatch.setattr(fast, "_kernel", {"works": None})
    x = torch.randn(2, 7, 3, 5)
    with pytest.warns(RuntimeWarning, match="Triton shift kernel could not run here .*Failed to find C compiler"):
        assert torch.equal(fast.zero_shift(x.as_subclass(_SaysCuda), 5, 3, 1), algorithm1(x, 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fast.zero_shift(x.as_subclass(_SaysCuda), 5, 2, 1), algorithm1(x, 5, 2))
    assert launches == [1]
    monkeypatch.setattr(fast, "_kernel", {"works": None})   # once it has run, a later failure is a real error
    monkeypatch.setattr(fast, "kernel_shift", lambda *args: launches.append(1) or fast.slice_shift(*args))
    fast.zero_shift(x.as_subclass(_SaysCuda), 5, 3, 1)
    monkeypatch.setattr(fast, "kernel_shift", cannot_build)
    with pytest.raises(RuntimeError, match="C compiler"):
        fast.zero_shift(x.as_subclass(_SaysCuda), 5, 3, 1)
    assert len(launches) == 3


def test_fast_shift_under_tracing_never_asks_the_device(monkeypatch):
    """torch 2.4's torch.export refuses to trace ``x.is_cuda`` ("Illegal getattr invocation is_cuda in strict
    mode"), so zero_shift asks is_compiling first, with Triton present or not."""
    monkeypatch.setattr(fast, "triton", fast.triton or object())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 7, 3, 5)
    assert torch.equal(fast.zero_shift(x.as_subclass(_AskedIsCuda), 5, 3, 1), algorithm1(x, 5, 3))


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="before torch 2.6 the export keeps the "
                    "slice copies: no torch.compiler.is_exporting to tell it from torch.compile")
@pytest.mark.parametrize("dilation", [1, 2])
def test_torch_export_writes_the_fast_shift_as_pad_and_cat_with_the_same_values(dilation):
    """Slice copies into a tensor would export as index scatters; the export takes shift.axial_shift's form."""
    x = torch.randn(2, 13, 4, 9)
    program = torch.export.export(_Shift(dilation), (x,))
    ops = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.cat.default in ops and not {torch.ops.aten.copy_.default, torch.ops.aten.copy.default} & ops
    for y in (x, torch.randn(2, 13, 4, 9)):  # another input through the same graph
        assert torch.equal(program.module()(y), shift.axial_shift(y, 5, -1, dilation))


KERNEL_CHECK = """
import itertools, torch
from asmlp_min.fast import kernel_shift
from asmlp_min.shift import axial_shift
torch.manual_seed(0)
cases = 0
for (c, h, w), s, d, dim, layout, dtype in itertools.product(
        [(13, 5, 7), (4, 1, 2), (16, 6, 3)], [1, 3, 5, 7], [1, 2], [2, 3],
        [torch.contiguous_format, torch.channels_last], [torch.float32, torch.float64]):
    x = torch.randn(2, c, h, w, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(2, c, h, w, dtype=dtype)
    got = kernel_shift(x.detach(), s, dim, d)
    want = axial_shift(x, s, dim, d)
    assert got.stride() == x.stride(), (got.stride(), x.stride())
    assert torch.equal(got, want), (c, h, w, s, d, dim, layout)
    (g_want,) = torch.autograd.grad(want, x, grad)
    g_got = kernel_shift(grad.contiguous(memory_format=layout), s, dim, d, sign=-1)
    assert torch.equal(g_got, g_want), ("backward", c, h, w, s, d, dim, layout)
    cases += 1
x = torch.randn(2, 13, 5, 8)[..., ::2]  # not dense: copied first
assert torch.equal(kernel_shift(x, 5, 3, 1), axial_shift(x, 5, 3))
print(cases)
"""


def test_kernel_shift_equals_the_torch_shift_under_the_triton_interpreter():
    """The Triton kernel, run by Triton's interpreter on CPU tensors (it only launches on a GPU otherwise), against
    shift.axial_shift, forward and backward (sign -1): odd channel counts, images narrower than the shift,
    dilation 2, both memory formats. A fresh process, because TRITON_INTERPRET is read when the kernel is
    defined."""
    triton = pytest.importorskip("triton")
    if tuple(map(int, triton.__version__.split(".")[:2])) < (3, 2):  # torch 2.4 and 2.5 come with 3.0 and 3.1
        pytest.skip("Triton's interpreter before 3.2 gives wrong values for a plain copy kernel on CPU tensors")
    run = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=os.environ | {"TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(3 * 4 * 2 * 2 * 2 * 2)]


def test_fast_shift_mix_runs_the_torch_shift_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "kernel_shift", lambda *a: calls.append(a))
    for padding in ("zeros", "reflect"):
        mix = fast.enable(randomise(AxialShiftMix(10, padding=padding)))
        assert type(mix) is fast.FastAxialShiftMix
        plain = fast.enable(copy.deepcopy(mix), False)
        x = torch.randn(2, 10, 6, 7)
        torch.testing.assert_close(mix(x), plain(x), rtol=0, atol=0)
    assert calls == []
