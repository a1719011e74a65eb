"""The type checks that every loader and constructor validates its numbers with."""
import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import asmlp_min
from asmlp_min.checks import is_count, is_finite_number, is_int


@pytest.mark.parametrize("value, finite_number, integer, count", [
    (1.5, True, False, False), (3, True, True, True), (0, True, True, False), (-0.0, True, False, False),
    (True, False, False, False), (False, False, False, False),                # JSON's true/false are no numbers
    (float("nan"), False, False, False), (float("inf"), False, False, False), (-float("inf"), False, False, False),
    (np.float32(2.0), True, False, False), (np.int64(7), True, False, False), (np.float64("nan"), False, False, False),
    (None, False, False, False), ("1", False, False, False), ([1], False, False, False),
])
def test_numbers_and_what_is_not_one(value, finite_number, integer, count):
    assert (is_finite_number(value), is_int(value), is_count(value)) == (finite_number, integer, count)


def test_the_packages_warnings_are_input_warnings_which_the_notebooks_filter_keeps():
    """The notebooks hide other libraries' warnings (they would land in the stored outputs) and keep these: with a
    plain "ignore", a student's boxes in [0, 1] trained to a box loss of 0 in silence."""
    calls = {(path.name, node.lineno): ast.unparse(node.args[1]) if len(node.args) > 1 else "UserWarning"
             for path in sorted((Path(asmlp_min.__file__).parent).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"}
    machine = {where: kind for where, kind in calls.items() if kind != "InputWarning"}
    # the one warning about the machine, not the input: Triton installed but unable to build the shift kernel
    assert len(calls) >= 10 and [(name, kind) for (name, _), kind in machine.items()] == [("fast.py", "RuntimeWarning")]
    detector = asmlp_min.SimpleFPNDetector("asmlp_tiny", num_classes=3, embed_dim=8, depths=(1, 1, 1, 1),
                                           fpn_channels=16).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("ignore")                                    # the notebooks' first cell
        warnings.filterwarnings("default", category=asmlp_min.InputWarning)
        warnings.warn("another library's note", DeprecationWarning)
        boxes_in_0_1 = {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([1])}
        detector([torch.rand(3, 32, 32)], [boxes_in_0_1])
    assert [type(w.message) for w in caught] == [asmlp_min.InputWarning]
    assert "as if normalised" in str(caught[0].message)
