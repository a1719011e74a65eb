"""The speed paths, behind one switch: ``enable(model, on)``, which ``create_model(..., fast=True)`` calls.

block.py and backbone.py are the reference: ``nn.GroupNorm(1, c)``, ``nn.GELU``, NCHW tensors, the whole batch
through every stage. ``enable`` changes the class of those modules in place to the
subclasses below, whose forward computes the same function faster; ``enable(model, False)`` changes them back.
Parameters, their names and the state_dict keys stay as they are, so official checkpoints load either way and an
optimizer keeps its parameters. tests/test_fast.py checks each piece and whole models against the reference.

- CPU activations are channels_last (:class:`FastPatchEmbed`, :class:`FastPatchMerging`), where oneDNN runs each
  plain 1x1 ``nn.Conv2d`` as one matrix product over channels, forward and backward, and GELU runs on the
  contiguous (b, h, w, c) view.
- CPU inference runs each stage on pieces of the batch (:func:`inference_pieces`), which reuse freed memory; a
  stage whose blocks carry forward hooks runs whole, so that each hook sees the batch once.
- The zero-padded shift writes each output element once: slice copies (:func:`slice_shift`), on CUDA one Triton
  kernel (:func:`kernel_shift`) where Triton is installed; its backward is the same shift the other way.
- CUDA inference takes GroupNorm(1, c)'s statistics with ``torch.var_mean`` (:func:`var_mean_group_norm`), which
  spreads a sample over the whole GPU where the native kernel gives it one thread block.

Nothing works in place: forward hooks and ``create_feature_extractor`` see every module's true output.
How much each path gains, and what was tried and dropped: benchmarks/README.md.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import backbone, shift
from .backbone import ASMLPStage, PatchEmbed, PatchMerging, pad_to_multiple
from .block import AxialShiftMix

torch.fx.wrap("pad_to_multiple")  # a leaf here too, as in backbone.py: it branches on the input size


# ---------------------------------------------------------------- GroupNorm(1, c)
@torch.fx.wrap  # a leaf for FX tracing: it branches on the device and the autograd mode
def group_norm_1(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm(x, 1, ...)`` up to float rounding, (b, c, h, w) -> (b, c, h, w).

    CUDA inference takes :func:`var_mean_group_norm`: the native kernel reduces each sample in one thread block, so
    a small batch leaves most of the GPU idle. With autograd, and on CPU, the native kernel is faster.
    """
    grad = torch.is_grad_enabled()
    # PyTorch's CPU group_norm backward crashes (segfault) on a channels_last x without grad when the weights need
    # one: the first norm after frozen stages (detection's frozen_stages). var_mean_group_norm avoids that kernel.
    after_frozen = (grad and weight.requires_grad and not x.requires_grad and not x.is_contiguous()
                    and x.is_contiguous(memory_format=torch.channels_last))
    if (x.is_cuda and not grad) or after_frozen:
        return var_mean_group_norm(x, weight, bias, eps)
    return F.group_norm(x, 1, weight, bias, eps)


def var_mean_group_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm(1, c) as a reduction and one multiply-add, all arithmetic in float32 (or float64):

        y[b, c] = x[b, c] * s[b, c] + t[b, c],   s = weight[c] / sqrt(var_b + eps),   t = bias[c] - mean_b * s

    with the biased ``mean_b, var_b`` over (c, h, w) of sample b (``torch.var_mean``, which spreads one sample
    over many thread blocks). The output has x's dtype and layout; under CUDA autocast it is float32, as
    group_norm's is there.
    """
    exact = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(exact), dim=(1, 2, 3), correction=0, keepdim=True)
    scale = weight.to(exact).view(-1, 1, 1) * torch.rsqrt(var + eps)  # (b, c, 1, 1)
    offset = bias.to(exact).view(-1, 1, 1) - mean * scale
    with torch.autocast("cuda", enabled=False):  # autocast would copy x to float32; type promotion reads it as is
        y = torch.addcmul(offset, x, scale)
    return y if torch.is_autocast_enabled("cuda") else y.to(x.dtype)


class GroupNorm1(nn.GroupNorm):
    """``nn.GroupNorm(1, c)`` (same parameters and state_dict keys) run by :func:`group_norm_1`."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(1, channels, eps)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_1(x, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------- GELU
