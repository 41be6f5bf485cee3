"""Property-based tests (hypothesis) of quant.py's TF ops: tqt_fake_quant (both paths, against
each other and against the Python-integer reference of tests/exact.py), the one-pass gradient
kernel, half-up as the floor of a float sum, frac_bits (TF and NumPy inputs) and quantize_bias on
the int32 accumulator grid.

The references and the quantizer-input generators live in tests/exact.py (NumPy only, shared
with tests/integer/)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from exact import (
    BITS,
    FAST,
    MEDIUM,
    QuantCase,
    check_quantizer_output,
    exact,
    pow2,
    quant_cases,
    ref_frac_bits,
    ref_int32_top,
    ref_quantize_bias,
    ref_round,
)
from hypothesis import given
from hypothesis import strategies as st

import quant
from integer import fixed_point

# ============================================================================================
# 1. The quantizer: quant.tqt_fake_quant (both paths) and its gradients
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
