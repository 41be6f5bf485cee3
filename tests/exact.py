"""Exact references shared by the tests of the integer core (quant.py's op, integer/fixed_point.py,
integer/accumulation.py, integer/matmul_engine.py, integer/export_format.py, integer/kernels.py).

NumPy only: no TensorFlow import here, so the NumPy-only tests under tests/integer/ can use it.

Every reference is written in Python integers and `fractions.Fraction` (no floating point), so
it cannot share a rounding error with the code under test: round with `ref_round`, quantize with
`ref_quantize`, accumulate with `ref_gemm`, bound with `ref_float64_exact`, serialize with
`ref_mem_word`.

The quantizer-input generators (`quant_cases`) give inputs in grid units v = x * 2^f (x = v * 2^-f
is exact: a power-of-two scaling of a normal float), concentrated where implementations go
wrong: rounding ties k + 1/2 and their float neighbours, the clip edges n, p, n - 1/2, p + 1/2,
values far outside the range, +0 and -0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# database=None: no examples saved under .hypothesis/ to replay; every run draws afresh, and a
# failure prints the example (and a @reproduce_failure blob) to rerun it.
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEDIUM = settings(FAST, max_examples=150)

ROUNDINGS = ("half_even", "half_up", "floor")
BITS = st.integers(2, 16)
# f = magnitude_bits - ceil(log2_t) with log2_t in [LOG2_T_MIN, LOG2_T_MAX] = [-24, 24] and
# 2 <= b <= 16 gives f in [-23, 40].
FRAC = st.integers(-23, 40)


# ============================================================================================
# Reference helpers: Python integers and exact rationals only
# ============================================================================================


def ref_range(bits: int, signed: bool) -> tuple[int, int]:
    """[n, p] of a b-bit grid, written independently of fixed_point.integer_range."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pow2(e: int) -> Fraction:
    """2^e exactly, for any integer e."""
    return Fraction(1 << e) if e >= 0 else Fraction(1, 1 << -e)


def exact(x) -> Fraction:
    """The exact rational value of a finite float (NumPy float32/64 included)."""
    return Fraction(float(x))  # float32 -> float64 is exact


def round_to_float(w: Fraction, dtype) -> Fraction:
    """w rounded to the nearest value of a binary float type, ties to even (IEEE 754), for
    |w| inside the type's normal range; the result as an exact rational."""
    if w == 0:
        return w
    a = abs(w)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a) is e or e - 1
    if pow2(e) > a:
        e -= 1
    ulp = pow2(e - np.finfo(dtype).nmant)
    return round(w / ulp) * ulp  # round() of a Fraction is half to even


def ref_round(v: Fraction, rounding: str, half_up_in=None) -> int:
    """R(v) exactly: "half_even" (Python's round), "half_up" floor(v + 1/2), "floor"; any other
    rounding raises ValueError.

    `half_up_in` (np.float32 / np.float64) models the graph's arithmetic instead of exact
    half-up: TF and the integer engine compute floor(v + 0.5) with v + 0.5 rounded once to that float
    type. The two differ at exactly one input per type, v = 1/2 - ulp(1/2)/2 (the sum rounds up
    to 1.0); see test_half_up_is_the_floor_of_a_float_sum.
    """
    if rounding == "half_even":
        return round(v)
    if rounding == "half_up":
        w = v + Fraction(1, 2)
        return math.floor(w if half_up_in is None else round_to_float(w, half_up_in))
    if rounding == "floor":
        return math.floor(v)
    raise ValueError(rounding)


def ref_quantize(x, f: int, bits: int, signed: bool, rounding: str, half_up_in=None) -> int:
    """q = clip(R(x * 2^f), n, p) as a Python int (x * 2^f taken exactly)."""
    n, p = ref_range(bits, signed)
    return min(max(ref_round(exact(x) * pow2(f), rounding, half_up_in), n), p)


def ref_quantize_array(x: np.ndarray, f: np.ndarray, bits: int, signed: bool, rounding: str,
                       half_up_in=None) -> np.ndarray:
    """ref_quantize elementwise; f a scalar or a vector along x's last axis. int64."""
    fs = np.broadcast_to(np.asarray(f, np.int64), x.shape)
    return np.array([ref_quantize(xi, int(fi), bits, signed, rounding, half_up_in)
                     for xi, fi in zip(x.ravel(), fs.ravel())], np.int64).reshape(x.shape)


