"""Exact references shared by the integer-kernel tests: rounding of Python fractions."""

from __future__ import annotations

import math
from fractions import Fraction


def ref_round(v: Fraction, rounding: str) -> int:
    """R(v) exactly: floor, half_up (floor(v + 1/2)) or half_even."""
    if rounding == "floor":
        return math.floor(v)
    if rounding == "half_up":
        return math.floor(v + Fraction(1, 2))
    return round(v)  # Fraction rounds half to even
