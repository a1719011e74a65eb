"""Parameter and MAC counts against the paper, measured and by formula; `asmlp-min info`."""
import pytest
import torch

from asmlp_min.backbone import create_model
from asmlp_min.cli import main
from asmlp_min.complexity import analytic_gmacs, count_gmacs, count_params, stage_resolutions

# Official code's analytic GMACs at 224^2 (PAPER.md Sec. 3; README rounds them to 4.4 / 8.5 / 15.2).
OFFICIAL = {"asmlp_tiny": 4.36, "asmlp_small": 8.52, "asmlp_base": 15.14}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_measured_gmacs_within_one_percent_of_paper(name):
    gmacs = count_gmacs(create_model(name))
    assert abs(gmacs - OFFICIAL[name]) / OFFICIAL[name] < 0.01


def test_an_int_image_size_is_a_square_rgb_input():
    model = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1))
    assert count_gmacs(model, 64) == count_gmacs(model, (3, 64, 64)) < count_gmacs(model, (3, 64, 96))


@pytest.mark.parametrize("name,want", [("asmlp_tiny", 4.359), ("asmlp_small", 8.525), ("asmlp_base", 15.143)])
def test_analytic_formula_reproduces_official_flops_method(name, want):
    assert round(analytic_gmacs(name), 3) == want


def test_one_block_macs_by_hand():
    """12 N d^2 for the six d x d-equivalent 1x1 convs of one block (N tokens), no MACs in the shift."""
    from asmlp_min.block import ASMLPBlock
    d, h, w = 16, 8, 6
    block = ASMLPBlock(d)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        block(torch.zeros(1, d, h, w))
    assert counter.get_total_flops() / 2 == 12 * h * w * d * d


def test_count_params_trainable_only():
    model = create_model("asmlp_mobile", num_classes=10)
    model.patch_embed.requires_grad_(False)
    frozen = sum(p.numel() for p in model.patch_embed.parameters())
    assert count_params(model) - count_params(model, trainable_only=True) == frozen


def test_stage_resolutions_round_up():
    assert stage_resolutions(224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert stage_resolutions((97, 131)) == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_info_command_prints_table_beside_paper(capsys):
    assert main(["info", "asmlp_tiny"]) == 0
    out = capsys.readouterr().out
    assert "28,282,696" in out and "| 4.4 |" in out and "| 4.359 |" in out and "(768, 7, 7)" in out


def test_analytic_gmacs_of_a_model_instead_of_a_name_says_what_to_call():
    from asmlp_min.backbone import create_model
    with pytest.raises(ValueError, match=r"takes a variant name, one of \['asmlp_base'.*got 'ASMLP'; "
                                         r"count_gmacs\(model\)"):
        analytic_gmacs(create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1)))
