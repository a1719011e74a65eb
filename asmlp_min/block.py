"""The AS-MLP block (paper Sec. 3.2, Fig. 1b): token mixing by axial shifts, then a channel MLP.

    x = x + DropPath(AxialShiftMix(Norm(x)))
    x = x + DropPath(Mlp(Norm(x)))

Everything runs in (b, c, h, w): every "linear layer" is a 1x1 ``nn.Conv2d``, the activation is ``nn.GELU`` and
"Norm" is ``nn.GroupNorm(1, c)``, the official "MyNorm", whose statistics are over (c, h, w) per sample, not per
pixel. Parameter names match the official checkpoints. This is the reference path: asmlp_min/fast.py swaps in
modules with the same parameters that run faster, and tests/test_fast.py checks them against these.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .shift import axial_shift, check_shift_args

torch.fx.wrap("axial_shift")  # a leaf for FX tracing (create_feature_extractor): its loops are over Python ints

CONNECTIONS = ("parallel", "serial")


class AxialShiftMix(nn.Module):
    """Token mixing: project, shift along w and along h, project each, sum, normalise, project.

    x: (b, c, h, w) -> (b, c, h, w). The paper's parallel connection (the default):
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
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=bias)
        self.norm1 = nn.GroupNorm(1, dim)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, bias=bias)  # after the left-right (w) shift
        self.conv2_2 = nn.Conv2d(dim, dim, 1, bias=bias)  # after the top-down (h) shift
        self.norm2 = nn.GroupNorm(1, dim)
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=bias)
        self.actn = nn.GELU()

    def shift(self, z: Tensor, dim: int) -> Tensor:
        return axial_shift(z, self.shift_size, dim, self.dilation, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        z = self.actn(self.norm1(self.conv1(x)))
        z_lr = self.actn(self.conv2_1(self.shift(z, -1)))
        if self.connection == "parallel":
            z_td = self.actn(self.conv2_2(self.shift(z, -2)))
            mixed = z_lr + z_td                                # parallel: the two axes are summed
        else:
            mixed = self.actn(self.conv2_2(self.shift(z_lr, -2)))
        return self.conv3(self.norm2(mixed))


class Mlp(nn.Module):
    """Channel MLP: 1x1 conv c -> ratio*c, GELU, 1x1 conv back. (b, c, h, w) -> (b, c, h, w)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:  # torch would refuse it only at the first forward call
            raise ValueError(f"mlp_ratio {mlp_ratio!r} leaves int(dim * mlp_ratio) = {hidden} hidden channels for dim "
                             f"{dim}; it needs at least 1 (the paper uses 4)")
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
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

    Parameters at the default mlp_ratio 4: 12 c^2 + 17 c (four c x c projections in the mix, 8 c^2 in the MLP,
    norms and biases).
    """

    def __init__(self, dim: int, shift_size: int = 5, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 drop: float = 0.0, dilation: int = 1, padding: str = "zeros", connection: str = "parallel"):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.axial_shift = AxialShiftMix(dim, shift_size, dilation, padding, connection)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.axial_shift(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
