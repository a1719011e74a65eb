"""The AS-MLP block against a functional transcription of the official equations."""
import pytest
import torch
import torch.nn.functional as F

from asmlp_min import fast
from asmlp_min.block import ASMLPBlock, AxialShiftMix, DropPath, Mlp
from tests.test_shift import algorithm1


def functional_mix(p, x, shift_size, prefix="", dilation=1, padding="zeros"):
    """Official AxialShift forward from its weights: conv1, GN, GELU, w/h shifts, conv2_1/conv2_2, GELU, sum, GN,
    conv3."""
    def conv(name, t):
        return F.conv2d(t, p[f"{prefix}{name}.weight"], p.get(f"{prefix}{name}.bias"))

    def gn(name, t):
        return F.group_norm(t, 1, p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"], eps=1e-5)

    z = F.gelu(gn("norm1", conv("conv1", x)))
    lr = F.gelu(conv("conv2_1", algorithm1(z, shift_size, 3, dilation, padding)))
    td = F.gelu(conv("conv2_2", algorithm1(z, shift_size, 2, dilation, padding)))
    return conv("conv3", gn("norm2", lr + td))


def functional_block(p, x, shift_size, **shift_options):
    def gn(name, t):
        return F.group_norm(t, 1, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    x = x + functional_mix(p, gn("norm1", x), shift_size, "axial_shift.", **shift_options)
    hidden = F.gelu(F.conv2d(gn("norm2", x), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return x + F.conv2d(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def randomise(module):
    """Non-trivial norm affines too, so a swapped norm would show up."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return module


@pytest.mark.parametrize("dim,shift_size,options", [(16, 5, {}), (13, 3, {}), (8, 7, {}),
                                                     (16, 5, dict(dilation=2)), (13, 3, dict(padding="circular")),
                                                     (12, 3, dict(dilation=2, padding="replicate"))])
@pytest.mark.parametrize("quick", [False, True], ids=["plain", "fast"])
def test_block_matches_functional_transcription(dim, shift_size, options, quick):
    block = randomise(ASMLPBlock(dim, shift_size, **options)).eval()
    if quick:
        assert fast.is_enabled(fast.enable(block))
    x = torch.randn(2, dim, 9, 6)
    want = functional_block(dict(block.named_parameters()), x, shift_size, **options)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_parameter_names_are_official():
    names = [n for n, _ in ASMLPBlock(8).named_parameters()]
    assert names == [
        "norm1.weight", "norm1.bias",
        "axial_shift.conv1.weight", "axial_shift.conv1.bias", "axial_shift.norm1.weight", "axial_shift.norm1.bias",
        "axial_shift.conv2_1.weight", "axial_shift.conv2_1.bias", "axial_shift.conv2_2.weight",
        "axial_shift.conv2_2.bias", "axial_shift.norm2.weight", "axial_shift.norm2.bias",
        "axial_shift.conv3.weight", "axial_shift.conv3.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


@pytest.mark.parametrize("d", [8, 96, 768])
def test_parameter_count_is_12d2_plus_17d(d):
    assert sum(p.numel() for p in ASMLPBlock(d).parameters()) == 12 * d * d + 17 * d


def test_serial_connection_chains_the_branches():
    mix = randomise(AxialShiftMix(6, 3, connection="serial"))
    p = dict(mix.named_parameters())
    x = torch.randn(1, 6, 5, 5)
    z = F.gelu(F.group_norm(F.conv2d(x, p["conv1.weight"], p["conv1.bias"]), 1, p["norm1.weight"], p["norm1.bias"]))
    lr = F.gelu(F.conv2d(algorithm1(z, 3, 3), p["conv2_1.weight"], p["conv2_1.bias"]))
    td = F.gelu(F.conv2d(algorithm1(lr, 3, 2), p["conv2_2.weight"], p["conv2_2.bias"]))
    want = F.conv2d(F.group_norm(td, 1, p["norm2.weight"], p["norm2.bias"]), p["conv3.weight"], p["conv3.bias"])
    torch.testing.assert_close(mix(x), want, rtol=1e-5, atol=1e-5)
    parallel = AxialShiftMix(6, 3)
    parallel.load_state_dict(mix.state_dict())
    assert not torch.allclose(parallel(x), mix(x))


def test_mlp_is_two_1x1_convs_with_ratio_4():
    mlp = Mlp(10)
    assert mlp.fc1.weight.shape == (40, 10, 1, 1) and mlp.fc2.weight.shape == (10, 40, 1, 1)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    out = drop(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # all-or-nothing, rescaled by 1/(1-p)
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(drop.eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="connection must be one of"):
        ASMLPBlock(8, connection="sequential")
    with pytest.raises(ValueError, match="shift_size must be odd"):
        ASMLPBlock(8, shift_size=4)
    with pytest.raises(ValueError, match="padding must be one of"):
        ASMLPBlock(8, padding="same")
    with pytest.raises(ValueError, match="drop path probability"):
        DropPath(1.0)
    with pytest.raises(ValueError, match=r"mlp_ratio 0.1 leaves int\(dim \* mlp_ratio\) = 0 hidden channels for dim 4"):
        ASMLPBlock(4, mlp_ratio=0.1)                  # built, then failed at the first forward inside torch


class DropSample(torch.nn.Module):
    """A drop path whose draw is fixed: sample 0 dropped, sample 1 kept (and rescaled by 1 / (1 - 0.5))."""

    def forward(self, x):
        return x * torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)


def test_drop_path_in_training_drops_both_residual_branches_of_a_sample():
    block = randomise(ASMLPBlock(8, 3, drop_path=0.5)).train()
    block.drop_path = DropSample()
    x = torch.randn(2, 8, 5, 7)
    out = block(x)
    assert torch.equal(out[0], x[0])                 # both branches dropped: the input passes unchanged
    p = dict(block.named_parameters())

    def gn(name, t):
        return F.group_norm(t, 1, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    y = x[1:] + 2 * functional_mix(p, gn("norm1", x[1:]), 3, "axial_shift.")
    mlp = F.conv2d(F.gelu(F.conv2d(gn("norm2", y), p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                   p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    torch.testing.assert_close(out[1:], y + 2 * mlp, rtol=1e-5, atol=1e-5)
