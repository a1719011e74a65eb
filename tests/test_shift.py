"""The axial shift against an independent transcription of the paper's Algorithm 1 and a hand-worked example."""
import pytest
import torch
import torch.nn.functional as F

from asmlp_min.shift import AxialShift, axial_shift, reference_shift


def algorithm1(x, shift_size, dim, dilation=1, padding="zeros"):
    """Paper Algorithm 1, transcribed for this test only: pad, chunk, roll, cat, narrow (dim 3 = w, 2 = h).

    Dilation d pads d times as far and rolls group k by (k - shift_size // 2) * d; ``padding`` is F.pad's mode
    (the paper's is zeros). No roll reaches past the padding, so nothing wraps into the cropped image."""
    b, c, h, w = x.shape
    half = shift_size // 2
    pad = half * dilation
    x = F.pad(x, (pad, pad, pad, pad), "constant" if padding == "zeros" else padding)
    xs = torch.chunk(x, shift_size, 1)
    x_shift = [torch.roll(x_c, shift * dilation, dim) for x_c, shift in zip(xs, range(-half, half + 1))]
    x_cat = torch.cat(x_shift, 1)
    x_cat = torch.narrow(x_cat, 2, pad, h)
    return torch.narrow(x_cat, 3, pad, w)


AXES = [(-1, 3), (-2, 2)]  # (our dim, Algorithm 1's dim)


@pytest.mark.parametrize("channels", [3, 96, 97, 768])
@pytest.mark.parametrize("shift_size", [1, 3, 5, 7])
@pytest.mark.parametrize("dims", AXES)
@pytest.mark.parametrize("hw", [(7, 11), (2, 3), (1, 1)])  # non-square; smaller than the shift reach
def test_forward_equals_algorithm1_bit_for_bit(channels, shift_size, dims, hw):
    x = torch.randn(2, channels, *hw)
    ours, theirs = dims
    assert torch.equal(axial_shift(x, shift_size, ours), algorithm1(x, shift_size, theirs))


@pytest.mark.parametrize("channels", [3, 97])
@pytest.mark.parametrize("shift_size", [3, 5, 7])
@pytest.mark.parametrize("dims", AXES)
def test_backward_equals_algorithm1_bit_for_bit(channels, shift_size, dims):
    x = torch.randn(2, channels, 6, 9, requires_grad=True)
    grad_out = torch.randn(2, channels, 6, 9)
    ours, theirs = dims
    (g_ours,) = torch.autograd.grad(axial_shift(x, shift_size, ours), x, grad_out)
    (g_ref,) = torch.autograd.grad(algorithm1(x, shift_size, theirs), x, grad_out)
    assert torch.equal(g_ours, g_ref)


@pytest.mark.parametrize("dims", AXES)
def test_reference_shift_is_algorithm1(dims):
    x = torch.randn(1, 10, 5, 8)
    assert torch.equal(reference_shift(x, 5, dims[0]), algorithm1(x, 5, dims[1]))


def test_paper_figure_2b_by_hand():
    """C=3, W=5, shift size 3: channel groups move by -1, 0, +1; vacated pixels are 0 (zero padding)."""
    ramp = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).expand(1, 3, 1, 5)
    expected = torch.tensor([[2.0, 3.0, 4.0, 5.0, 0.0],    # group 0 moved left by 1
                             [1.0, 2.0, 3.0, 4.0, 5.0],    # group 1 stays
                             [0.0, 1.0, 2.0, 3.0, 4.0]])   # group 2 moved right by 1
    assert torch.equal(axial_shift(ramp, 3, dim=-1)[0, :, 0], expected)
    assert torch.equal(axial_shift(ramp.transpose(2, 3), 3, dim=-2)[0, :, :, 0], expected)


def test_uneven_groups_follow_torch_chunk():
    """C=96, s=5: groups of 20,20,20,20,16 (ceil(96/5)=20), moved by -2..+2; C=7, s=5 has only 4 groups."""
    x = torch.arange(9.0).expand(1, 96, 1, 9)
    out = axial_shift(x, 5, dim=-1)[0, :, 0, 4]  # centre pixel: value 4 - offset
    want = torch.tensor([6.0] * 20 + [5.0] * 20 + [4.0] * 20 + [3.0] * 20 + [2.0] * 16)
    assert torch.equal(out, want)
    out7 = axial_shift(torch.arange(9.0).expand(1, 7, 1, 9), 5, dim=-1)[0, :, 0, 4]
    assert torch.equal(out7, torch.tensor([6.0, 6.0, 5.0, 5.0, 4.0, 4.0, 3.0]))


