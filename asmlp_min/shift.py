"""The axial shift (paper Sec. 3, Fig. 2 and Algorithm 1). No parameters: learning happens in block.py.

Channels are cut into contiguous groups of ``ceil(c / shift_size)`` (``torch.chunk``; the last group is
smaller when ``shift_size`` does not divide ``c``, and with few channels there are fewer than ``shift_size``
groups: c = 16, s = 5 gives four groups of 4, moved by -2..+1). Group ``k`` moves by
``(k - shift_size // 2) * dilation`` pixels along one axis; positions that fall off the border are dropped,
vacated ones are filled by ``padding``:

    Shift_W(z)[c, i, j] = z[c, i, j - o(c)],   o(c) = (c // ceil(C/s) - s // 2) * dilation

``axial_shift`` pads the axis once with ``reach = (shift_size // 2) * dilation`` pixels on each side, then takes
one window of the padded tensor per group and concatenates them: group k's window starts ``offset`` pixels before
the image, so its content lands ``offset`` pixels further on. The paper pads with zeros; the other paddings are
for ablations. ``reference_shift`` is the paper's Algorithm 1 step by step (pad -> chunk -> roll -> cat -> narrow),
the baseline of ``asmlp-min bench``. asmlp_min/fast.py computes the zero-padded shift writing each output element
once (slice copies into an empty tensor, or one CUDA kernel), tested equal to this one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("zeros", "circular", "reflect", "replicate")


def check_shift_args(shift_size: int, dilation: int = 1, padding: str = "zeros") -> None:
    """Raise a ValueError that says what is wrong with a shift configuration."""
    if isinstance(shift_size, bool) or not isinstance(shift_size, int):
        raise TypeError(f"shift_size must be an int, got {type(shift_size).__name__}")
    if shift_size < 1 or shift_size % 2 == 0:
        why = "a shift needs at least one group" if shift_size < 1 else "an even size has no centre group"
        raise ValueError(f"shift_size must be odd and >= 1 (the paper uses 5), got {shift_size}: {why}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _axis(dim: int) -> int:
    """The tensor axis of a shift along ``dim``: -1 or 3 (along w), -2 or 2 (along h)."""
    if isinstance(dim, bool) or not isinstance(dim, int):  # 3.0 == 3, but indexes nothing
        raise TypeError(f"dim must be an int, -1/3 (along w) or -2/2 (along h), got {type(dim).__name__} {dim!r}")
    if dim not in (-1, -2, 2, 3):
        raise ValueError(f"dim must be a spatial axis: -1/3 (along w) or -2/2 (along h), got {dim}")
    return dim % 4


def _spatial_dim(x: Tensor, dim: int) -> int:
    if x.dim() != 4:
        raise ValueError(f"axial_shift expects a (b, c, h, w) tensor, got shape {tuple(x.shape)}")
    return _axis(dim)


def group_offsets(channels: int, shift_size: int, dilation: int = 1) -> list[tuple[int, int, int]]:
    """``(first_channel, last_channel + 1, offset)`` for each group, as ``torch.chunk`` cuts them."""
    size = math.ceil(channels / shift_size)
    half = shift_size // 2
    return [(start, min(start + size, channels), (k - half) * dilation)
            for k, start in enumerate(range(0, channels, size))]


def axial_shift(x: Tensor, shift_size: int, dim: int, dilation: int = 1, padding: str = "zeros") -> Tensor:
    """Shift channel group k of ``x`` by ``(k - shift_size // 2) * dilation`` pixels along ``dim``.

    x: (b, c, h, w) -> (b, c, h, w). ``dim=-1`` shifts along w (left-right), ``dim=-2`` along h (top-down).
    Out of place and differentiable; ``shift_size=1``, or no channels, returns a copy of ``x``.
    """
    check_shift_args(shift_size, dilation, padding)
    axis = _spatial_dim(x, dim)
    if x.shape[1] == 0:  # no channels, no groups to move: the empty result Algorithm 1 (reference_shift) gives
        return x.clone()
    reach, n = (shift_size // 2) * dilation, x.shape[axis]
    if (padding == "reflect" and reach >= n) or (padding == "circular" and reach > n):
        raise ValueError(f"{padding} padding needs more than {reach} pixels along the axis, got {n}: use 'zeros'")
    pad = (reach, reach, 0, 0) if axis == 3 else (0, 0, reach, reach)
    padded = F.pad(x, pad, mode="constant" if padding == "zeros" else padding)
    # narrow, not padded[:, c0:c1]: torch.export in torch 2.6 and 2.7 turns that ':' over a free batch size into
    # the guard "batch != 2**63 - 1", which fails an export for any batch
    windows = [padded.narrow(1, c0, c1 - c0).narrow(axis, reach - offset, n)
               for c0, c1, offset in group_offsets(x.shape[1], shift_size, dilation)]
    return torch.cat(windows, dim=1)


def reference_shift(x: Tensor, shift_size: int, dim: int) -> Tensor:
    """Paper Algorithm 1, step by step: zero-pad, chunk channels, roll each chunk, concatenate, crop.

    x: (b, c, h, w) -> (b, c, h, w). Several full copies: the benchmark baseline.
    """
    pad = shift_size // 2
    axis = _spatial_dim(x, dim)
    _, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), "constant", 0)
    chunks = torch.chunk(x, shift_size, 1)
    rolled = [torch.roll(chunk, shift, axis) for chunk, shift in zip(chunks, range(-pad, pad + 1))]
    x = torch.cat(rolled, 1)
    x = torch.narrow(x, 2, pad, h)
    return torch.narrow(x, 3, pad, w)


class AxialShift(nn.Module):
    """Parameter-free module wrapper of :func:`axial_shift`. (b, c, h, w) -> (b, c, h, w)."""

    def __init__(self, shift_size: int, dim: int, dilation: int = 1, padding: str = "zeros"):
        super().__init__()
        check_shift_args(shift_size, dilation, padding)
        _axis(dim)
        self.shift_size, self.dim, self.dilation, self.padding = shift_size, dim, dilation, padding

    def forward(self, x: Tensor) -> Tensor:
        return axial_shift(x, self.shift_size, self.dim, self.dilation, self.padding)

    def extra_repr(self) -> str:
        return f"shift_size={self.shift_size}, dim={self.dim}, dilation={self.dilation}, padding={self.padding!r}"
