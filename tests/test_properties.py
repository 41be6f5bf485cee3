"""Property-based tests (hypothesis) of the integer core: quantizers (both paths of the TF op,
integer/fixed_point.py's rounding and grids), fractional bits, int32 biases, the exact-GEMM planner of the
integer engine and the `$readmemh` files.

Every property is checked against a reference written in Python integers and
`fractions.Fraction` (no floating point), so the reference cannot share a rounding error with
the code under test. The helpers in the first section are meant to be reused by later
integer-only kernels: quantize with `ref_quantize`, accumulate with `ref_gemm`, bound with
`ref_float64_exact`, serialize with `ref_mem_word`.

Inputs are generated in grid units v = x * 2^f (x = v * 2^-f is exact: a power-of-two scaling
of a normal float), concentrated where implementations go wrong: rounding ties k + 1/2 and
their float neighbours, the clip edges n, p, n - 1/2, p + 1/2, values far outside the range,
+0 and -0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import quant
from integer import accumulation, export_format, fixed_point, matmul_engine

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
    """R(v): "half_even" (Python's round), "half_up" floor(v + 1/2), "floor".

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


# ============================================================================================
# 1. The quantizer: quant.tqt_fake_quant (both paths), fixed_point.round_to_integer and Grid.quantize
# ============================================================================================

FUSED_ROUNDINGS = ("half_even", "half_up")  # per tensor, tqt_fake_quant takes the fused kernels


def fusable(case: QuantCase) -> bool:
    return case.rounding in FUSED_ROUNDINGS and case.f.ndim == 0


def tf_quantize(case: QuantCase, x: np.ndarray, op=quant.tqt_fake_quant) -> np.ndarray:
    log2_t = case.log2_t
    return op(tf.constant(x), tf.constant(log2_t), case.bits, case.signed, case.rounding).numpy()


@MEDIUM
@given(case=quant_cases())
def test_tqt_fake_quant_matches_the_integer_reference(case):
    """Per tensor (fused QuantizeAndDequantizeV4 for half_even/half_up, written out for floor)
    and per channel, float32 and float64: range, grid, monotonicity, the reference integers,
    and idempotence (y quantizes to itself). Where tqt_fake_quant takes the fused kernels,
    tqt_fake_quant_reference is checked as well."""
    ops = [quant.tqt_fake_quant] + ([quant.tqt_fake_quant_reference] if fusable(case) else [])
    for op in ops:
        y = tf_quantize(case, case.x, op)
        check_quantizer_output(case, y)
        np.testing.assert_array_equal(tf_quantize(case, y, op), y)


def assert_same_bits(got: np.ndarray, expected: np.ndarray, zero_sign: bool = True) -> None:
    """Equal floats bit for bit. zero_sign=False lets a zero differ in sign (-0.0 + 0.0 = +0.0
    maps both zeros to +0.0 before the bits are compared; every other value keeps its bits)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if not zero_sign:
        got, expected = (np.asarray(a + a.dtype.type(0)) for a in (got, expected))
    uint = np.dtype(f"u{got.dtype.itemsize}")
    bad = np.flatnonzero(got.view(uint) != expected.view(uint))
    assert bad.size == 0, f"{got.ravel()[bad[:4]]!r} != {expected.ravel()[bad[:4]]!r}"


def value_and_grads(op, x: np.ndarray, log2_t: np.float32, dy: np.ndarray, case: QuantCase):
    """y, dL/dx, dL/dlog2_t of op, log2_t a float32 variable as a QuantSite owns it."""
    x_t, log2_t = tf.constant(x), tf.Variable(log2_t)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = op(x_t, log2_t, case.bits, case.signed, case.rounding)
    dx, dl = tape.gradient(y, [x_t, log2_t], output_gradients=tf.constant(dy))
    return y.numpy(), dx.numpy(), dl.numpy()


def threshold_and_dy(case: QuantCase, data) -> tuple[np.float32, np.ndarray]:
    """A float32 log2_t giving the case's f (integer or not), and dy with signed zeros and
    magnitudes over 2^-8..2^8."""
    magnitude = case.bits - 1 if case.signed else case.bits
    frac = data.draw(st.sampled_from([0.0, 0.375, 0.9921875]), label="frac")  # ceil(log2_t) is the same
    log2_t = np.float32(magnitude - int(case.f)) - np.float32(frac)
    assert math.ceil(log2_t) == magnitude - int(case.f)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dy = rng.normal(size=case.x.shape) * np.exp2(rng.integers(-8, 9, size=case.x.shape))
    dy[rng.random(size=dy.shape) < 0.1] = 0.0
    dy[rng.random(size=dy.shape) < 0.1] = -0.0
    return log2_t, dy.astype(case.dtype)


@MEDIUM
@given(case=quant_cases(roundings=FUSED_ROUNDINGS, channel_counts=(None,)), data=st.data())
def test_reference_and_fused_paths_are_equal_bit_for_bit(case, data):
    """tqt_fake_quant_reference and tqt_fake_quant_fused on TF's kernels give the same y, dL/dx
    and dL/dlog2_t, bit for bit: float32/float64, half_even/half_up, signed/unsigned, 2..16 bits,
    f over [-23, 40], ties, clip edges, both clipping sides, +-0, +-max, log2_t integer or not.

    A zero y may differ in sign at an unsigned site clipped up to n = 0 (the reference clips
    R(x/s) = -0, the kernel clips x first). Inputs keep |x/s| >= 2^-60 (quant_cases): where x/s
    is subnormal the reference flushes it to zero (and so drops that element's x from
    dL/dlog2_t) while the fused path keeps it."""
    log2_t, dy = threshold_and_dy(case, data)
    ref = value_and_grads(quant.tqt_fake_quant_reference, case.x, log2_t, dy, case)
    with quant.without_grad_kernel():
        fused = value_and_grads(quant.tqt_fake_quant_fused, case.x, log2_t, dy, case)
    assert_same_bits(fused[0], ref[0], zero_sign=case.signed)
    assert_same_bits(fused[1], ref[1])
    assert_same_bits(fused[2], ref[2])
    check_quantizer_output(case, ref[0])


@pytest.mark.skipif(quant.GRAD_KERNEL is None, reason="csrc/quant_grad.cc is not built (make kernel)")
@MEDIUM
@given(case=quant_cases(roundings=FUSED_ROUNDINGS, channel_counts=(None,)), data=st.data())
def test_grad_kernel_keeps_dx_and_sums_the_threshold_gradient_to_float_rounding(case, data):
    """The one-pass backward (csrc/quant_grad.cc) against TF's kernels on the cases above: y and dL/dx
    bit for bit; dL/dlog2_t = ln2 sum(dy (y - 1[inside] x)) within (m + 2) eps sum|terms| of the
    exact sum (the worst case of any summation order over m terms), where no term overflows."""
    log2_t, dy = threshold_and_dy(case, data)
    with quant.without_grad_kernel():
        tf_kernels = value_and_grads(quant.tqt_fake_quant_fused, case.x, log2_t, dy, case)
    y, dx, dl = value_and_grads(quant.tqt_fake_quant_fused, case.x, log2_t, dy, case)
    assert_same_bits(y, tf_kernels[0])
    assert_same_bits(dx, tf_kernels[1])
    inside = tf_kernels[1] == dy  # where dy = 0 both branches give the same term
    terms = dy * (y - np.where(inside, case.x, 0))  # each term rounded as the kernel rounds it
    if not np.all(np.isfinite(terms)) or np.abs(terms).sum() > np.finfo(case.dtype).max / 4:
        return
    exact = math.log(2) * math.fsum(terms.astype(np.float64))
    eps = np.finfo(case.dtype).eps
    bound = (terms.size + 2) * eps * math.log(2) * np.abs(terms.astype(np.float64)).sum()
    assert abs(float(dl) - exact) <= bound + np.finfo(np.float32).eps * abs(exact) + 1e-45


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_half_up_is_the_floor_of_a_float_sum(dtype):
    """Both engines compute half-up as floor(v + 0.5) in floating point. At v = 1/2 - ulp(1/2)/2
    (the largest float below 1/2) the sum rounds to 1.0, so they give 1 where exact half-up
    (and integer hardware adding 1/2 to a wider fixed-point value) gives 0. Pinned here so a
    change on either side shows; the engines must agree with each other."""
    v = Fraction(1, 2) - pow2(-np.finfo(dtype).nmant - 2)
    x = np.array([float(v)] * 2, dtype)
    assert exact(x[0]) == v
    assert ref_round(v, "half_up") == 0 and ref_round(v, "half_up", half_up_in=dtype) == 1
    bits, signed, log2_t = 8, True, 7.0  # f = 0
    fused = quant.tqt_fake_quant_fused(tf.constant(x), log2_t, bits, signed, "half_up").numpy()
    reference = quant.tqt_fake_quant_reference(tf.constant(x), log2_t, bits, signed, "half_up").numpy()
    per_channel = quant.tqt_fake_quant(tf.constant(x), [log2_t] * 2, bits, signed, "half_up").numpy()
    np.testing.assert_array_equal(fused, [1, 1])
    np.testing.assert_array_equal(reference, [1, 1])
    np.testing.assert_array_equal(per_channel, [1, 1])
    np.testing.assert_array_equal(fixed_point.round_to_integer(x.copy(), "half_up"), [1, 1])
    grid = fixed_point.Grid(bits, signed, np.array(0))
    np.testing.assert_array_equal(grid.quantize(x, "half_up", dtype), [1, 1])
    if dtype == np.float32:
        np.testing.assert_array_equal(grid.quantize(x, "half_up"), [1, 1])


def test_rounding_reference_on_ties():
    """The reference itself: ties go to even / up / down, negative ties included."""
    ties = [Fraction(k, 2) for k in (-5, -3, -1, 1, 3, 5)]
    assert [ref_round(v, "half_even") for v in ties] == [-2, -2, 0, 0, 2, 2]
    assert [ref_round(v, "half_up") for v in ties] == [-2, -1, 0, 1, 2, 3]
    assert [ref_round(v, "floor") for v in ties] == [-3, -2, -1, 0, 1, 2]
    assert round_to_float(Fraction(1) - pow2(-25), np.float32) == 1  # the tie goes to even
    assert round_to_float(Fraction(1) - pow2(-24), np.float32) == Fraction(1) - pow2(-24)


# ============================================================================================
# 2. Fractional bits
# ============================================================================================


def log2_t_values() -> st.SearchStrategy[float]:
    """float32 log2_t values: integers (ceil is the identity), their float neighbours (ceil
    jumps), -0.0, anything in the clamp range and somewhat beyond."""
    integer = st.integers(-30, 30).map(float)
    return st.one_of(
        integer,
        st.tuples(integer, st.sampled_from([-1, 1])).map(
            lambda t: float(np.nextafter(np.float32(t[0]), np.float32(t[1] * np.inf)))),
        st.just(-0.0),
        st.floats(-30, 30, width=32),
    ).filter(lambda v: v == 0 or abs(v) >= 2**-126)  # TF flushes subnormals: ceil(1e-45) = 0 there


@FAST
@given(bits=BITS, signed=st.booleans(), values=st.lists(log2_t_values(), min_size=1, max_size=20))
def test_frac_bits_formula_for_tf_and_numpy_inputs(bits, signed, values):
    """fixed_point.frac_bits (NumPy, int64) and quant.frac_bits_tensor (in the graph, int32)."""
    expected = np.array([ref_frac_bits(v, bits, signed) for v in values])
    arr = np.array(values, np.float32)
    from_numpy = fixed_point.frac_bits(arr, bits, signed)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.int64
    np.testing.assert_array_equal(from_numpy, expected)
    for scalar, e in zip(values[:3], expected):  # Python floats give 0-d int64 values
        s = fixed_point.frac_bits(scalar, bits, signed)
        assert np.ndim(s) == 0 and np.asarray(s).dtype == np.int64 and int(s) == e
    for tensor in (tf.constant(arr), tf.Variable(arr)):
        from_tf = quant.frac_bits_tensor(tensor, bits, signed)
        assert tf.is_tensor(from_tf) and from_tf.dtype == tf.int32
        np.testing.assert_array_equal(from_tf.numpy(), expected)
    scalar_tf = quant.frac_bits_tensor(tf.constant(arr[0]), bits, signed)
    assert scalar_tf.shape == () and int(scalar_tf) == expected[0]


# ============================================================================================
# 3. int32 biases on the accumulator grid
# ============================================================================================


def bias_grid_units() -> st.SearchStrategy[float]:
    """b * 2^f: ties, the int32 limits and what lies around and beyond them."""
    limits = [2**31 - 1, 2**31 - 0.5, 2**31, 2**31 + 1, 2**31 - 64, 2**31 - 128, 2**31 - 129,
              2**31 - 192, 2**32, 1e12]
    return st.one_of(
        st.integers(-(2**22), 2**22).map(lambda k: k + 0.5),
        st.sampled_from(limits + [-v for v in limits] + [-(2**31) - 0.5, -(2**31) + 0.5, 0.0, -0.0]),
        st.integers(-(2**31) - 1000, 2**31 + 1000).map(float),
        st.floats(-1e13, 1e13).filter(lambda v: v == 0 or abs(v) >= 2**-30),
    )


@MEDIUM
@given(dtype=st.sampled_from([np.float32, np.float64]), channels=st.sampled_from([None, 1, 4]),
       f_form=st.sampled_from(["int", "tensor"]), data=st.data(),
       values=st.lists(bias_grid_units(), min_size=1, max_size=24))
def test_quantize_bias_is_int32_on_the_accumulator_grid(dtype, channels, f_form, data, values):
    """q = clip(round_half_even(b 2^f), -2^31, top) with top = 2^31 - 1 (float64) or the
    largest float32 below it, 2^31 - 128; y = q 2^-f exactly; the gradient passes straight
    through, clipped or not."""
    f_acc = st.integers(-20, 60)
    f = np.array(data.draw(f_acc) if channels is None else
                 data.draw(st.lists(f_acc, min_size=channels, max_size=channels)), np.int64)
    v = np.array(values, dtype)
    if channels is not None:
        v = np.repeat(v[:, None], channels, axis=1)
    b = np.ldexp(v, -f).astype(dtype)
    f_arg = int(f) if f_form == "int" and channels is None else tf.constant(f, tf.int32)
    b_t = tf.constant(b)
    dy = tf.constant(np.linspace(-1.0, 3.0, b.size).reshape(b.shape).astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(b_t)
        y = quant.quantize_bias(b_t, f_arg)
    grad = tape.gradient(y, b_t, output_gradients=dy)
    y = y.numpy()
    assert y.dtype == dtype
    fs = np.broadcast_to(f, b.shape).ravel()
    expected = [ref_quantize_bias(bi, int(fi), dtype) for bi, fi in zip(b.ravel(), fs)]
    got = [exact(yi) * pow2(int(fi)) for yi, fi in zip(y.ravel(), fs)]
    assert got == expected
    assert all(-(2**31) <= q <= 2**31 - 1 for q in expected)
    np.testing.assert_array_equal(grad.numpy(), dy.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_bias_clips_to_the_int32_limits(dtype):
    """Large biases of both signs clip to exactly -2^31 and to the dtype's top."""
    b = tf.constant([-1e30, -3e9, -(2.0**31) - 1, 3e9, 1e30], dtype)
    q = quant.quantize_bias(b, 0).numpy()
    np.testing.assert_array_equal(q, [-(2**31)] * 3 + [ref_int32_top(dtype)] * 2)
    assert ref_int32_top(np.float64) == 2**31 - 1 and ref_int32_top(np.float32) == 2**31 - 128
    assert quant._int32_max(tf.as_dtype(dtype)) == ref_int32_top(dtype)


# ============================================================================================
# 4. The exact-GEMM planner of the integer engine
# ============================================================================================

OPERAND_PATTERNS = ("all_n", "all_p", "n_or_p", "odd_extremes", "uniform")
BIAS_PATTERNS = ("none", "zero", "small", "near_max", "near_min", "near_both", "any")


def operand(rng: np.random.Generator, pattern: str, n: int, p: int, shape) -> np.ndarray:
    """int64 integers in [n, p]: the extremes (largest products), mixtures of them, odd values
    (so that sums past 2^24 are not float32 numbers), or uniform."""
    if pattern == "all_n":
        return np.full(shape, n, np.int64)
    if pattern == "all_p":
        return np.full(shape, p, np.int64)
    if pattern == "n_or_p":
        return rng.choice([n, p], size=shape)
    if pattern == "odd_extremes":
        odd = sorted({v for v in (n, n + 1, n + 2, p - 2, p - 1, p) if v % 2 and n <= v <= p})
        return rng.choice(odd, size=shape)
    return rng.integers(n, p + 1, size=shape)


def int32_bias(rng: np.random.Generator, pattern: str, size: int) -> np.ndarray | None:
    """int32 biases of one pattern, near the limits +-(2^31 - 1); -2^31 itself is in
    test_bias_rule_int32_min."""
    top = 2**31 - 1
    near_max = top - rng.integers(0, 1001, size)
    near_min = -near_max
    values = {
        "none": None,
        "zero": np.zeros(size, np.int64),
        "small": rng.integers(-1000, 1001, size),
        "near_max": near_max,
        "near_min": near_min,
        "near_both": np.where(rng.random(size) < 0.5, near_max, near_min),
        "any": rng.integers(-top, top, size, endpoint=True),
    }[pattern]
    return None if values is None else values.astype(np.int32)


@dataclass
class GemmCase:
    x_bits: int
    x_signed: bool
    w_bits: int
    w_signed: bool
    f_x: int
    f_w: tuple[int, ...]  # one value (per tensor) or one per output column
    k: int
    rows: int
    cols: int
    x_pattern: str
    w_pattern: str
    bias_pattern: str
    rounding: str
    seed: int


def max_abs(bits: int, signed: bool) -> int:
    n, p = ref_range(bits, signed)
    return max(-n, p)


@st.composite
def gemm_cases(draw) -> GemmCase:
    x_bits, x_signed, w_bits, w_signed = draw(BITS), draw(st.booleans()), draw(BITS), draw(st.booleans())
    chunk = ref_float32_chunk(max_abs(x_bits, x_signed), max_abs(w_bits, w_signed))
    k_max = 4096
    ks = [st.integers(1, 24)]
    if chunk <= k_max:  # around one chunk, and several chunks
        ks.append(st.integers(max(chunk - 1, 1), chunk + 2))
    if 0 < chunk and chunk + 2 <= k_max:
        ks.append(st.integers(chunk + 2, min(4 * chunk + 7, k_max)))
    if chunk == 0:  # one product passes 2^24: a float64 GEMM
        ks.append(st.integers(25, k_max))
    k = draw(st.one_of(ks))
    cols = draw(st.integers(1, 4))
    f_w = tuple(draw(st.lists(st.integers(-6, 6), min_size=1, max_size=1) | st.lists(
        st.integers(-6, 6), min_size=cols, max_size=cols)))
    return GemmCase(x_bits, x_signed, w_bits, w_signed, draw(st.integers(-6, 6)), f_w, k,
                    draw(st.integers(1, 3)), cols, draw(st.sampled_from(OPERAND_PATTERNS)),
                    draw(st.sampled_from(OPERAND_PATTERNS)), draw(st.sampled_from(BIAS_PATTERNS)),
                    draw(st.sampled_from(ROUNDINGS)), draw(st.integers(0, 2**32 - 1)))


def dense_arrays(w: np.ndarray, bias: np.ndarray | None, x_bits: int, x_signed: bool, f_x,
                 w_bits: int, w_signed: bool, f_w) -> dict[str, np.ndarray]:
    """The export arrays of one dense layer "l" (as tests/test_int.py builds them)."""
    arrays = {"l/weight": w, "l/input.bits": np.int32(x_bits), "l/input.signed": np.bool_(x_signed),
              "l/input.f": np.asarray(f_x, np.int32), "l/weight.bits": np.int32(w_bits),
              "l/weight.signed": np.bool_(w_signed), "l/weight.f": np.asarray(f_w, np.int32)}
    if bias is not None:
        arrays["l/bias"] = bias
    return arrays


def run_dense(case: GemmCase):
    """(trace record, y, exact int64 accumulator, f_x + f_w) of one engine dense layer."""
    rng = np.random.default_rng(case.seed)
    qx = operand(rng, case.x_pattern, *ref_range(case.x_bits, case.x_signed), (case.rows, case.k))
    qw = operand(rng, case.w_pattern, *ref_range(case.w_bits, case.w_signed), (case.k, case.cols))
    qb = int32_bias(rng, case.bias_pattern, case.cols)
    f_w = np.array(case.f_w if len(case.f_w) > 1 else case.f_w[0], np.int64)
    w = qw.astype(fixed_point.int_dtype(case.w_bits, case.w_signed))
    engine = matmul_engine.IntTransformer(
        dense_arrays(w, qb, case.x_bits, case.x_signed, case.f_x, case.w_bits, case.w_signed, f_w),
        {"rounding": case.rounding, "num_heads": 1})
    x = np.ldexp(qx.astype(np.float32), -case.f_x)  # on the input grid: quantizes back to qx
    with engine.tracing() as trace:
        y = engine.dense("l", x)
    assert len(trace) == 1
    return trace[0], y, ref_gemm(qx, qw, qb), case.f_x + f_w


def _gemm_example(x_bits, x_signed, w_bits, w_signed, k, x_pattern, w_pattern, bias_pattern, cols=3):
    return GemmCase(x_bits, x_signed, w_bits, w_signed, -2, (3,), k, 2, cols, x_pattern, w_pattern,
                    bias_pattern, "half_even", 7)


@MEDIUM
@given(case=gemm_cases())
@example(case=_gemm_example(8, True, 8, True, 3000, "odd_extremes", "odd_extremes", "near_both"))
@example(case=_gemm_example(8, False, 8, True, 2500, "all_p", "n_or_p", "none"))
@example(case=_gemm_example(4, True, 4, True, 7, "uniform", "uniform", "near_min"))
@example(case=_gemm_example(16, True, 16, True, 300, "n_or_p", "odd_extremes", "near_max"))
@example(case=_gemm_example(12, False, 12, True, 5, "all_p", "all_n", "near_both"))
def test_engine_accumulates_exactly(case):
    """The accumulator equals int64 x @ w + b whatever K (one float32 chunk, many chunks summed
    in float64, or a float64 GEMM), bit widths, signedness and biases; y is acc * 2^-(f_x + f_w)
    rounded once to float32."""
    record, y, acc, f = run_dense(case)
    assert record.x_site == "l/input" and record.w_site == "l/weight"
    assert np.abs(acc).max() < 2**53  # so the float64 comparison below is exact
    np.testing.assert_array_equal(record.acc, acc.astype(np.float64))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.ldexp(acc.astype(np.float64), -np.broadcast_to(f, acc.shape))
                                  .astype(np.float32))