def ref_frac_bits(log2_t: float, bits: int, signed: bool) -> int:
    """f = b - 1 - ceil(log2_t) (signed), b - ceil(log2_t) (unsigned)."""
    return (bits - 1 if signed else bits) - math.ceil(log2_t)


def ref_int32_top(dtype) -> int:
    """Largest integer <= 2^31 - 1 a float type holds: its significand has nmant + 1 bits, so
    in [2^30, 2^31) its integers are the multiples of 2^(30 - nmant) (128 for float32)."""
    step = 1 << max(30 - np.finfo(dtype).nmant, 0)
    return (1 << 31) - step


def ref_quantize_bias(b, f: int, dtype) -> int:
    """clip(round_half_even(b * 2^f), -2^31, ref_int32_top(dtype))."""
    return min(max(round(exact(b) * pow2(f)), -(1 << 31)), ref_int32_top(dtype))


def ref_gemm(qx: np.ndarray, qw: np.ndarray, qb: np.ndarray | None) -> np.ndarray:
    """acc = qx @ qw (+ qb) in int64: integer arithmetic, exact while |acc| < 2^63."""
    acc = qx.astype(np.int64) @ qw.astype(np.int64)
    return acc if qb is None else acc + qb.astype(np.int64)


def ref_float64_exact(k: int, max_x: int, max_w: int) -> bool:
    """Whether |acc| <= K max|q_x| max|q_w| + 2^31 (bias) stays below 2^53."""
    return k * max_x * max_w + (1 << 31) < (1 << 53)


def ref_float32_chunk(max_x: int, max_w: int) -> int:
    """The most terms a float32 sum of products can hold exactly, (2^24 - 1) // (max|q_x| max|q_w|):
    then every partial sum is an integer below 2^24, whatever the order (0: not even one)."""
    return ((1 << 24) - 1) // (max_x * max_w)


