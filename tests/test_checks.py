"""The type checks that every loader and constructor validates its numbers with."""
import numpy as np
import pytest

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
