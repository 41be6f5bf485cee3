"""Property-based tests (hypothesis) of integer/fixed_point.py: Grid.quantize (float32 and float64)
and round_to_integer against the Python-integer reference of tests/exact.py, ties and half-up,
the rounding reference itself, Grid.range / max_abs, int_dtype.

NumPy only (no TensorFlow import here, directly or through the modules imported)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from exact import (
    MEDIUM,
    ROUNDINGS,
    check_quantizer_output,
    exact,
    pow2,
    quant_cases,
    ref_range,
    ref_round,
    round_to_float,
)
from hypothesis import given
from hypothesis import strategies as st

from integer import fixed_point


@MEDIUM
@given(case=quant_cases(dtypes=(np.float32,)))
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # x = float32 max
def test_grid_quantize_matches_the_integer_reference(case):
    """fixed_point.Grid.quantize returns the integers q (float32) the TF op's y encodes."""
    grid = fixed_point.Grid(case.bits, case.signed, case.f)
    q = grid.quantize(case.x, case.rounding)
    assert q.dtype == np.float32 and q.shape == case.x.shape
    y = np.ldexp(q.astype(np.float64), -np.broadcast_to(case.f, q.shape)).astype(np.float32)
    check_quantizer_output(case, y)
    np.testing.assert_array_equal(grid.quantize(y, case.rounding), q)  # idempotent


@MEDIUM
@given(case=quant_cases(dtypes=(np.float64,)))
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # x = float64 max
def test_grid_quantize_in_float64_matches_the_integer_reference(case):
    """Grid.quantize(x, rounding, np.float64), as calibration's MSE search runs it: float64 inputs
    keep all their bits (no trip through float32) and half_up is the floor of the float64 sum."""
    grid = fixed_point.Grid(case.bits, case.signed, case.f)
    q = grid.quantize(case.x, case.rounding, np.float64)
    assert q.dtype == np.float64 and q.shape == case.x.shape
    y = np.ldexp(q, -np.broadcast_to(case.f, q.shape))
    check_quantizer_output(case, y)
    np.testing.assert_array_equal(grid.quantize(y, case.rounding, np.float64), q)  # idempotent


def rounding_inputs(dtype) -> st.SearchStrategy[float]:
    """Values of dtype to round: ties k + 1/2 and their neighbours up to where floats stop
    having fractions (2^nmant), 1/2 - ulp/2, any finite value; no subnormals (the reference's
    round_to_float models normal numbers)."""
    nmant = np.finfo(dtype).nmant
    k = st.one_of(st.integers(-40, 40), st.integers(-(2 ** (nmant + 1)), 2 ** (nmant + 1)))
    below_half = float(np.nextafter(dtype(0.5), dtype(0)))
    top = float(2**nmant)
    return st.one_of(
        k.map(lambda i: float(dtype(i + 0.5))),
        st.tuples(k, st.sampled_from([-1, 1])).map(
            lambda t: float(np.nextafter(dtype(t[0] + 0.5), dtype(t[1] * np.inf)))),
        st.sampled_from([0.0, -0.0, below_half, -below_half, top - 0.5, top, top + 1, -top + 0.5]),
        st.floats(-8, 8, width=8 * np.dtype(dtype).itemsize),
        st.floats(allow_nan=False, allow_infinity=False, width=8 * np.dtype(dtype).itemsize),
    ).filter(lambda v: v == 0 or abs(v) >= np.finfo(dtype).tiny)


@MEDIUM
@given(dtype=st.sampled_from([np.float32, np.float64]), rounding=st.sampled_from(ROUNDINGS), data=st.data())
def test_round_to_integer_matches_the_integer_reference(dtype, rounding, data):
    """fixed_point.round_to_integer: R(v) in place, in v's type, equal to the Python-integer
    reference (half_up as the floor of v + 1/2 rounded once to v's type)."""
    values = data.draw(st.lists(rounding_inputs(dtype), min_size=1, max_size=40))
    v = np.array(values, dtype)
    out = fixed_point.round_to_integer(v, rounding)
    assert out is v and out.dtype == dtype
    expected = [ref_round(exact(dtype(a)), rounding, half_up_in=dtype) for a in values]
    got = [exact(r) for r in out]
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, [(values[i], got[i], expected[i]) for i in bad[:4]]


def test_rounding_reference_on_ties():
    """The reference itself: ties go to even / up / down, negative ties included."""
    ties = [Fraction(k, 2) for k in (-5, -3, -1, 1, 3, 5)]
    assert [ref_round(v, "half_even") for v in ties] == [-2, -2, 0, 0, 2, 2]
    assert [ref_round(v, "half_up") for v in ties] == [-2, -1, 0, 1, 2, 3]
    assert [ref_round(v, "floor") for v in ties] == [-3, -2, -1, 0, 1, 2]
    assert round_to_float(Fraction(1) - pow2(-25), np.float32) == 1  # the tie goes to even
    assert round_to_float(Fraction(1) - pow2(-24), np.float32) == Fraction(1) - pow2(-24)


def test_grid_range_and_max_abs():
    """Grid.range is [n, p] and Grid.max_abs = max(-n, p) (2^(b-1) signed, 2^b - 1 unsigned)."""
    for bits in range(2, 17):
        for signed in (True, False):
            grid = fixed_point.Grid(bits, signed, np.array(0))
            n, p = ref_range(bits, signed)
            assert grid.range == (n, p) == fixed_point.integer_range(bits, signed)
            assert grid.max_abs == max(-n, p)


def test_grid_quantize_rounds_float64_inputs_through_float32():
    """Grid.quantize computes in float32, as the TF graph's float32 activations are: a float64
    input first rounds to float32 (0.5 + 2^-30 becomes the tie 0.5, which half_even rounds to 0)."""
    grid = fixed_point.Grid(8, True, np.array(0))
    q = grid.quantize(np.array([0.5 + 2.0**-30, 1.5 + 2.0**-30]), "half_even")
    assert q.dtype == np.float32 and q.tolist() == [0.0, 2.0]


def test_int_dtype_is_the_smallest_that_holds_the_range():
    order = {True: ["int8", "int16", "int32", "int64"], False: ["uint8", "uint16", "uint32", "uint64"]}
    for bits in range(2, 65):
        for signed in (True, False):
            dt = fixed_point.int_dtype(bits, signed)
            n, p = ref_range(bits, signed)
            assert np.iinfo(dt).min <= n and np.iinfo(dt).max >= p
            smaller = order[signed][: order[signed].index(dt.name)]
            assert all(np.iinfo(s).min > n or np.iinfo(s).max < p for s in smaller)
