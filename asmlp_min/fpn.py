"""Feature Pyramid Network (Lin et al., 2017): the neck between AS-MLP and the detection heads.

    C_i (b, c_i, h_i, w_i), strides doubling -> lateral 1x1 -> top-down: L_i += nearest_up(L_{i+1})
    -> 3x3 output conv -> P_i (b, d, h_i, w_i), then optional extra coarser levels.

The paper's Mask R-CNN uses the mmdet FPN with in_channels (C, 2C, 4C, 8C), 256 output channels and five
outputs: P2-P5 plus a stride-2 max-pool of P5 (mmdet's ``num_outs=5``). FCOS and RetinaNet instead add
P6 and P7 with stride-2 3x3 convolutions. Both kinds of extra level are here, written to match
``torchvision.ops.FeaturePyramidNetwork`` with ``LastLevelMaxPool`` / ``LastLevelP6P7`` weight for weight.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

EXTRA_BLOCKS = ("maxpool", "conv")


class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling + add, 3x3 output convs, ``extra_levels`` coarser maps.

    feats: list of (b, in_channels[i], h_i, w_i), finest first, each about half the size of the one before
    -> list of len(in_channels) + extra_levels maps (b, out_channels, h_i, w_i), finest first.
    ``extra_block="maxpool"``: P6 = max_pool(P5, kernel 1, stride 2), i.e. every other pixel (Mask R-CNN).
    ``extra_block="conv"``: P6 = conv3x3/2(P5), P7 = conv3x3/2(ReLU(P6)), ... (FCOS, RetinaNet).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_levels: int = 0,
                 extra_block: str = "maxpool"):
        super().__init__()
        in_channels = tuple(in_channels)
        if min(in_channels, default=0) < 1 or out_channels < 1 or extra_levels < 0 or extra_block not in EXTRA_BLOCKS:
            raise ValueError(f"FPN needs in_channels (non-empty) and out_channels >= 1, extra_levels >= 0, extra_block "
                             f"in {EXTRA_BLOCKS}; got {in_channels}, {out_channels}, {extra_levels}, {extra_block!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.extra_levels, self.extra_block = extra_levels, extra_block
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        n_convs = extra_levels if extra_block == "conv" else 0
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(n_convs))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the init of torchvision's FPN and of mmdet's ("uniform" Kaiming, a=1)
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN was built for {len(self.in_channels)} input maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 2, -1, -1):  # coarse to fine: each level gets the semantics from above
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        pyramid = [conv(lat) for conv, lat in zip(self.output_convs, laterals)]
        if self.extra_block == "maxpool":
            for _ in range(self.extra_levels):
                pyramid.append(F.max_pool2d(pyramid[-1], kernel_size=1, stride=2))
        else:
            for k, conv in enumerate(self.extra_convs):
                pyramid.append(conv(pyramid[-1] if k == 0 else F.relu(pyramid[-1])))
        return pyramid
