"""The AS-MLP block (paper Sec. 3.2, Fig. 1b): token mixing by axial shifts, then a channel MLP.

    x = x + DropPath(AxialShiftMix(Norm(x)))
    x = x + DropPath(Mlp(Norm(x)))

Everything runs in (b, c, h, w); every "linear layer" is a 1x1 convolution, and "Norm" is
GroupNorm(1, c) as in the official code. Parameter names match the official checkpoints.
Speed: on a channels_last tensor a 1x1 convolution is one matrix product over channels
(:func:`pointwise_conv`); the backbone keeps CPU activations channels_last for that reason.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .shift import axial_shift, check_shift_args

torch.fx.wrap("axial_shift")  # a leaf for FX tracing (create_feature_extractor): its loops are over Python ints

CONNECTIONS = ("parallel", "serial")


def norm_layer(channels: int) -> GroupNorm1:
    """The official "MyNorm": GroupNorm(1, c) takes statistics over (c, h, w) per sample, not per pixel."""
    return GroupNorm1(channels)


@torch.fx.wrap  # a leaf for FX tracing: it branches on the device and the autograd mode
def group_norm_1(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm with one group, (b, c, h, w) -> (b, c, h, w): ``F.group_norm(x, 1, ...)`` up to float rounding.

    CUDA without autograd: :func:`var_mean_group_norm`. CUDA's group_norm kernel reduces each sample in a single
    thread block, so a batch of 64 leaves half of a 132-multiprocessor GPU idle: the norm took 38% of AS-MLP-T's
    fp16 inference time on an H200, and this path raised asmlp-min bench's inference there from 3769 / 3726 to
    3942 / 3916 images/s (two runs each). With autograd its backward (several kernels) was slower than the native
    one (775 vs 1170 training images/s) and kept 13% more memory, and on CPU its reduction is 5x slower than the
    native kernel: both use ``F.group_norm``. One exception: PyTorch 2.11's CPU group_norm backward crashes
    (segmentation fault) on a channels_last input that needs no gradient when the weights do, which is the first
    norm after frozen stages (``frozen_stages`` in detection); that norm takes :func:`var_mean_group_norm` too.
    """
    grad = torch.is_grad_enabled()
    gpu_inference = x.is_cuda and not grad
    after_frozen = (grad and weight.requires_grad and not x.requires_grad and not x.is_contiguous()
                    and x.is_contiguous(memory_format=torch.channels_last))
    if gpu_inference or after_frozen:
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
    shift = bias.to(exact).view(-1, 1, 1) - mean * scale
    with torch.autocast("cuda", enabled=False):  # autocast would copy x to float32; type promotion reads it as is
        y = torch.addcmul(shift, x, scale)
    return y if torch.is_autocast_enabled("cuda") else y.to(x.dtype)


class GroupNorm1(nn.GroupNorm):
    """``nn.GroupNorm(1, c)`` (same parameters and state_dict keys) run by :func:`group_norm_1`."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(1, channels, eps)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_1(x, self.weight, self.bias, self.eps)


@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout and the autograd mode
def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1 convolution (b, c_in, h, w) -> (b, c_out, h, w), computed in the layout ``x`` is stored in.

    channels_last with autograd (training): "b c h w -> (b h w) c" is a free view, so the conv is a single GEMM
    (``F.linear``) and the result is channels_last again. Everything else, inference on channels_last included:
    ``F.conv2d``, which oneDNN runs on channels_last as the same GEMM with the bias added inside it, where
    ``F.linear`` first copies the bias into every output row: AS-MLP-T CPU inference 1.10x faster (paired
    rounds, batch 16, 2 cores). Its backward was slower (training step 0.94x), hence the split. Equal up to
    float rounding.
    """
    if torch.is_grad_enabled() and x.is_contiguous(memory_format=torch.channels_last):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout
def gelu(x: Tensor) -> Tensor:
    """GELU, exactly, into a new tensor. A channels_last ``x`` is passed as the (b, h, w, c) view in which it is
    contiguous: PyTorch's CPU GELU kernels (forward and backward) run about 1.6x slower on the channels_last
    (b, c, h, w) view of the same memory.

    Never in place, nor is any sum of the block: every module's output stays as it was returned, so forward hooks
    and ``create_feature_extractor`` see the true intermediate values. In-place GELU and sums during inference
    overwrote the outputs of the norms and 1x1 convs that those tools return; they were faster (AS-MLP-T, batch 16,
    2 cores, paired rounds on an idle machine: out of place takes 1.065x the time), but a wrong tapped feature
    costs more than 6%.
    """
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.gelu(x)


class GELU(nn.GELU):
    """``nn.GELU`` run by :func:`gelu`."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


class Conv1x1(nn.Conv2d):
    """An ``nn.Conv2d`` with a 1x1 kernel (official parameter names and shapes) run by :func:`pointwise_conv`."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv(x, self.weight, self.bias)


def conv1x1(c_in: int, c_out: int, bias: bool = True) -> Conv1x1:
    return Conv1x1(c_in, c_out, bias)


class AxialShiftMix(nn.Module):
    """Token mixing: project, shift along w and along h, project each, sum, normalise, project.

    x: (b, c, h, w) -> (b, c, h, w). Paper Eq. 3 (parallel, the default):
        z = GELU(Norm(conv1(x)))
        y = conv3(Norm(GELU(conv2_1(Shift_W(z))) + GELU(conv2_2(Shift_H(z)))))
    ``connection="serial"`` (ablation) chains the branches instead: the h-shift reads the w-branch output.
    """

    def __init__(self, dim: int, shift_size: int = 5, dilation: int = 1, padding: str = "zeros",
                 connection: str = "parallel", bias: bool = True):
        super().__init__()
        check_shift_args(shift_size, dilation, padding)
        if connection not in CONNECTIONS:
            raise ValueError(f"connection must be one of {CONNECTIONS}, got {connection!r}")
        self.shift_size, self.dilation, self.padding, self.connection = shift_size, dilation, padding, connection
        self.conv1 = conv1x1(dim, dim, bias)
        self.norm1 = norm_layer(dim)
        self.conv2_1 = conv1x1(dim, dim, bias)  # after the left-right (w) shift
        self.conv2_2 = conv1x1(dim, dim, bias)  # after the top-down (h) shift
        self.norm2 = norm_layer(dim)
        self.conv3 = conv1x1(dim, dim, bias)
        self.actn = GELU()

    def shift(self, z: Tensor, dim: int) -> Tensor:
        return axial_shift(z, self.shift_size, dim, self.dilation, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        z = self.actn(self.norm1(self.conv1(x)))
        z_lr = self.actn(self.conv2_1(self.shift(z, -1)))
        if self.connection == "parallel":
            z_td = self.actn(self.conv2_2(self.shift(z, -2)))
            mixed = z_lr + z_td                                # Eq. 3: the two axes are summed
        else:
            mixed = self.actn(self.conv2_2(self.shift(z_lr, -2)))
        return self.conv3(self.norm2(mixed))


class Mlp(nn.Module):
    """Channel MLP: 1x1 conv c -> ratio*c, GELU, 1x1 conv back. (b, c, h, w) -> (b, c, h, w)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = conv1x1(dim, hidden)
        self.act = GELU()
        self.fc2 = conv1x1(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability p, rescale the rest."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """(b, ...) -> (b, ...): in training each sample is kept with probability 1 - p and divided by it."""
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ASMLPBlock(nn.Module):
    """One AS-MLP block, pre-norm residual as in Swin. (b, c, h, w) -> (b, c, h, w).

    Parameters: 12 c^2 + 17 c (four c x c projections in the mix, 8 c^2 in the MLP, norms and biases).
    """

    def __init__(self, dim: int, shift_size: int = 5, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 drop: float = 0.0, dilation: int = 1, padding: str = "zeros", connection: str = "parallel"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.axial_shift = AxialShiftMix(dim, shift_size, dilation, padding, connection)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.axial_shift(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