def _one_weight_engine(w: np.ndarray, bias, bits: int = 8) -> matmul_engine.IntTransformer:
    """A signed bits x bits dense layer with weight w and an int32 bias."""
    arrays = dense_arrays(w, np.array(bias, np.int32), bits, True, 0, bits, True, 0)
    return matmul_engine.IntTransformer(arrays, {"rounding": "half_even", "num_heads": 1})


def test_bias_rule_int32_min():
    """-2^31 is a legal int32 bias (quant.quantize_bias clips to it): 1 * 1 - 2^31."""
    engine = _one_weight_engine(np.ones((1, 1), np.int8), [-(2**31)])
    with engine.tracing() as trace:
        engine.dense("l", np.ones((1, 1), np.float32))
    assert trace[0].acc[0, 0] == 1 - 2**31


def test_bias_rule_int32_wraparound():
    """K = 1, q_x = q_w = -128 (bound 2^14), b = 2^31 - 1: acc = 2^14 + 2^31 - 1 (odd)."""
    engine = _one_weight_engine(np.full((1, 1), -128, np.int8), [2**31 - 1])
    with engine.tracing() as trace:
        engine.dense("l", np.full((1, 1), -128.0, np.float32))
    assert trace[0].acc[0, 0] == 2**14 + 2**31 - 1