def ref_mem_word(value: int, bits: int) -> str:
    """One `$readmemh` line: ceil(bits/4) hex digits of the two's complement of `value`,
    sign-extended to the 4 * digits bits they hold (Python's % does the sign extension)."""
    digits = -(-bits // 4)
    return format(value % (1 << (4 * digits)), f"0{digits}x")


# ============================================================================================
# Generators of quantizer inputs
# ============================================================================================


def _neighbours(v: float, dtype) -> list[float]:
    """v as dtype and its two float neighbours."""
    c = dtype(v)
    return [float(np.nextafter(c, dtype(-np.inf))), float(c), float(np.nextafter(c, dtype(np.inf)))]


def special_grid_units(n: int, p: int, dtype) -> list[float]:
    """Grid-unit values every example includes: the clip edges and the ties at them (with their
    float neighbours), the ties around 0 (1/2 - ulp is where float half-up differs from exact
    half-up), zeros of both signs, values far outside."""
    edges = [n - 1, n - 0.5, n, n + 0.5, p - 0.5, p, p + 0.5, p + 1, -0.5, 0.5, 1.5, -1.5]
    values = [v for e in edges for v in _neighbours(e, dtype)
              if v == 0 or abs(v) >= 2**-60]  # not the subnormals beside 0: v * 2^-f would underflow
    return values + [0.0, -0.0, 2.0**20, -(2.0**20), 1e9, -1e9, 2.0**100, -(2.0**100)]


def grid_units(n: int, p: int, dtype=np.float32) -> st.SearchStrategy[float]:
    """One grid-unit value v of `dtype` (float32 values are representable in either dtype;
    float64 ones use all 53 bits, e.g. one float64 ulp beside a tie)."""
    margin = (p - n) // 4 + 2
    k = st.integers(n - 3, p + 3)
    width = 8 * np.dtype(dtype).itemsize
    return st.one_of(
        k.map(lambda i: i + 0.5),  # a tie
        k.map(float),  # an exact grid point
        st.tuples(k, st.sampled_from([-1, 1])).map(  # one ulp beside a tie
            lambda t: float(np.nextafter(dtype(t[0] + 0.5), dtype(t[1] * np.inf)))),
        st.floats(n - margin, p + margin, width=width),
        st.floats(-4, 4, width=width),
        st.floats(-(2.0**60), 2.0**60, width=width),
    ).filter(lambda v: v == 0 or abs(v) >= 2**-60)  # tiny v: v * 2^-f could underflow


@dataclass
class QuantCase:
    bits: int
    signed: bool
    rounding: str
    f: np.ndarray  # int64, [] or [C]
    dtype: type
    x: np.ndarray  # [m] (per tensor) or [m, C] (per channel), sorted along axis 0

    @property
    def log2_t(self) -> np.ndarray:
        """A log2_t giving f: ceil(log2_t) = magnitude_bits - f, with a fractional part so that
        the op's ceil is exercised."""
        magnitude = self.bits - 1 if self.signed else self.bits
        return (magnitude - self.f).astype(np.float32) - np.float32(0.375)


@st.composite
def quant_cases(draw, dtypes=(np.float32, np.float64), roundings=ROUNDINGS,
                channel_counts=(None, 1, 3)) -> QuantCase:
    """A quantizer case; channel count None is per tensor (f a scalar)."""
    bits, signed = draw(BITS), draw(st.booleans())
    rounding, dtype = draw(st.sampled_from(roundings)), draw(st.sampled_from(dtypes))
    n, p = ref_range(bits, signed)
    channels = draw(st.sampled_from(channel_counts))
    f = np.array(draw(FRAC) if channels is None else draw(st.lists(FRAC, min_size=channels,
                                                                    max_size=channels)), np.int64)
    v = special_grid_units(n, p, dtype) + draw(st.lists(grid_units(n, p, dtype), max_size=40))
    v = np.array(v, dtype)
    if channels is not None:  # every column gets every value, at its own f
        v = np.repeat(v[:, None], channels, axis=1)
    x = np.ldexp(v, -f).astype(dtype)  # exact: |v| * 2^-f stays normal
    assert all(exact(a) == exact(b) * pow2(-int(fi)) for a, b, fi in
               zip(x.ravel(), v.ravel(), np.broadcast_to(f, v.shape).ravel())), "inexact input"
    extremes = np.array([np.finfo(dtype).max, -np.finfo(dtype).max], dtype)  # overflow x * 2^f
    x = np.concatenate([x, np.broadcast_to(extremes.reshape((2,) + (1,) * (x.ndim - 1)),
                                           (2,) + x.shape[1:])])
    return QuantCase(bits, signed, rounding, f, dtype, np.sort(x, axis=0))


def on_grid(y: np.ndarray, f: np.ndarray) -> np.ndarray:
    """q = y * 2^f as float64 (exact for y on a grid with |q| <= 2^16)."""
    return np.ldexp(y.astype(np.float64), np.broadcast_to(f, y.shape))


def check_quantizer_output(case: QuantCase, y: np.ndarray) -> np.ndarray:
    """The properties every quantizer output must have; returns q (int64)."""
    n, p = ref_range(case.bits, case.signed)
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    q = on_grid(y, case.f)
    assert np.all(q == np.round(q)), "grid membership: y is not an integer times 2^-f"
    assert np.all((q >= n) & (q <= p)), "range: q outside [n, p]"
    q = q.astype(np.int64)
    assert np.all(np.diff(q, axis=0) >= 0), "monotonicity: x sorted, q not"
    expected = ref_quantize_array(case.x, case.f, case.bits, case.signed, case.rounding,
                                  half_up_in=case.dtype)
    bad = np.flatnonzero(q != expected)
    assert bad.size == 0, (f"x={case.x.ravel()[bad[:4]]!r} q={q.ravel()[bad[:4]]} "
                           f"expected={expected.ravel()[bad[:4]]}")
    # and the output is exactly q * 2^-f, element by element
    fs = np.broadcast_to(case.f, y.shape).ravel()
    assert all(exact(a) == int(b) * pow2(-int(c)) for a, b, c in zip(y.ravel(), q.ravel(), fs))
    return q
