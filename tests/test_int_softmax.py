"""Integer softmax (kernels.exp_neg, kernels.softmax): I-BERT's i-exp on power-of-two grids against
math.exp and a float64 softmax with stated error bounds, against a Python-integer spec, and the TF
twins (integer_tf/kernels_tf.py) against NumPy bit for bit."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels, token_ids
from integer_tf import kernels_tf

PROPERTY = settings(max_examples=150, deadline=None, database=None)
F = kernels.EXP_F
A = Fraction(*kernels.EXP_A)  # exp_neg's result grid is A 2^-2F
# exp_neg vs exp: |e A 2^-2F - exp(v)| <= EXP_REL * exp(v) + A 2^-2F (the floor shift), F = 15.
# Measured: 3.10e-3 at z = 0 (the polynomial), 3.13e-3 over every z (q_ln2's rounding).
EXP_REL = 3.2e-3
# exp_neg's relative spread max/min - 1 (what normalization keeps): measured 5.574e-3 at z = 0.
EXP_SPREAD = 5.6e-3


def ln2_scaled(bits: int) -> int:
    """round(ln(2) 2^bits) in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        return int((Decimal(2).ln() * (2**bits)).to_integral_value())


def spec_exp_neg(x: int, f: int, big_f: int = F) -> int:
    """The algorithm in Python integers, from the constants' definitions (not integer/kernels.py's)."""
    q_ln2 = ln2_scaled(big_f)
    q_b, q_c = round(Fraction(1353, 1000) * 2**big_f), round(Fraction(344, 3585) * 10 * 2 ** (2 * big_f))
    x = max(x, -(2 ** max(6 + f, 0)))
    x = math.floor(Fraction(x) * Fraction(2) ** (big_f - f) + Fraction(1, 2))  # half up
    z = -x // q_ln2
    p = x + z * q_ln2
    return 0 if z > 62 else ((p + q_b) ** 2 + q_c) >> z