def test_bias_rule_wide_layer_loads():
    engine = _one_weight_engine(np.zeros((2, 1), np.int16), [0], bits=16)
    assert engine.ints["l/bias"].dtype == np.float64


def test_grid_range_and_max_abs():
    """Grid.range is [n, p] and Grid.max_abs = max(-n, p) (2^(b-1) signed, 2^b - 1 unsigned)."""
    for bits in range(2, 17):
        for signed in (True, False):
            grid = fixed_point.Grid(bits, signed, np.array(0))
            n, p = ref_range(bits, signed)
            assert grid.range == (n, p) == fixed_point.integer_range(bits, signed)
            assert grid.max_abs == max(-n, p)


def test_check_exact_raises_exactly_past_the_float64_bound():
    """check_exact raises iff K max|q_x| max|q_w| + 2^31 >= 2^53, at the boundary K of every
    pair of grids; where 2^53 - 2^31 is a multiple of the product the bound is met with equality
    at the first failing K."""
    equalities = 0
    for bx in range(2, 17):
        for bw in range(2, 17):
            for sx in (True, False):
                for sw in (True, False):
                    gx = fixed_point.Grid(bx, sx, np.array(0))
                    gw = fixed_point.Grid(bw, sw, np.array(0))
                    product = max_abs(bx, sx) * max_abs(bw, sw)
                    first_bad = -(-(2**53 - 2**31) // product)  # smallest K over the bound
                    equalities += first_bad * product + 2**31 == 2**53
                    for k in (first_bad - 1, first_bad, first_bad + 1):
                        if ref_float64_exact(k, max_abs(bx, sx), max_abs(bw, sw)):
                            accumulation.check_exact(k, gx, gw)
                        else:
                            with pytest.raises(OverflowError, match=rf"^a {k}-term accumulation of "
                                               rf"{bx}x{bw}-bit products could exceed 2\^53$"):
                                accumulation.check_exact(k, gx, gw)
                    assert ref_float64_exact(first_bad - 1, max_abs(bx, sx), max_abs(bw, sw))
    assert equalities > 0


@pytest.mark.parametrize("x_bits,x_signed,w_bits,w_signed", [(16, True, 16, True), (16, False, 16, False),
                                                             (8, False, 12, True), (2, True, 3, False)])
def test_planner_refuses_k_past_the_float64_bound(x_bits, x_signed, w_bits, w_signed):
    """IntTransformer._plan runs check_exact for the K it is asked for."""
    w = np.zeros((1, 1), fixed_point.int_dtype(w_bits, w_signed))
    engine = matmul_engine.IntTransformer(dense_arrays(w, None, x_bits, x_signed, 0, w_bits, w_signed, 0),
                                     {"rounding": "floor", "num_heads": 1})
    product = max_abs(x_bits, x_signed) * max_abs(w_bits, w_signed)
    first_bad = -(-(2**53 - 2**31) // product)
    engine._plan("l/input", "l/weight", first_bad - 1)
    with pytest.raises(OverflowError):
        engine._plan("l/input", "l/weight", first_bad)


def test_bias_dtype_is_float32_exactly_while_the_sum_stays_below_2_24():
    """bias_dtype: float32 iff bound + max|b| < 2^24 (at the boundary, with zero, empty and
    -2^31 biases)."""
    top = 2**24 - 1
    cases = [(top - 5, [5], np.float32), (top - 4, [-5], np.float64), (top, [0, 0], np.float32),
             (top, [], np.float32), (2**24, [], np.float64), (0, [-(2**31)], np.float64),
             (0, [1], np.float32)]
    for bound, bias, expected in cases:
        assert accumulation.bias_dtype(bound, np.array(bias, np.int32)) is expected, (bound, bias)


@pytest.mark.parametrize("x_bits,x_signed,w_bits,w_signed", [
    (8, True, 8, True), (8, False, 8, True), (8, False, 2, False), (16, True, 10, True),
    (16, True, 16, True), (4, True, 3, False)])
def test_planner_chunks_as_the_reference(x_bits, x_signed, w_bits, w_signed):
    """The plan: chunk = the most terms a float32 sum holds exactly (all of K when not even one
    product fits), first chunk in float32 iff chunk * product < 2^24, scale 2^-(f_x + f_w).
    (8u x 2u: the product 765 divides 2^24 - 1; 16 x 10: one product is exactly 2^24.)"""
    w = np.zeros((1, 1), fixed_point.int_dtype(w_bits, w_signed))
    engine = matmul_engine.IntTransformer(dense_arrays(w, None, x_bits, x_signed, 3, w_bits, w_signed, -1),
                                     {"rounding": "floor", "num_heads": 1})
    product = max_abs(x_bits, x_signed) * max_abs(w_bits, w_signed)
    for k in (1, 7, 5000):
        chunk, dtype, scale, name = engine._plan("l/input", "l/weight", k)
        expected = ref_float32_chunk(max_abs(x_bits, x_signed), max_abs(w_bits, w_signed)) or k
        assert chunk == expected and name == "l"
        assert dtype is (np.float32 if expected * product < 2**24 else np.float64)
        assert scale == 2.0**-2


def test_matmul_transposed_weight_batched_input_and_trace():
    """matmul with a 3-D input and transpose_w (as Q K^T and the output projection use it):
    the accumulator is int64 x @ w^T, the trace records the operands, acc and the bound
    max(|x| @ |w|), and accumulator_stats is keyed by the matmul's name."""
    rng = np.random.default_rng(11)
    qx = rng.integers(-128, 128, (2, 3, 40)).astype(np.float32)
    qw = rng.integers(-8, 8, (5, 40)).astype(np.float32)  # [n, k]: used transposed
    engine = matmul_engine.IntTransformer(dense_arrays(qw.astype(np.int8), None, 8, True, 1, 4, True, 2),
                                     {"rounding": "half_even", "num_heads": 1})
    with engine.tracing() as trace:
        y = engine.matmul("l/input", qx, "l/weight", qw, transpose_w=True)
    acc = ref_gemm(qx.astype(np.int64), qw.T.astype(np.int64), None)
    np.testing.assert_array_equal(y, np.ldexp(acc.astype(np.float64), -3).astype(np.float32))
    (record,) = trace
    assert (record.name, record.x_site, record.w_site) == ("l", "l/input", "l/weight")
    assert record.x is qx and record.w is qw and record.acc.dtype == np.float64
    np.testing.assert_array_equal(record.acc, acc)
    assert record.abs_bound == float((np.abs(qx.astype(np.int64)) @ np.abs(qw.T.astype(np.int64))).max())
    largest = int(np.abs(acc).max())
    assert engine.accumulator_stats() == {"l": {"max_abs": largest, "bits": largest.bit_length() + 1}}
    with engine.tracing() as trace:  # no rows: nothing to bound
        engine.matmul("l/input", qx[:0], "l/weight", qw, transpose_w=True)
    assert trace[0].abs_bound == 0.0


def test_matmul_of_attention_shaped_operands_past_the_chunk():
    """[B, h, L, K] @ [B, h, K', K]^T (Q K^T) and [B, L, K] @ [K, N] with K past the float32
    chunk (1023 terms of 8x8-bit products), with odd extremes so a sum past 2^24 is not a
    float32: the accumulator still equals int64 arithmetic."""
    rng = np.random.default_rng(12)
    arrays = dense_arrays(np.zeros((1, 1), np.int8), None, 8, True, 0, 8, True, 0)
    engine = matmul_engine.IntTransformer(arrays, {"rounding": "half_even", "num_heads": 1})
    qx = rng.choice([-127.0, -125.0], size=(2, 3, 2000)).astype(np.float32)  # one sign: |acc| > 2^24
    qw = rng.choice([-127.0, -126.0, -125.0], size=(2000, 4)).astype(np.float32)
    q = rng.integers(-128, 128, (2, 2, 3, 5)).astype(np.float32)
    k = rng.integers(-128, 128, (2, 2, 6, 5)).astype(np.float32)
    with engine.tracing() as trace:
        engine.matmul("l/input", qx, "l/weight", qw)
        engine.matmul("l/input", q, "l/weight", k, transpose_w=True)
    assert np.abs(trace[0].acc).max() > 2**24
    np.testing.assert_array_equal(trace[0].acc, ref_gemm(qx, qw, None))
    np.testing.assert_array_equal(trace[1].acc, q.astype(np.int64) @ np.swapaxes(k, -1, -2).astype(np.int64))


def test_grid_quantize_rounds_float64_inputs_through_float32():
    """Grid.quantize computes in float32, as the TF graph's float32 activations are: a float64
    input first rounds to float32 (0.5 + 2^-30 becomes the tie 0.5, which half_even rounds to 0)."""
    grid = fixed_point.Grid(8, True, np.array(0))
    q = grid.quantize(np.array([0.5 + 2.0**-30, 1.5 + 2.0**-30]), "half_even")
    assert q.dtype == np.float32 and q.tolist() == [0.0, 2.0]


def test_error_messages_name_what_is_wrong(tmp_path):
    assert fixed_point.int_dtype(8) == np.int8  # signed unless told otherwise
    with pytest.raises(ValueError, match="^no integer type holds 65 bits$"):
        fixed_point.int_dtype(65)
    with pytest.raises(ValueError, match=r"v.mem: values outside the 4-bit range \[-8, 7\]$"):
        export_format.write_mem(str(tmp_path / "v.mem"), np.array([8]), 4, True)
    with pytest.raises(ValueError, match="^unknown rounding 'nearest'$"):
        fixed_point.Grid(8, True, np.array(0)).quantize(np.zeros(2), "nearest")


def test_mem_comments_end_a_line_at_their_first_slashes(tmp_path):
    path = tmp_path / "c.mem"
    path.write_text("// header // more\n7f // 127 // max\n\n  80\n")
    assert export_format.read_mem(str(path), 8, True).tolist() == [127, -128]


def test_int_dtype_is_the_smallest_that_holds_the_range():
    order = {True: ["int8", "int16", "int32", "int64"], False: ["uint8", "uint16", "uint32", "uint64"]}
    for bits in range(2, 65):
        for signed in (True, False):
            dt = fixed_point.int_dtype(bits, signed)
            n, p = ref_range(bits, signed)
            assert np.iinfo(dt).min <= n and np.iinfo(dt).max >= p
            smaller = order[signed][: order[signed].index(dt.name)]
            assert all(np.iinfo(s).min > n or np.iinfo(s).max < p for s in smaller)


# ============================================================================================
# 5. $readmemh files
# ============================================================================================


@st.composite
def mem_cases(draw, max_bits=60):  # 61..64 bits: test_mem_file_of_64_bit_accumulators
    bits, signed = draw(st.integers(2, max_bits)), draw(st.booleans())
    n, p = ref_range(bits, signed)
    value = st.one_of(st.sampled_from(sorted({n, p, 0, min(max(-1, n), p), n + 1, p - 1})),
                      st.integers(n, p))
    return bits, signed, draw(st.lists(value, max_size=30)), draw(st.sampled_from(["", "a comment"]))


@FAST
@given(case=mem_cases())
def test_mem_file_round_trip_and_format(case, tmp_path_factory):
    """write_mem then read_mem gives the values back; each line is ceil(bits/4) hex digits of the
    two's complement, sign-extended; the optional first line is a // comment."""
    bits, signed, values, comment = case
    path = str(tmp_path_factory.mktemp("mem") / "v.mem")
    export_format.write_mem(path, np.array(values, np.int64), bits, signed, comment)
    lines = open(path).read().splitlines()
    if comment:
        assert lines.pop(0) == f"// {comment}"
    assert all(len(line) == -(-bits // 4) for line in lines)
    assert lines == [ref_mem_word(v, bits) for v in values]
    back = export_format.read_mem(path, bits, signed)
    assert back.dtype == np.int64 and back.tolist() == values


@FAST
@given(case=mem_cases(), data=st.data())
def test_mem_file_rejects_values_out_of_range(case, data, tmp_path_factory):
    bits, signed, values, _ = case
    n, p = ref_range(bits, signed)
    bad = data.draw(st.sampled_from([n - 1, p + 1]))
    position = data.draw(st.integers(0, len(values)))
    path = str(tmp_path_factory.mktemp("mem") / "bad.mem")
    with pytest.raises(ValueError):
        export_format.write_mem(path, np.array(values[:position] + [bad] + values[position:], np.int64),
                           bits, signed)


@pytest.mark.parametrize("value,bits,signed,word", [
    (-1, 8, True, "ff"), (-128, 8, True, "80"), (127, 8, True, "7f"), (255, 8, False, "ff"),
    (-8, 4, True, "8"), (7, 4, True, "7"), (-1, 6, True, "ff"), (-32, 6, True, "e0"),
    (31, 6, True, "1f"), (63, 6, False, "3f"), (-1, 12, True, "fff"), (-16, 5, True, "f0"),
    (-(2**31), 32, True, "80000000"), (2**31 - 1, 32, True, "7fffffff"), (0, 3, True, "0"),
])
def test_mem_words_of_known_values(tmp_path, value, bits, signed, word):
    assert ref_mem_word(value, bits) == word
    path = str(tmp_path / "v.mem")
    export_format.write_mem(path, np.array([value]), bits, signed)
    assert open(path).read() == word + "\n"
    assert export_format.read_mem(path, bits, signed).tolist() == [value]


def test_mem_file_of_64_bit_accumulators(tmp_path):
    path = str(tmp_path / "acc.mem")
    values = [-1, -(2**63), 2**63 - 1, 5]
    export_format.write_mem(path, np.array(values, np.int64), 64, True)
    assert open(path).read().split() == [ref_mem_word(v, 64) for v in values]
    assert export_format.read_mem(path, 64, True).tolist() == values
