"""Type checks shared by the constructors and loaders that validate their arguments.

Python's ``bool`` is an ``int`` (``True == 1``), but it is never meant as a size, a count or a coordinate, so
both checks leave it out.
"""
from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An int that is not a bool (JSON's ``true`` loads as a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value) -> bool:
    """An int >= 1 that is not a bool."""
    return is_int(value) and value >= 1


def is_finite_number(value) -> bool:
    """A finite real number that is not a bool: Python's int and float, and numpy's scalars too."""
    if type(value) in (int, float):  # JSON's numbers, millions of them in a COCO file: no ABC check
        return math.isfinite(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class InputWarning(UserWarning):
    """A warning about the data given (a skipped box, pixels outside the expected range): its own category, so that
    ``warnings.simplefilter("error", InputWarning)`` makes them errors, and the notebooks, which hide other
    libraries' warnings, keep these on."""