def float_softmax(q: np.ndarray, f: int, mask: np.ndarray) -> np.ndarray:
    """float64 softmax of q 2^-f over the last axis, masked positions excluded (0); 0 rows stay 0."""
    v = np.where(mask, q.astype(np.float64) * 2.0**-f, -np.inf)
    top = np.max(v, axis=-1, keepdims=True)
    w = np.where(mask, np.exp(v - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = np.sum(w, axis=-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def round_float(v: np.ndarray, rounding: str) -> np.ndarray:
    return fixed_point.round_to_integer(np.array(v, np.float64), rounding)


def check_softmax(q, f, mask, out_bits, rounding, big_f=F):
    """kernels.softmax == kernels_tf.softmax, its invariants and its error bound; returns its output."""
    out = kernels.softmax(q, f, mask, out_bits, rounding, big_f)
    assert out.dtype == np.int64
    tf_mask = None if mask is None else tf.constant(mask)
    # int64 scores, and float64 ones (TF's float64 route) with the grid as an int and as a tensor
    for scores, grid in ((tf.constant(q, tf.int64), f), (tf.constant(q, tf.float64), f),
                         (tf.constant(q, tf.float64), tf.constant(f, tf.int64))):
        twin = kernels_tf.softmax(scores, grid, tf_mask, out_bits, rounding, big_f)
        assert twin.dtype == tf.int64
        np.testing.assert_array_equal(twin.numpy(), out)
    full_mask = np.broadcast_to(np.ones((), bool) if mask is None else mask, out.shape)
    assert np.all(out[~full_mask] == 0)  # masked: exactly 0
    assert out.min() >= 0 and out.max() <= 2**out_bits - 1
    p = float_softmax(np.broadcast_to(q, out.shape), f, full_mask)
    units = 2.0**out_bits
    # one unit for R (or for the clip at p ~ 1), plus exp_neg's spread through the normalization
    bound = 1 + units * (p * (1 - p) * EXP_SPREAD + 1e-4)
    assert np.all(np.abs(out - p * units) <= bound), np.abs(out - p * units).max()
    ref = np.clip(round_float(p * units, rounding), 0, units - 1)
    if out_bits <= 8 and rounding != "floor":  # p's error < 0.4 units: within 1 of the rounded float
        assert np.abs(out - ref).max() <= 1
    return out


# -------------------------------------------------------------------------------------------- constants


def test_the_hard_coded_constants_are_the_rounded_real_numbers():
    assert kernels.LN2_Q64 == ln2_scaled(64)
    assert Fraction(*kernels.EXP_A) == Fraction("0.3585")
    assert Fraction(*kernels.EXP_B) == Fraction("1.353")
    assert Fraction(*kernels.EXP_C_OVER_A) == Fraction("0.344") / Fraction("0.3585")
    for big_f in range(1, kernels.EXP_F_MAX + 1):
        q_ln2, q_b, q_c = kernels.exp_constants(big_f)
        assert q_ln2 == ln2_scaled(big_f) == round(math.log(2) * 2**big_f)
        assert q_b == round(Fraction("1.353") * 2**big_f)
        assert q_c == round(Fraction("0.344") / Fraction("0.3585") * 2 ** (2 * big_f))
        assert kernels.exp_max(big_f) == q_b**2 + q_c < 2 ** (2 * big_f + 2)
        assert kernels.exp_neg(np.array([0]), big_f, big_f).tolist() == [kernels.exp_max(big_f)]
    assert kernels.exp_constants() == (22713, 44335, 1030312936)  # F = 15, the default
    assert kernels.exp_max() < 2**31.5


# -------------------------------------------------------------------------------------------- exp_neg


@PROPERTY
@given(data=st.data(), f=st.integers(-6, 24), big_f=st.sampled_from([F, 10, 12, 16, 20]))
def test_exp_neg_is_the_integer_spec_and_its_tf_twin(data, f, big_f):
    mags = st.one_of(st.integers(0, 2**17), st.integers(0, 2 ** (f + 7)), st.integers(0, 2**62))
    x = [-m for m in data.draw(st.lists(mags, min_size=1, max_size=30))]
    got = kernels.exp_neg(np.array(x, np.int64), f, big_f)
    assert got.dtype == np.int64
    assert got.tolist() == [spec_exp_neg(v, f, big_f) for v in x]
    twin = kernels_tf.exp_neg(tf.constant(x, tf.int64), f, big_f)
    assert twin.dtype == tf.int64
    np.testing.assert_array_equal(twin.numpy(), got)


def exp_error_excess(x: np.ndarray, f: int) -> float:
    """max over x of (|e A 2^-2F - exp(v)| - A 2^-2F) / exp(v), v = x 2^-f: the relative error
    beyond the floor shift's absolute one (<= EXP_REL states the bound)."""
    e = kernels.exp_neg(x, f).astype(np.float64) * float(A) * 2.0 ** (-2 * F)
    v = np.exp(x.astype(np.float64) * 2.0**-f)
    keep = v > 1e-300  # the rest is 0 (or denormal) in float64; e is 0 there
    return float(np.max((np.abs(e - v)[keep] - float(A) * 2.0 ** (-2 * F)) / v[keep]))


def test_exp_neg_against_math_exp_over_a_sweep():
    q_ln2 = kernels.exp_constants()[0]
    # every p on grid F (z = 0) and z = 1: the polynomial's error, measured 3.10e-3
    x = np.arange(-2 * q_ln2, 1)
    e = kernels.exp_neg(x, F).astype(np.float64) * float(A) * 2.0 ** (-2 * F)
    rel = e / np.exp(x * 2.0**-F)
    assert 3.0e-3 < np.abs(rel - 1).max() <= 3.11e-3
    assert rel.max() / rel.min() - 1 <= EXP_SPREAD
    # every z up to the point where e is 0: q_ln2's rounding grows the error with z
    assert exp_error_excess(np.arange(-40 * q_ln2, 1, 7), F) <= EXP_REL
    for f in (-6, -3, 0, 1, 4, 8, 12, 15, 16, 20, 24):  # f > F rounds x onto grid F
        lo = -(2**15) if f <= 0 else -(2 ** (f + 6))  # down to the clamp at -64 (or 16-bit scores)
        sweep = np.unique(np.concatenate([np.arange(-200, 1), np.linspace(lo, 0, 4001).astype(np.int64),
                                          [lo, -(2**15), -(2**16), -(2**16 + 2**15), -(2**62)]]))
        assert exp_error_excess(sweep, f) <= EXP_REL, f
        got = kernels.exp_neg(sweep, f)
        assert got[-1] == kernels.exp_max()  # x = 0: exp(0) = 1 = exp_max A 2^-2F (1 + 3.1e-3)
        assert got[0] == 0  # the huge negatives give 0
    assert kernels.exp_neg(np.array([-1]), 24).tolist() == [kernels.exp_max()]  # -2^-24 rounds to 0


def test_exp_neg_at_the_shift_cap():
    q_ln2 = kernels.exp_constants()[0]
    x = -np.array([30, 31, 32, 33, 61, 62, 63, 64]) * q_ln2  # p = 0: e = exp_max >> z
    np.testing.assert_array_equal(kernels.exp_neg(x, F), [kernels.exp_max() >> z for z in (30, 31)] + [0] * 6)
    assert kernels.exp_max() >> 31 == 1
    assert kernels.exp_max(kernels.EXP_F_MAX) >> kernels.EXP_SHIFT_CAP == 0  # the capped shift gives 0
    np.testing.assert_array_equal(kernels_tf.exp_neg(tf.constant(x), F).numpy(), kernels.exp_neg(x, F))
    # the clamp at -64: below it everything is 0, as exp(-64) is on the grid 2^-30
    assert kernels.exp_neg(np.array([-(2**62), -(64 << 12)]), 12).tolist() == [0, 0]


def test_exp_neg_domain():
    with pytest.raises(ValueError, match="x <= 0"):
        kernels.exp_neg(np.array([0, 1]), 4)
    with pytest.raises(TypeError, match="integer"):
        kernels.exp_neg(np.array([-1.0]), 4)
    with pytest.raises(TypeError, match="integer"):
        kernels_tf.exp_neg(tf.constant([-1.0]), 4)
    for f, big_f in ((57, F), (F - 63, F), (4, 0), (4, 31), (4.0, F)):
        with pytest.raises(ValueError, match="grid"):
            kernels.exp_neg(np.array([-1]), f, big_f)


# -------------------------------------------------------------------------------------------- softmax

ROWS = st.integers(1, 4)


@st.composite
def softmax_case(draw):
    rows, length = draw(ROWS), draw(st.integers(1, 70))
    bits, f = draw(st.integers(8, 16)), draw(st.integers(0, 12))
    lo, hi = fixed_point.integer_range(bits, True)
    q = np.array(draw(st.lists(st.integers(lo, hi), min_size=rows * length, max_size=rows * length)),
                 np.int64).reshape(rows, length)
    mask = np.array(draw(st.lists(st.booleans(), min_size=rows * length, max_size=rows * length)),
                    bool).reshape(rows, length)
    kind = draw(st.sampled_from(["random", "all_but_one", "none_masked", "fully_masked_row"]))
    if kind == "all_but_one":
        mask[:] = False
        mask[np.arange(rows), draw(st.integers(0, length - 1))] = True
    elif kind == "none_masked":
        mask = None
    elif kind == "fully_masked_row":
        mask[draw(st.integers(0, rows - 1))] = False
    return q, f, mask, draw(st.integers(4, 16)), draw(st.sampled_from(fixed_point.ROUNDINGS))


@PROPERTY
@given(case=softmax_case())
def test_softmax_numpy_and_tf_twin_agree_bit_for_bit_within_the_bound(case):
    q, f, mask, out_bits, rounding = case
    out = check_softmax(q, f, mask, out_bits, rounding)
    if mask is not None:
        np.testing.assert_array_equal(out[~mask.any(axis=-1)], 0)  # fully masked rows: zeros
        one = mask.sum(axis=-1) == 1  # the one unmasked position takes all: 2^b after the clip
        np.testing.assert_array_equal(out[one].sum(axis=-1), 2**out_bits - 1)


@pytest.mark.parametrize("rounding", fixed_point.ROUNDINGS)
@pytest.mark.parametrize("out_bits", [4, 8, 12, 16])
def test_softmax_against_float64_over_the_extremes(out_bits, rounding):
    top = 2**out_bits - 1
    for length in (1, 2, 3, 7, 64):  # constant rows: uniform R(2^b / L), exactly
        out = check_softmax(np.full((2, length), 37), 5, None, out_bits, rounding)
        uniform = min(int(round_float(2.0**out_bits / length, rounding)), top)
        np.testing.assert_array_equal(out, uniform)
    lo, hi = fixed_point.integer_range(16, True)
    huge = np.array([[hi, 0, lo, 5], [lo, lo, hi, lo]])  # one huge value: one-hot
    np.testing.assert_array_equal(check_softmax(huge, 0, None, out_bits, rounding),
                                  [[top, 0, 0, 0], [0, 0, top, 0]])
    mask = np.array([[False, True, False, False], [True, False, False, False]])
    np.testing.assert_array_equal(check_softmax(huge, 8, mask, out_bits, rounding),
                                  [[0, top, 0, 0], [top, 0, 0, 0]])  # all but one masked
    big = 2**62 - 1  # the largest scores softmax takes: q - m = 2^63 - 2 still fits
    np.testing.assert_array_equal(check_softmax(np.array([[big, -big, big]]), 40, None, out_bits, rounding),
                                  [[round_float(2.0 ** (out_bits - 1), rounding), 0,
                                    round_float(2.0 ** (out_bits - 1), rounding)]])
    np.testing.assert_array_equal(check_softmax(np.array([[lo], [hi]]), 3, np.array([[True], [False]]),
                                                out_bits, rounding), [[top], [0]])  # length 1
    rng = np.random.default_rng(out_bits)
    for bits, f in ((8, 0), (8, 4), (12, 8), (16, 12), (16, 0), (16, 20)):
        n, p = fixed_point.integer_range(bits, True)
        q = rng.integers(n, p + 1, (16, 33))
        q[:8] = rng.integers(-(2 ** (f + 3)), 2 ** (f + 3), (8, 33)).clip(n, p)  # spread over +-8
        check_softmax(q, f, rng.random((16, 33)) < 0.8, out_bits, rounding)
        check_softmax(q, f, None, out_bits, rounding)


def test_softmax_float_error_measured():
    """The worst error over a dense sweep of small-spread rows stays inside the stated bound and
    is as large as the polynomial's spread predicts (so the bound is not vacuous)."""
    rng = np.random.default_rng(0)
    q = rng.integers(-(2**12), 2**12, (4000, 8))  # f = 10: values in [-4, 4]
    out = kernels.softmax(q, 10, None, 16, "half_even")
    p = float_softmax(q, 10, np.ones(q.shape, bool))
    err = np.abs(out - p * 2**16) / 2**16
    assert err.max() <= 1.4e-3 + 1e-4 + 2**-16
    assert err.max() > 4e-4  # the polynomial's error shows at 16 bits


def test_softmax_model_mask_shapes():
    rng = np.random.default_rng(1)
    q = rng.integers(-300, 300, (2, 3, 5, 5))
    padding = np.ones((2, 1, 1, 5), bool)
    padding[1, ..., 3:] = False  # the second sequence has 3 tokens
    causal = np.tril(np.ones((5, 5), bool))
    for mask in (padding, causal, padding & causal):
        out = check_softmax(q, 6, mask, 8, "half_even")
        full = np.broadcast_to(mask, q.shape)
        for index in np.ndindex(*q.shape[:-1]):  # row by row with a 1-D mask: the same integers
            row = kernels.softmax(q[index], 6, full[index], 8, "half_even")
            np.testing.assert_array_equal(row, out[index])
    np.testing.assert_array_equal(check_softmax(q, 6, causal, 8, "half_even")[..., 0, 0], 255)
    # no mask (None, the engine's cached decoder step) is every key visible, in one pass less
    everyone = np.ones(q.shape, bool)
    for m in (1, 32):
        np.testing.assert_array_equal(kernels.softmax_exps(q.astype(np.int32), 6, None, m=m),
                                      kernels.softmax_exps(q, 6, everyone, m=m))


@pytest.mark.parametrize("m", [1, 64])
def test_softmax_takes_float64_only_on_grids_where_it_is_exact(m, monkeypatch):
    """Float64 scores go through TF's float64 route up to f = SOFTMAX_FLOAT64_MAX_F - h, the int64
    route above (exp's clamp would pass 2^51), with the same integers as the spec on both sides
    (scores up to 2^60, differences past 2^53), and int64 scores never take it."""
    h = kernels._check_scale(m)
    max_f = kernels_tf.SOFTMAX_FLOAT64_MAX_F - h
    rng = np.random.default_rng(m)
    q = rng.integers(-(2**60), 2**60, (6, 9)) >> rng.integers(0, 60, (6, 9))
    q = q.astype(np.float64).astype(np.int64)  # integers that float64 holds
    mask = rng.random((6, 9)) < 0.8
    taken = []
    real = kernels_tf._softmax_float64
    monkeypatch.setattr(kernels_tf, "_softmax_float64", lambda *a: taken.append(a[1]) or real(*a))
    for f in (max_f - 1, max_f, max_f + 1, max_f + 8):
        for grid in (f, tf.constant(f, tf.int64)):
            out = kernels.softmax(q, f, mask, 8, "half_even", m=m)
            scores = tf.constant(q, tf.float64)
            twin = kernels_tf.softmax(scores, grid, tf.constant(mask), 8, "half_even", m=m)
            np.testing.assert_array_equal(twin.numpy(), out)
        kernels_tf.softmax(tf.constant(q), f, tf.constant(mask), 8, "half_even", m=m)
    assert sorted({int(f) for f in taken}) == [max_f - 1, max_f]
    # a caller that has decided the grid's bound for a whole graph (a decoding) says so
    taken.clear()
    for grid_fits in (False, True):
        kernels_tf.softmax(tf.constant(q, tf.float64), tf.constant(max_f - 1, tf.int64), tf.constant(mask), 8,
                           "half_even", m=m, grid_fits_float64=grid_fits)
    assert len(taken) == 1


def test_softmax_rejects_floats_and_additive_masks():
    q = np.array([[1, 2, 3]])
    with pytest.raises(TypeError, match="integer"):
        kernels.softmax(q.astype(np.float32), 4, None, 8, "floor")
    with pytest.raises(TypeError, match="integer"):
        kernels_tf.softmax(tf.constant(q, tf.float32), 4, None, 8, "floor")
    additive = np.array([[0.0, token_ids.NEG_INF, 0.0]])  # the float model's mask: not a selection
    with pytest.raises(TypeError, match="bool"):
        kernels.softmax(q, 4, additive, 8, "floor")
    with pytest.raises(TypeError, match="bool"):
        kernels_tf.softmax(tf.constant(q), 4, tf.constant(additive), 8, "floor")
    with pytest.raises(ValueError, match="2\\^62"):
        kernels.softmax(np.array([[2**62]]), 4, None, 8, "floor")
    with pytest.raises(ValueError, match="num_bits"):
        kernels.softmax(q, 4, None, 17, "floor")
    with pytest.raises(ValueError, match="overflows"):
        kernels.softmax(q, 4, None, 16, "floor", 22)  # exp_max << 17 >= 2^62
    with pytest.raises(ValueError, match="overflows"):
        kernels.softmax(np.zeros((1, 2**13), np.int64), 4, None, 8, "floor", 24)  # the row sum


# -------------------------------------------------------------------------------------------- scaled: m


SCALES = (1, 2, 8, 64, 3)


def scaled_constants(big_f: int, m: int) -> tuple[int, int, int]:
    """(round(ln2 sqrt(m) 2^F), round(1.353 sqrt(m) 2^F), round(0.344/0.3585 m 2^2F)) in 80-digit
    decimal arithmetic (no exact tie can occur: sqrt(m) ln2 is irrational, 3585 is odd)."""
    with localcontext() as ctx:
        ctx.prec = 80
        root = Decimal(m).sqrt()
        q_ln2 = (Decimal(2).ln() * root * 2**big_f).to_integral_value(ROUND_HALF_UP)
        q_b = (Decimal("1.353") * root * 2**big_f).to_integral_value(ROUND_HALF_UP)
    return int(q_ln2), int(q_b), round(Fraction("0.344") / Fraction("0.3585") * m * 2 ** (2 * big_f))


@pytest.mark.parametrize("m", SCALES)
def test_scaled_exp_constants_are_the_rounded_real_numbers(m):
    for big_f in (1, 8, 12, F, 20, 27):
        assert kernels.exp_constants(big_f, m) == scaled_constants(big_f, m), big_f
        q_ln2, q_b, q_c = kernels.exp_constants(big_f, m)
        assert kernels.exp_max(big_f, m) == q_b**2 + q_c < m * 2 ** (2 * big_f + 2)
    assert kernels.exp_constants(F, 1) == kernels.exp_constants(F)
    assert kernels.exp_constants(F, 64)[0] == kernels.exp_constants(F + 3)[0]  # sqrt(64) = 2^3: a shift
    for bad in (0, -4, 2.0, kernels.EXP_M_MAX + 1):
        with pytest.raises(ValueError, match="scale divisor"):
            kernels.exp_constants(F, bad)


def float_softmax_scaled(q: np.ndarray, f: int, mask: np.ndarray, m: int) -> np.ndarray:
    """float64 softmax of q 2^-f / sqrt(m), masked positions 0 (float_softmax with the scaling)."""
    v = np.where(mask, q.astype(np.float64) * 2.0**-f / math.sqrt(m), -np.inf)
    top = np.max(v, axis=-1, keepdims=True)
    w = np.where(mask, np.exp(v - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = np.sum(w, axis=-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


@pytest.mark.parametrize("m", SCALES)
def test_scaled_exp_neg_against_math_exp(m):
    """e A 2^-2F / m ~ exp(v / sqrt(m)) within the bound of the unscaled kernel (EXP_REL)."""
    q_ln2 = kernels.exp_constants(F, m)[0]
    for f in (0, 6, F):
        x = np.unique(np.concatenate([np.arange(-2 * q_ln2, 1), np.arange(-40 * q_ln2, 1, 97)]))
        x = np.maximum(x, -(2 ** (f + 9)))  # value >= -512
        e = kernels.exp_neg(x, f, F, m).astype(np.float64) * float(A) * 2.0 ** (-2 * F) / m
        v = np.exp(x * 2.0**-f / math.sqrt(m))
        keep = v > 1e-300
        assert np.max((np.abs(e - v)[keep] - float(A) * 2.0 ** (-2 * F) / m) / v[keep]) <= EXP_REL, f
        assert e[-1] == kernels.exp_max(F, m) * float(A) * 2.0 ** (-2 * F) / m  # x = 0
        twin = kernels_tf.exp_neg(tf.constant(x, tf.int64), f, F, m)
        np.testing.assert_array_equal(twin.numpy(), kernels.exp_neg(x, f, F, m))


@pytest.mark.parametrize("m", SCALES)
@pytest.mark.parametrize("out_bits, rounding", [(8, "half_even"), (16, "half_up"), (12, "floor")])
def test_scaled_softmax_within_the_bound_and_twin_equal(m, out_bits, rounding):
    rng = np.random.default_rng(m * 100 + out_bits)
    units = 2.0**out_bits
    for f, bits in ((0, 8), (4, 12), (8, 16), (12, 16)):
        n, p = fixed_point.integer_range(bits, True)
        q = rng.integers(n, p + 1, (12, 17))
        spread = 2 ** (f + 3) * math.isqrt(m)  # scores spread over +-8 sqrt(m): values that matter
        q[:8] = rng.integers(-spread, spread + 1, (8, 17)).clip(n, p)
        mask = rng.random((12, 17)) < 0.7
        mask[0] = False  # a fully masked row
        mask[1] = np.arange(17) == 5  # a single visible key
        mask[2] = True
        out = kernels.softmax(q, f, mask, out_bits, rounding, m=m)
        assert out.dtype == np.int64
        for scores in (tf.constant(q, tf.int64), tf.constant(q, tf.float64)):
            grid = tf.constant(f, tf.int64)
            twin = kernels_tf.softmax(scores, grid, tf.constant(mask), out_bits, rounding, m=m)
            assert twin.dtype == tf.int64
            np.testing.assert_array_equal(twin.numpy(), out)
        np.testing.assert_array_equal(out[~mask], 0)
        np.testing.assert_array_equal(out[0], 0)
        np.testing.assert_array_equal(out[1], np.where(mask[1], units - 1, 0))
        prob = float_softmax_scaled(q, f, mask, m)
        bound = 1 + units * (prob * (1 - prob) * EXP_SPREAD + 1e-4)
        assert np.all(np.abs(out - prob * units) <= bound), (f, np.abs(out - prob * units).max())
        if m > 1:  # the scaling matters: without it the rows are far off
            unscaled = float_softmax_scaled(q, f, mask, 1)
            assert np.max(np.abs(out - unscaled * units)) > 4 * np.max(bound)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_scale_four_to_the_k_is_k_more_fractional_bits(k):
    """m = 4^k: x / sqrt(m) = x 2^-k, so softmax(q, f, m=4^k) on F is softmax(q, f + k) on F + k,
    integer for integer (constants, clamp and shifts all agree)."""
    rng = np.random.default_rng(k)
    q = rng.integers(-(2**12), 2**12, (6, 23))
    mask = rng.random((6, 23)) < 0.8
    for f in (0, 5, 10):
        assert kernels.exp_constants(F, 4**k) == kernels.exp_constants(F + k)
        np.testing.assert_array_equal(kernels.softmax(q, f, mask, 12, "half_even", F, 4**k),
                                      kernels.softmax(q, f + k, mask, 12, "half_even", F + k))
        x = np.minimum(q - q.max(), 0)
        np.testing.assert_array_equal(kernels.exp_neg(x, f, F, 4**k), kernels.exp_neg(x, f + k, F + k))
