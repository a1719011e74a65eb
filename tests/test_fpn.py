"""FPN neck: torchvision's FeaturePyramidNetwork (+ extra blocks) is the oracle, with copied weights."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from asmlp_min.backbone import create_model
from asmlp_min.fpn import FPN


def torchvision_twin(fpn: FPN) -> FeaturePyramidNetwork:
    """torchvision's FPN with the same extra levels and ``fpn``'s weights copied in by name."""
    if fpn.extra_block == "conv":  # P6, P7 from P5 (torchvision uses P5 when in == out channels)
        extra = LastLevelP6P7(fpn.out_channels, fpn.out_channels)
    else:
        extra = LastLevelMaxPool() if fpn.extra_levels else None
    ref = FeaturePyramidNetwork(list(fpn.in_channels), fpn.out_channels, extra_blocks=extra)
    state = {}
    for i in range(len(fpn.in_channels)):
        for kind in ("weight", "bias"):
            state[f"inner_blocks.{i}.0.{kind}"] = getattr(fpn.lateral_convs[i], kind)
            state[f"layer_blocks.{i}.0.{kind}"] = getattr(fpn.output_convs[i], kind)
            if fpn.extra_block == "conv" and i < 2:
                state[f"extra_blocks.p{6 + i}.{kind}"] = getattr(fpn.extra_convs[i], kind)
    ref.load_state_dict(state, strict=True)
    return ref


def backbone_feats(size=(70, 90)):
    torch.manual_seed(0)
    backbone = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), features_only=True).eval()
    with torch.no_grad():
        return backbone(torch.randn(2, 3, *size))


@pytest.mark.parametrize("extra_levels, extra_block", [(0, "maxpool"), (1, "maxpool"), (2, "conv")])
def test_fpn_equals_torchvision_with_copied_weights(extra_levels, extra_block):
    feats = backbone_feats()  # 70x90 input: odd map sizes (18x23, 9x12, 5x6, 3x3) exercise the "size=" upsampling
    torch.manual_seed(1)
    fpn = FPN([8, 16, 32, 64], out_channels=16, extra_levels=extra_levels, extra_block=extra_block).eval()
    ref = torchvision_twin(fpn).eval()
    with torch.no_grad():
        mine = fpn(feats)
        theirs = list(ref(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
    assert len(mine) == len(theirs) == 4 + extra_levels
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_top_down_pathway_by_hand():
    """Identity laterals and output convs: P_fine = C_fine + nearest 2x upsampling of C_coarse."""
    fpn = FPN([1, 1], out_channels=1)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
    fine = torch.zeros(1, 1, 4, 4)
    coarse = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    p_fine, p_coarse = fpn([fine, coarse])
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    assert torch.equal(p_fine[0, 0], expected)
    assert torch.equal(p_coarse, coarse)


def test_strides_and_channels_on_the_backbone():
    """The paper's neck: C2-C5 at strides 4-32 -> 5 maps of 256 channels, the last at stride 64."""
    feats = backbone_feats(size=(128, 192))
    pyramid = FPN([8, 16, 32, 64], out_channels=256, extra_levels=1)(feats)
    assert [tuple(p.shape) for p in pyramid] == [(2, 256, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="in_channels"):
        FPN([])
    with pytest.raises(ValueError, match="extra_block"):
        FPN([8], extra_levels=1, extra_block="avgpool")
    with pytest.raises(ValueError, match="extra_levels"):
        FPN([8], extra_levels=-1)
    with pytest.raises(ValueError, match="built for 2 input maps, got 1"):
        FPN([8, 16])([torch.zeros(1, 8, 4, 4)])
