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


def norm_layer(channels: int) -> nn.GroupNorm:
    """The official "MyNorm": GroupNorm(1, c) takes statistics over (c, h, w) per sample, not per pixel."""
    return nn.GroupNorm(1, channels)


@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout
def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1 convolution (b, c_in, h, w) -> (b, c_out, h, w), computed in the layout ``x`` is stored in.

    channels_last: "b c h w -> (b h w) c" is a free view, so the conv is a single GEMM (``F.linear``) and the
    result is channels_last again. Other layouts: ``F.conv2d``. Equal up to float rounding.
    """
    if x.is_contiguous(memory_format=torch.channels_last):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


@torch.fx.wrap  # a leaf for FX tracing: it branches on the memory layout and the autograd mode
def gelu(x: Tensor) -> Tensor:
    """GELU, exactly. Two CPU speed-ups that change no value:

    * a channels_last ``x`` is passed as the (b, h, w, c) view in which it is contiguous: PyTorch's GELU kernels
      (forward and backward) run about 1.6x slower on the channels_last (b, c, h, w) view of the same memory;
    * without autograd (inference) ``x``, a fresh intermediate, is overwritten: no new tensor, which spares
      mapping fresh pages for the 4c-wide hidden layer of every block.
    """
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    values = x.permute(0, 2, 3, 1) if channels_last else x
    values = F.gelu(values) if torch.is_grad_enabled() else torch.ops.aten.gelu_(values)
    return values.permute(0, 3, 1, 2) if channels_last else values


@torch.fx.wrap  # a leaf for FX tracing: it branches on the autograd mode
def add(x: Tensor, fresh: Tensor) -> Tensor:
    """``x + fresh``; without autograd the sum is written into ``fresh``, an intermediate nobody else holds.
    Bit-identical either way (float addition commutes)."""
    return x + fresh if torch.is_grad_enabled() else fresh.add_(x)


class GELU(nn.GELU):
    """``nn.GELU`` run by :func:`gelu` (in place during inference)."""

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
            mixed = add(z_td, z_lr)                            # Eq. 3: the two axes are summed
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
        x = add(x, self.drop_path(self.axial_shift(self.norm1(x))))
        return add(x, self.drop_path(self.mlp(self.norm2(x))))
