"""Property-based tests (hypothesis) of the exact integer accumulation: integer/accumulation.py
(check_exact's 2^53 bound, bias_dtype) and the exact-GEMM planner and matmul of
integer/matmul_engine.py (IntTransformer._plan, dense, matmul), against int64 arithmetic and the
references of tests/exact.py; the int32 bias rules.

NumPy only (no TensorFlow import here, directly or through the modules imported)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from exact import BITS, MEDIUM, ROUNDINGS, ref_float32_chunk, ref_float64_exact, ref_gemm, ref_range
from hypothesis import example, given
from hypothesis import strategies as st

from integer import accumulation, fixed_point, matmul_engine

# ============================================================================================
# The exact-GEMM planner of the integer engine
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