@pytest.mark.parametrize("padding", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("dims", AXES)
def test_dilated_and_padded_shift_equals_algorithm1(padding, dilation, dims):
    """The ablations' shifts, forward and backward, against Algorithm 1 with that padding and reach."""
    x = torch.randn(2, 11, 6, 9, requires_grad=True)
    grad_out = torch.randn(2, 11, 6, 9)
    out, want = axial_shift(x, 5, dims[0], dilation, padding), algorithm1(x, 5, dims[1], dilation, padding)
    assert torch.equal(out, want)
    assert torch.equal(torch.autograd.grad(out, x, grad_out)[0], torch.autograd.grad(want, x, grad_out)[0])


def test_dilation_scales_offsets():
    x = torch.arange(11.0).expand(1, 3, 1, 11)
    out = axial_shift(x, 3, dim=-1, dilation=2)[0, :, 0, 5]
    assert torch.equal(out, torch.tensor([7.0, 5.0, 3.0]))


@pytest.mark.parametrize("padding,expected_first_group", [
    ("zeros", [2.0, 3.0, 4.0, 5.0, 0.0]),
    ("circular", [2.0, 3.0, 4.0, 5.0, 1.0]),
    ("replicate", [2.0, 3.0, 4.0, 5.0, 5.0]),
    ("reflect", [2.0, 3.0, 4.0, 5.0, 4.0]),
])
def test_padding_modes_fill_the_vacated_pixel(padding, expected_first_group):
    ramp = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).expand(1, 3, 1, 5)
    out = axial_shift(ramp, 3, dim=-1, padding=padding)[0, :, 0]
    assert torch.equal(out[0], torch.tensor(expected_first_group))
    assert torch.equal(out[1], ramp[0, 1, 0])


def test_shift_size_one_is_identity_and_out_of_place():
    x = torch.randn(2, 5, 4, 4)
    y = axial_shift(x, 1, dim=-1)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
@pytest.mark.parametrize("dim", [-1, -2])
def test_gradcheck_float64(padding, dim):
    x = torch.randn(2, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: axial_shift(t, 3, dim, dilation=1, padding=padding), (x,))
    assert torch.autograd.gradcheck(lambda t: axial_shift(t, 5, dim), (x,))


def test_input_is_not_modified():
    x = torch.randn(1, 6, 5, 5)
    before = x.clone()
    axial_shift(x, 5, dim=-2)
    assert torch.equal(x, before)


def test_channels_last_input_gives_same_values():
    x = torch.randn(2, 13, 6, 7)
    assert torch.equal(axial_shift(x.to(memory_format=torch.channels_last), 5, -1), algorithm1(x, 5, 3))


@pytest.mark.parametrize("bad", [0, 2, 4, -3])
def test_even_or_nonpositive_shift_size_is_rejected(bad):
    why = "an even size has no centre group" if bad > 0 else "a shift needs at least one group"
    with pytest.raises(ValueError, match=f"shift_size must be odd and >= 1 .*, got {bad}: {why}"):
        axial_shift(torch.zeros(1, 3, 4, 4), bad, dim=-1)
    with pytest.raises(ValueError, match="shift_size must be odd"):
        AxialShift(bad, dim=-1)


def test_other_bad_arguments_are_named():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(TypeError, match="shift_size must be an int"):
        axial_shift(x, 3.0, dim=-1)
    with pytest.raises(ValueError, match="dim must be"):
        axial_shift(x, 3, dim=1)
    with pytest.raises(ValueError, match=r"\(b, c, h, w\)"):
        axial_shift(torch.zeros(3, 4, 4), 3, dim=-1)
    with pytest.raises(ValueError, match="padding must be one of"):
        axial_shift(x, 3, dim=-1, padding="mirror")
    with pytest.raises(ValueError, match="dilation"):
        axial_shift(x, 3, dim=-1, dilation=0)
    with pytest.raises(ValueError, match="reflect padding"):
        axial_shift(torch.zeros(1, 3, 2, 2), 5, dim=-1, padding="reflect")


def test_a_float_axis_is_refused_by_name():
    with pytest.raises(TypeError, match="dim must be an int, -1/3 .* got float 3.0"):
        axial_shift(torch.zeros(1, 3, 4, 4), 3, dim=3.0)
    with pytest.raises(TypeError, match="dim must be an int"):
        AxialShift(3, dim=-1.0)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_no_channels_shift_to_the_empty_tensor_as_algorithm1_does(padding):
    """Nothing to move: chunk/roll/cat of Algorithm 1 give a (b, 0, h, w) tensor, and so does the shift."""
    x = torch.zeros(2, 0, 4, 5, requires_grad=True)
    out = axial_shift(x, 5, dim=-1, padding=padding)
    assert out.shape == (2, 0, 4, 5) and algorithm1(x, 5, 3).shape == (2, 0, 4, 5)
    out.sum().backward()
    assert x.grad.shape == (2, 0, 4, 5)