@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout
def gelu(x: Tensor) -> Tensor:
    """Exact GELU into a new tensor; a channels_last ``x`` goes in as the (b, h, w, c) view in which it is
    contiguous, because PyTorch's CPU GELU kernels are slower on the channels_last (b, c, h, w) view."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.gelu(x)


class GELU(nn.GELU):
    """``nn.GELU`` run by :func:`gelu`."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


# ---------------------------------------------------------------- channels_last on CPU
@torch.fx.wrap  # a leaf for FX tracing: it branches on the device
def to_fast_layout(x: Tensor) -> Tensor:
    """channels_last on CPU, where it makes every 1x1 conv one GEMM; NCHW elsewhere (on CUDA, cuDNN's NCHW
    convs are as fast: benchmarks/README.md)."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x  # torch.func's vmap refuses a memory format
    layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    return x.contiguous(memory_format=layout)


class FastPatchEmbed(PatchEmbed):
    """:class:`PatchEmbed` on the input in :func:`to_fast_layout`, which every later layer keeps."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(to_fast_layout(x))


@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout
def space_to_depth(x: Tensor) -> Tensor:
    """:func:`backbone.space_to_depth`, (b, c, 2h, 2w) -> (b, 4c, h, w), as one copy that keeps channels_last."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return backbone.space_to_depth(x)
    tokens = rearrange(x.permute(0, 2, 3, 1), "b (h i) (w j) c -> b h w (j i c)", i=2, j=2)
    return tokens.permute(0, 3, 1, 2)


class FastPatchMerging(PatchMerging):
    """:class:`PatchMerging` that keeps channels_last through the merge."""

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(space_to_depth(pad_to_multiple(x, 2))))


# ---------------------------------------------------------------- the zero-padded shift, one write an element
def slice_shift(x: Tensor, shift_size: int, dim: int, dilation: int, sign: int = 1) -> Tensor:
    """``shift.axial_shift`` with zeros, every output element written once: each group's pixels that stay inside
    are copied into an empty tensor, the ones it vacates set to 0, (b, c, h, w) -> (b, c, h, w) in x's memory
    format. ``dim`` is the tensor axis, 2 or 3; ``sign=-1`` shifts the other way, the backward."""
    out = torch.empty_like(x)
    n = x.shape[dim]
    for c0, c1, offset in shift.group_offsets(x.shape[1], shift_size, dilation):
        offset *= sign
        dst, src = out.narrow(1, c0, c1 - c0), x.narrow(1, c0, c1 - c0)  # not [:, c0:c1]: see shift.axial_shift
        m = max(n - abs(offset), 0)                         # pixels that stay inside the image
        keep_to, keep_from = max(offset, 0), max(-offset, 0)
        if m:
            dst.narrow(dim, keep_to, m).copy_(src.narrow(dim, keep_from, m))
        if offset:  # the centre group vacates nothing
            vacated = (0, min(offset, n)) if offset > 0 else (m, n - m)
            dst.narrow(dim, *vacated).zero_()
    return out


try:  # Triton comes with PyTorch's CUDA builds on Linux; without it CUDA runs the slice copies
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _shift_kernel(x_ptr, out_ptr, numel, channel_stride, channels, axis_stride, axis_size, group, half, step,
                      BLOCK: tl.constexpr):
        """out[p] = x[p - o(c) * axis_stride] or 0, for the elements p of a dense tensor in memory order.

        An element's channel is ``(p // channel_stride) % channels`` and its position along the shifted axis
        ``(p // axis_stride) % axis_size``, whatever the memory format; ``o(c) = (c // group - half) * step``.
        """
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: the caller keeps numel below 2**31
        inside = p < numel
        offset = ((p // channel_stride) % channels // group - half) * step
        source = (p // axis_stride) % axis_size - offset
        keep = inside & (source >= 0) & (source < axis_size)
        tl.store(out_ptr + p, tl.load(x_ptr + p - offset * axis_stride, mask=keep, other=0.0), mask=inside)


def kernel_shift(x: Tensor, shift_size: int, dim: int, dilation: int, sign: int = 1) -> Tensor:
    """:func:`slice_shift` as one launch of :func:`_shift_kernel` (the slices take ``shift_size`` copies and zero
    fills), which reads each output's source element or writes its zero; same memory format."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        _shift_kernel[(triton.cdiv(x.numel(), block),)](
            x, out, x.numel(), x.stride(1), x.shape[1], x.stride(dim), x.shape[dim], -(-x.shape[1] // shift_size),
            shift_size // 2, sign * dilation, BLOCK=block)
    return out


_kernel = {"works": None}  # whether kernel_shift has run in this process: None before its first launch


def _kernel_usable(x: Tensor) -> bool:
    """CUDA where Triton is installed, except under torch.compile, which fuses the slice copies, for tensors of
    2**31 elements or more, which the kernel's int32 indices cannot address, and once its first launch failed.
    ``is_compiling`` is asked first: torch 2.4's torch.export refuses to trace ``x.is_cuda``."""
    return (triton is not None and not torch.compiler.is_compiling() and _kernel["works"] is not False and x.is_cuda
            and x.numel() < 2**31)


def zero_shift(x: Tensor, shift_size: int, dim: int, dilation: int, sign: int = 1) -> Tensor:
    """:func:`kernel_shift` where :func:`_kernel_usable`, :func:`slice_shift` otherwise.

    Triton can be installed and still unable to build a kernel: it compiles a launcher with the system's C compiler,
    which PyTorch's runtime Docker images lack. A first launch that fails is said in a warning, and the slices run
    from then on (the same values); a failure after the kernel has run once is an error.
    """
    if _kernel_usable(x):
        try:
            out = kernel_shift(x, shift_size, dim, dilation, sign)
        except Exception as err:  # Triton's build errors have no common class: RuntimeError, CalledProcessError, ...
            if _kernel["works"]:
                raise
            _kernel["works"] = False
            warnings.warn(f"the Triton shift kernel could not run here ({type(err).__name__}: {err}); the shift runs "
                          "as PyTorch slice copies instead: the same values, somewhat slower on the GPU",
                          RuntimeWarning, stacklevel=2)
        else:
            _kernel["works"] = True
            return out
    return slice_shift(x, shift_size, dim, dilation, sign)


class _ZeroShift(torch.autograd.Function):
    """With zero padding the shift's backward is the same shift with the offsets negated: its exact adjoint. The
    shift is linear, so its forward-mode derivative (jvp) is the shift itself; ``setup_context`` and the generated
    vmap rule let ``torch.func`` (grad, vmap, jvp: per-sample gradients) run it as it runs the plain shift."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, shift_size: int, dim: int, dilation: int) -> Tensor:
        return zero_shift(x, shift_size, dim, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.config = tuple(inputs[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return zero_shift(grad, *ctx.config, sign=-1), None, None, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, *_) -> Tensor:
        return zero_shift(tangent, *ctx.config)


def _exporting() -> bool:
    """Whether torch.export is tracing this call. ``torch.compiler.is_exporting`` is new in torch 2.6 (and False in
    the ONNX exporter's tracing before 2.7); before it the export gets the slice copies, which are correct, only
    slow to export."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


@torch.fx.wrap  # a leaf for FX tracing, as shift.axial_shift is in block.py: it branches on the device
def axial_shift(x: Tensor, shift_size: int, dim: int, dilation: int = 1, padding: str = "zeros") -> Tensor:
    """:func:`shift.axial_shift`, under its name, so FX graph node names stay the same with the switch on or off.

    Zero padding runs :func:`zero_shift`, through :class:`_ZeroShift` where autograd needs it. Other paddings, and
    torch.export (which ONNX export uses), take shift.axial_shift's pad and concat: slice copies into a tensor
    export as ScatterND over index ranges, several ONNX nodes a group, which onnxscript's optimiser is slow to
    simplify, where pad, slices and a concat export as the three ONNX ops of those names.
    """
    if padding != "zeros" or _exporting():
        return shift.axial_shift(x, shift_size, dim, dilation, padding)
    shift.check_shift_args(shift_size, dilation, padding)  # the checks shift.axial_shift makes, with its messages
    axis = shift._spatial_dim(x, dim)
    if x.shape[1] == 0:
        return x.clone()
    if torch.is_grad_enabled() and x.requires_grad:
        return _ZeroShift.apply(x, shift_size, axis, dilation)
    return zero_shift(x, shift_size, axis, dilation)  # inference: skip autograd.Function's overhead


class FastAxialShiftMix(AxialShiftMix):
    """:class:`AxialShiftMix` whose shifts run this module's :func:`axial_shift`."""

    def shift(self, z: Tensor, dim: int) -> Tensor:
        return axial_shift(z, self.shift_size, dim, self.dilation, self.padding)


# ---------------------------------------------------------------- batch pieces in CPU inference
PIECE_BYTES = 16 * 2**20


def inference_pieces(x: Tensor, hidden: int) -> int:
    """Into how many pieces CPU inference cuts a batch so that each piece's MLP hidden layer (b, hidden, h, w)
    holds at most ``PIECE_BYTES`` (16 MiB); 1 (no cut) with autograd, on other devices, and under FX or
    torch.export tracing.

    Blocks treat the images of a batch independently (GroupNorm(1, c) normalises each image on its own), so the
    pieces give the same result. They are faster because glibc's malloc serves blocks above 32 MiB with fresh
    ``mmap`` pages that the kernel zero-fills on first touch, every time; smaller blocks are reused.
    """
    if (isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.is_grad_enabled()
            or x.device.type != "cpu"):
        return 1
    b, _, h, w = x.shape
    return min(b, -(-b * hidden * h * w * x.element_size() // PIECE_BYTES))


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook, of ``module``, of a module inside it or of every module, would see the call."""
    from torch.nn.modules import module as hooks
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class FastASMLPStage(ASMLPStage):
    """:class:`ASMLPStage` whose CPU inference (eval mode) runs the blocks on :func:`inference_pieces` of the batch,
    unless a forward hook is on a block or inside one: it runs once, with the whole batch, as on the plain model.
    In train mode without autograd (an EMA teacher) the whole batch draws its drop-path masks, as the plain one."""

    def forward_blocks(self, x: Tensor) -> Tensor:
        pieces = 1 if self.training else inference_pieces(x, self.blocks[0].mlp.fc1.out_channels)
        if pieces > 1 and not _hooked(self.blocks):
            return torch.cat([self.run_blocks(piece) for piece in x.tensor_split(pieces)])
        return self.run_blocks(x)


# ---------------------------------------------------------------- the switch
FAST = {nn.GroupNorm: GroupNorm1, nn.GELU: GELU, PatchEmbed: FastPatchEmbed, PatchMerging: FastPatchMerging,
        ASMLPStage: FastASMLPStage, AxialShiftMix: FastAxialShiftMix}
PLAIN = {fast: plain for plain, fast in FAST.items()}


# torch.fx traces into modules defined outside torch.nn, so the twins of nn.GELU and nn.GroupNorm would add nodes
# of their own: create_feature_extractor(model, nodes, tracer_kwargs={"leaf_modules": list(FX_LEAF_MODULES)}) keeps
# the plain model's node names (and what each name returns).
FX_LEAF_MODULES = (GELU, GroupNorm1)


def _has_fast_twin(module: nn.Module) -> bool:
    """Only modules the fast classes compute exactly: one-group norms with weights, exact GELU."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == 1 and module.affine
    return not isinstance(module, nn.GELU) or module.approximate == "none"


def enable(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every module of ``model`` to its fast class (``on``) or back to the plain one, in place; returns
    ``model``. Only exact plain classes are switched (a subclass keeps its own forward)."""
    for module in model.modules():
        if on and type(module) in FAST and _has_fast_twin(module):
            module.__class__ = FAST[type(module)]
        elif not on and type(module) in PLAIN:
            module.__class__ = PLAIN[type(module)]
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a fast path."""
    return any(type(module) in PLAIN for module in model.modules())
