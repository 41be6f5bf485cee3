"""Edges of the integer kernels (integer/kernels.py) that the other kernel tests leave open: shift_round
with an array of shifts under every rounding and at its +-62 bound, softmax's lower score bound and the
width checks of softmax_exps, exp_neg and softmax with a large scale divisor m, exp_neg's input grid
range with m > 1, LayerNorm on constant rows and eps_q at 2^32.

NumPy only (no TensorFlow import here): every expected value comes from an exact reference written
with Python integers, Fraction and Decimal from the definitions in docs/integer_only.md, never from
the kernels themselves."""

from __future__ import annotations

import functools
import math
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from exact import ref_round
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels

PROPERTY = settings(max_examples=60, deadline=None, database=None)
ROUNDINGS = ("half_even", "half_up", "floor")
F = 15  # the documented default internal grid of exp_neg


# ---- exact references ------------------------------------------------------------------------------


def ref_shift(q: int, k: int, rounding: str) -> int:
    """R(q 2^-k) for any integer k (k <= 0: the exact q 2^-k)."""
    return ref_round(Fraction(q) / Fraction(2) ** k, rounding)


@functools.cache
def ref_constants(big_f: int, m: int) -> tuple[int, int, int]:
    """(round(ln2 sqrt(m) 2^F), round(1.353 sqrt(m) 2^F), round(0.344 / 0.3585 m 2^2F)), half up, in
    100-digit decimal arithmetic and exact fractions (the definitions, not the kernel's integers)."""
    with localcontext() as ctx:
        ctx.prec = 100
        root = Decimal(m).sqrt()
        q_ln2 = int((Decimal(2).ln() * root * 2**big_f).to_integral_value(ROUND_HALF_UP))
        q_b = int((Decimal("1.353") * root * 2**big_f).to_integral_value(ROUND_HALF_UP))
    q_c = ref_round(Fraction("0.344") / Fraction("0.3585") * m * 2 ** (2 * big_f), "half_up")
    return q_ln2, q_b, q_c


def ref_exp_max(big_f: int, m: int) -> int:
    _, q_b, q_c = ref_constants(big_f, m)
    return q_b * q_b + q_c


def ref_exp_neg(x: int, f: int, big_f: int = F, m: int = 1) -> int:
    """I-BERT's i-exp of the value x 2^-f / sqrt(m) <= 0 in unbounded Python integers: x rounded half
    up onto grid F, z = (-x) // q_ln2, p = x + z q_ln2, e = ((p + q_b)^2 + q_c) >> z. No clamp and no
    shift cap: the kernel's clamp at -64 2^h and its cap z <= 62 only cut where e is already 0."""
    q_ln2, q_b, q_c = ref_constants(big_f, m)
    x = ref_shift(x, f - big_f, "half_up")
    z = -x // q_ln2
    p = x + z * q_ln2
    return ((p + q_b) ** 2 + q_c) >> z if z < 256 else 0


def ref_softmax_row(q: list[int], visible: list[bool], f: int, out_bits: int, rounding: str,
                    big_f: int = F, m: int = 1) -> list[int]:
    """clip(R(e 2^b / S), 0, 2^b - 1), e = exp(q - top) over the visible keys and 0 elsewhere."""
    if not any(visible):
        return [0] * len(q)
    top = max(x for x, v in zip(q, visible) if v)
    e = [ref_exp_neg(x - top, f, big_f, m) if v else 0 for x, v in zip(q, visible)]
    total = sum(e)
    return [min(max(ref_round(Fraction(ei << out_bits, total), rounding), 0), 2**out_bits - 1) for ei in e]


def ref_h(m: int) -> int:
    """The clamp's extra range 2^h ~ sqrt(m): h = floor(bitlength(m) / 2) (docs: -64 2^floor(bitlen(m)/2))."""
    return m.bit_length() // 2


def deep_inputs(f: int, m: int) -> list[int]:
    """x <= 0 on grid f whose value x 2^-f / sqrt(m) runs from 0 down past the clamp at -64 2^h (and
    the ends of int64): the last nonzero e, the values a too-narrow clamp would lift, the clamp itself."""
    root = Fraction(math.isqrt(m << 40), 2**20)  # sqrt(m) to 2^-20
    values = [0, 1, 2, 5, 10, 16, 20, 22, 25, 30, 32, 40, 43, 44, 45, 48, 60, 63, 64, 65, 70, 90, 128, 1000]
    x = [-math.floor(v * root * Fraction(2) ** f) for v in values]
    clamp = 64 << ref_h(m)  # the clamp (value) and around it, exactly on grid f
    x += [-math.floor(c * Fraction(2) ** f) for c in (clamp, clamp + 1, clamp - 1, clamp // 2, clamp // 4)]
    x += [-1, -2, -(2**62), -(2**63 - 1), -(2**63)]
    return sorted({min(max(v, -(2**63)), 0) for v in x})


# ---- shift_round with an array of shifts ----------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_shift_round_array_of_shifts_on_ties_and_signs(rounding):
    """Per-element shifts 1..5 on every tie q = (2j + 1) 2^(k-1) (odd and even floors, both signs)
    and on its neighbours, beside zero and negative shifts in the same array."""
    q, k = [], []
    for shift in range(1, 6):
        for j in range(-5, 5):
            tie = (2 * j + 1) << (shift - 1)
            q += [tie - 1, tie, tie + 1]
            k += [shift] * 3
    q += [5, -5, 6, 7, -7, 0, 3, -3, 1, -1]
    k += [1, 1, 2, 0, 0, 0, -3, -3, -62, -62]
    got = kernels.shift_round(np.array(q), np.array(k), rounding)
    assert got.dtype == np.int64
    assert got.tolist() == [ref_shift(a, b, rounding) for a, b in zip(q, k)]


def test_shift_round_array_of_shifts_hand_values():
    q, k = np.array([5, -5, 6, 6, -6, 12, 12]), np.array([1, 1, 2, 1, 2, 3, -1])
    # 2.5, -2.5, 1.5, 3, -1.5, 1.5, 24
    assert kernels.shift_round(q, k, "half_up").tolist() == [3, -2, 2, 3, -1, 2, 24]
    assert kernels.shift_round(q, k, "half_even").tolist() == [2, -2, 2, 3, -2, 2, 24]
    assert kernels.shift_round(q, k, "floor").tolist() == [2, -3, 1, 3, -2, 1, 24]


@PROPERTY
@given(data=st.data(), rounding=st.sampled_from(ROUNDINGS))
def test_shift_round_array_of_shifts_is_the_rounded_scaling(data, rounding):
    n = data.draw(st.integers(1, 24))
    shifts = st.one_of(st.integers(-4, 6), st.integers(-20, 62))
    k = data.draw(st.lists(shifts, min_size=n, max_size=n))
    # small values hit the ties; a left shift by <= 20 keeps 2^40 inside int64
    values = st.one_of(st.integers(-64, 64), st.integers(-(2**40), 2**40))
    q = data.draw(st.lists(values, min_size=n, max_size=n))
    got = kernels.shift_round(np.array(q, np.int64), np.array(k, np.int64), rounding)
    assert got.tolist() == [ref_shift(a, b, rounding) for a, b in zip(q, k)]
    # a 32-bit lane with an array of shifts: the same integers, in int64
    small = [max(min(a, 2**30 - 1), -(2**30)) for a in q]
    lane = kernels.shift_round(np.array(small, np.int32), np.array(k), rounding)
    assert lane.tolist() == [ref_shift(a, b, rounding) for a, b in zip(small, k)]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_shift_round_array_of_shifts_broadcasts(rounding):
    q = np.arange(-12, 13).reshape(5, 5) * 3
    k = np.array([-2, 0, 1, 2, 3])  # one shift per column
    got = kernels.shift_round(q, k, rounding)
    assert got.shape == (5, 5)
    assert got.tolist() == [[ref_shift(int(v), int(s), rounding) for v, s in zip(row, k)] for row in q]
    col = kernels.shift_round(np.array([[6], [-6]]), k, rounding)  # q broadcasts against k
    assert col.tolist() == [[ref_shift(v, int(s), rounding) for s in k] for v in (6, -6)]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_shift_round_shift_range_is_62_both_ways(rounding):
    """|k| <= 62 is accepted (scalar and array), exact at the extremes of q; |k| = 63 raises."""
    top = [0, 1, -1, 2**61, -(2**61), 2**61 + 1, -(2**61) - 1, 3 << 60, -(3 << 60), 2**62 - 1, -(2**62),
           2**62, 1 - 2**62]
    expected = [ref_shift(v, 62, rounding) for v in top]
    assert kernels.shift_round(np.array(top), np.full(len(top), 62), rounding).tolist() == expected
    assert kernels.shift_round(np.array(top), 62, rounding).tolist() == expected
    left = [0, 1, -1, -2]  # k = -62: 2^62, -2^62, -2^63 still in int64
    expected = [v << 62 for v in left]
    assert kernels.shift_round(np.array(left), np.full(4, -62), rounding).tolist() == expected
    assert kernels.shift_round(np.array(left), -62, rounding).tolist() == expected
    mixed = kernels.shift_round(np.array([2**62 - 1, 1, -3]), np.array([62, -62, 1]), rounding)
    assert mixed.tolist() == [ref_shift(2**62 - 1, 62, rounding), 2**62, ref_shift(-3, 1, rounding)]
    for bad in (63, -63):
        with pytest.raises(ValueError, match="^shift_round shifts by at most 62 bits$"):
            kernels.shift_round(np.array([1, 1]), np.array([0, bad]), rounding)
        with pytest.raises(ValueError, match="^shift_round shifts by at most 62 bits$"):
            kernels.shift_round(np.array([1, 1]), bad, rounding)


# ---- softmax's inputs and widths ------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_softmax_score_bounds_both_ways(rounding):
    """|q| < 2^62: -(2^62) + 1 and 2^62 - 1 are accepted (exactly: one-hot), -(2^62) and 2^62 raise."""
    low, high = -(2**62) + 1, 2**62 - 1
    for row in ([low, high], [low, 0], [low, low + 1], [low]):
        got = kernels.softmax(np.array([row]), 0, None, 8, rounding)
        assert got.tolist() == [ref_softmax_row(row, [True] * len(row), 0, 8, rounding)]
    assert kernels.softmax(np.array([[low, 5]]), 0, None, 8, rounding).tolist() == [[0, 255]]
    for bad in (-(2**62), 2**62, -(2**63)):
        with pytest.raises(ValueError, match=r"^softmax takes scores \|q\| < 2\^62$"):
            kernels.softmax(np.array([[0, bad]]), 0, None, 8, rounding)


def longest_row(big_f: int, m: int) -> int:
    """The longest row whose sum length * exp_max stays below 2^62."""
    return (2**62 - 1) // ref_exp_max(big_f, m)


@pytest.mark.parametrize("big_f, m", [(27, 1), (24, 3), (20, 1024)])
def test_softmax_exps_row_sum_width_at_its_bound(big_f, m):
    """softmax_exps (called directly by the engine) takes a row of L* = floor((2^62 - 1) / exp_max)
    keys and refuses L* + 1: each e at x = 0 is exp_max exactly, so L* of them is the widest sum."""
    x = [0, -5, -(3 << 14)]  # the defaults: F = 15, m = 1
    assert kernels.softmax_exps(np.array([x]), 0, None).tolist() == [[ref_exp_neg(v, 0) for v in x]]
    top = ref_exp_max(big_f, m)
    length = longest_row(big_f, m)
    assert length * top < 2**62 <= (length + 1) * top and length >= 2  # the bound itself is exercised
    q = np.zeros((2, 1, length), np.int64)
    for mask in (None, np.ones(q.shape, bool)):
        got = kernels.softmax_exps(q, 0, mask, big_f, m)
        assert got.shape == q.shape and np.all(got == top)
        assert int(got[0, 0].sum()) < 2**62
        with pytest.raises(ValueError, match="overflows the int64 sum"):
            kernels.softmax_exps(np.zeros((2, 1, length + 1), np.int64), 0,
                                 None if mask is None else np.ones((2, 1, length + 1), bool), big_f, m)


def test_softmax_row_sum_width_at_its_bound():
    big_f, m, out_bits = 27, 1, 4  # exp_max < 2^56: out_bits <= 5 pass the division's check
    length = longest_row(big_f, m)
    got = kernels.softmax(np.zeros((1, length), np.int64), 3, None, out_bits, "half_even", big_f, m)
    expected = ref_softmax_row([0] * length, [True] * length, 3, out_bits, "half_even", big_f, m)
    assert got.tolist() == [expected]
    with pytest.raises(ValueError, match="overflows the int64 sum"):
        kernels.softmax(np.zeros((1, length + 1), np.int64), 3, None, out_bits, "half_even", big_f, m)


def largest_m(big_f: int, limit: int) -> int:
    """The largest m in 1..2^20 with exp_max(F, m) < limit (exp_max grows with m: a bisection)."""
    lo, hi = 1, kernels.EXP_M_MAX
    assert ref_exp_max(big_f, lo) < limit <= ref_exp_max(big_f, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ref_exp_max(big_f, mid) < limit else (lo, mid)
    return lo


def test_softmax_exps_division_width_at_its_bound():
    """softmax_exps checks exp_max << 1 < 2^62 (the numerator 2 (e << 0) + S of a one-key row): at
    F = 20 the largest m with exp_max < 2^61 passes (exactly), the next m raises."""
    m = largest_m(20, 2**61)
    top = ref_exp_max(20, m)
    assert top < 2**61 <= ref_exp_max(20, m + 1)
    for length in (1, 2):  # 2 exp_max < 2^62: the sum's check passes too
        got = kernels.softmax_exps(np.zeros((1, length), np.int64), 0, None, 20, m)
        assert got.tolist() == [[top] * length]
    x = np.array([[0, -(1 << 10)]])  # value -1024 / sqrt(m) ~ -1.18
    assert kernels.softmax_exps(x, 0, None, 20, m).tolist() == [[top, ref_exp_neg(-(1 << 10), 0, 20, m)]]
    with pytest.raises(ValueError, match="overflows the int64 division"):
        kernels.softmax_exps(np.zeros((1, 1), np.int64), 0, None, 20, m + 1)
    with pytest.raises(ValueError, match="overflows the int64 division"):
        kernels.softmax_exps(np.zeros((1, 1), np.int64), 0, np.ones((1, 1), bool), 20, m + 1)


def test_softmax_division_width_at_its_bound():
    """softmax checks exp_max << (out_bits + 1) < 2^62: out_bits = 16 at F = 15 takes m up to the
    largest with exp_max < 2^45; F = 22 takes out_bits 15, not 16."""
    m = largest_m(F, 2**45)
    row = [0, -(7 << 8), -(1 << 12), -(3 << 13)]
    for rounding in ROUNDINGS:
        got = kernels.softmax(np.array([row]), 8, None, 16, rounding, F, m)
        assert got.tolist() == [ref_softmax_row(row, [True] * 4, 8, 16, rounding, F, m)]
    with pytest.raises(ValueError, match="overflows the int64 division"):
        kernels.softmax(np.array([row]), 8, None, 16, "floor", F, m + 1)
    assert ref_exp_max(22, 1) << 16 < 2**62 <= ref_exp_max(22, 1) << 17
    got = kernels.softmax(np.array([row]), 12, None, 15, "half_up", 22)
    assert got.tolist() == [ref_softmax_row(row, [True] * 4, 12, 15, "half_up", 22)]
    with pytest.raises(ValueError, match="overflows the int64 division"):
        kernels.softmax(np.array([row]), 12, None, 16, "half_up", 22)


# ---- a large scale divisor m ----------------------------------------------------------------------

LARGE_M = (100, 1000, 1024, 2048, 4096, 3 << 11, 2**16 + 1, 2**20 - 1, 2**20)


def f_max(m: int) -> int:
    """The finest input grid exp_neg takes: 62 - 6 - h (docs: the clamp 2^(6 + h + f) fits int64)."""
    return 62 - 6 - ref_h(m)


@pytest.mark.parametrize("m", LARGE_M)
def test_exp_neg_with_a_large_scale_divisor_is_the_reference(m):
    """exp(x 2^-f / sqrt(m)) for m past 64 up to 2^20: the constants and every e, through 0 and past
    the clamp at -64 2^h (2^h ~ sqrt(m)), on coarse, default, fine and the finest grids."""
    assert kernels.exp_constants(F, m) == ref_constants(F, m)
    assert kernels.exp_max(F, m) == ref_exp_max(F, m)
    for f in (-4, 0, 7, F, 22, f_max(m)):
        x = deep_inputs(f, m)
        got = kernels.exp_neg(np.array(x, np.int64), f, F, m)
        assert got.dtype == np.int64
        assert got.tolist() == [ref_exp_neg(v, f, F, m) for v in x], f
    # the values down to -64 2^h that matter: e > 0 only above about -45 sqrt(m), and 0 below
    x = deep_inputs(4, m)
    e = [ref_exp_neg(v, 4, F, m) for v in x]
    assert e[-1] == ref_exp_max(F, m) and e[0] == 0 and 0 < sum(1 for v in e if v) < len(e)


@PROPERTY
@given(data=st.data(), m=st.sampled_from(LARGE_M), big_f=st.sampled_from([10, F, 18, 20]))
def test_exp_neg_large_m_random_inputs(data, m, big_f):
    f = data.draw(st.integers(big_f - 62, f_max(m)))
    span = 6 + ref_h(m) + max(f, 0)  # down to about the clamp, and all of int64 below it
    mags = st.one_of(st.integers(0, 2 ** min(span + 1, 63)), st.integers(0, 2**63))
    x = [-v for v in data.draw(st.lists(mags, min_size=1, max_size=12))]
    got = kernels.exp_neg(np.array(x, np.int64), f, big_f, m)
    assert got.tolist() == [ref_exp_neg(v, f, big_f, m) for v in x]


@pytest.mark.parametrize("m", [1024, 4096, 2**20])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_softmax_with_a_large_scale_divisor_is_the_reference(m, rounding):
    """Rows whose keys sit around the clamp of the scaled exp: exactly the reference softmax, masked
    keys and a fully masked row included (under errstate: no division by zero anywhere)."""
    f, out_bits = 4, 12 if m <= 4096 else 8  # exp_max(F, 2^20) << 13 would pass 2^62
    x = deep_inputs(f, m)
    x = [v for v in x if v > -(2**40)]
    rng = np.random.default_rng(m)
    rows = [x, x[::-1], [0] + x[:5], rng.permutation(x).tolist()]
    width = max(len(r) for r in rows)
    q = np.array([r + [0] * (width - len(r)) for r in rows] + [[3] * width], np.int64)
    visible = np.array([[True] * len(r) + [False] * (width - len(r)) for r in rows] + [[False] * width])
    visible[3, ::3] = False
    with np.errstate(all="raise"):
        got = kernels.softmax(q, f, visible, out_bits, rounding, F, m)
        exps = kernels.softmax_exps(q, f, visible, F, m)
        probs, sums = kernels.softmax_with_sums(q, f, visible, out_bits, rounding, F, m)
    expected = [ref_softmax_row(r.tolist(), v.tolist(), f, out_bits, rounding, F, m)
                for r, v in zip(q, visible)]
    assert got.tolist() == expected and probs.tolist() == expected
    assert exps[-1].tolist() == [0] * width
    assert sums.tolist() == [sum(row) for row in exps.tolist()]  # the engine observes these
    top = [max(int(a) for a, b in zip(r, v) if b) if v.any() else 0 for r, v in zip(q, visible)]
    assert exps.tolist() == [[ref_exp_neg(int(a) - t, f, F, m) if b else 0 for a, b in zip(r, v)]
                             for r, v, t in zip(q, visible, top)]


def test_scale_divisor_range():
    """m in 1..2^20 (an integer): 2^20 is accepted (exactly), 2^20 + 1 and 0 are not."""
    top = kernels.EXP_M_MAX
    assert top == 2**20
    assert kernels.exp_constants(F, top) == ref_constants(F, top)
    assert kernels.exp_neg(np.array([0, -(1 << 14)]), 4, F, top).tolist() == [
        ref_exp_neg(0, 4, F, top), ref_exp_neg(-(1 << 14), 4, F, top)]
    for bad in (0, top + 1, -1):
        with pytest.raises(ValueError, match="scale divisor"):
            kernels.exp_neg(np.array([0]), 4, F, bad)
        with pytest.raises(ValueError, match="scale divisor"):
            kernels.softmax(np.array([[0]]), 4, None, 8, "floor", F, bad)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 64, 1000, 1024, 4096, 2**20])
def test_exp_neg_input_grid_range_with_a_scale_divisor(m):
    """f in F - 62 .. 62 - 6 - h (h = floor(bitlength(m) / 2)): both ends accepted and exact, one past
    either end refused."""
    lo, hi = F - 62, f_max(m)
    for f in (lo, hi):
        x = deep_inputs(f, m)
        got = kernels.exp_neg(np.array(x, np.int64), f, F, m)
        assert got.tolist() == [ref_exp_neg(v, f, F, m) for v in x], f
    for f in (lo - 1, hi + 1):  # the message states the range
        message = rf"^the input grid f must be an integer in {lo}\.\.{hi}, got {f}$"
        with pytest.raises(ValueError, match=message):
            kernels.exp_neg(np.array([0, -1]), f, F, m)
        with pytest.raises(ValueError, match=message):
            kernels.softmax_exps(np.array([[0, -1]]), f, None, F, m)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 1024, 1025, 2**20])
def test_internal_grid_range_with_a_scale_divisor(m):
    """F up to the largest with 2F + 2 + bitlength(m - 1) <= 62 (and <= 30): accepted, F + 1 refused
    (with bitlength(m - 1) odd, F + 1 gives 63: one past the bound)."""
    big_f = min(30, (60 - (m - 1).bit_length()) // 2)
    assert kernels.exp_constants(big_f, m) == ref_constants(big_f, m)
    x = [0, -1, -(1 << big_f), -(5 << big_f)]
    assert kernels.exp_neg(np.array(x), 0, big_f, m).tolist() == [ref_exp_neg(v, 0, big_f, m) for v in x]
    for bad in (big_f + 1, None, "15", 15.0):
        with pytest.raises(ValueError, match="internal grid"):
            kernels.exp_neg(np.array([0]), 0, bad, m)


# ---- LayerNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_layer_norm_constant_rows_give_the_rounded_beta(rounding):
    """A row of equal values has c = d q - s = 0, so n = 0 and out = clip(R(beta 2^-(f_gamma + F -
    f_out))) exactly, whatever eps_q (0: W = 0, never a division by zero), gamma, K, F or d."""
    rng = np.random.default_rng(7)
    for d in (1, 3, 64):
        rows = np.array([[0] * d, [7] * d, [-(2**15)] * d, [2**15] * d])
        gamma = rng.integers(-(2**15), 2**15 + 1, d)
        for K, big_f, f_gamma, f_out in ((24, 16, 0, 16), (24, 16, 3, 16), (2, 0, 1, 14), (31, 24, 15, 0),
                                         (24, 16, 10, 0), (24, 16, 46, 0)):
            shift = f_gamma + big_f - f_out  # 0, 3, -13, 39, 26, 62
            ties = [(2 * j + 1) << (shift - 1) for j in range(-3, 3)] if 0 < shift < 45 else []
            beta = np.array((ties + rng.integers(-(2**47), 2**47, d).tolist())[:d], np.int64)
            for out_bits in (16, 8, 2):
                lo, hi = fixed_point.integer_range(out_bits, True)
                expected = [min(max(ref_shift(int(b), shift, rounding), lo), hi) for b in beta]
                for eps_q in (0, 1, 2**32):
                    with np.errstate(all="raise"):
                        got = kernels.layer_norm(rows, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding,
                                                 K=K, F=big_f)
                    assert got.dtype == np.int64
                    assert got.tolist() == [expected] * 4, (d, K, big_f, shift, out_bits, eps_q)


def test_layer_norm_eps_q_at_two_to_the_32():
    """eps_q = R_half_even(eps 2^(2 f_in)) in 0..2^32: 2^32 itself is accepted, 2^32 + 1 is not (and a
    value that rounds to 2^32 is accepted, one that rounds to 2^32 + 2 is not)."""
    top = kernels.LN_MAX_EPS_Q
    assert top == 2**32
    for eps, f_in in ((1.0, 16), (2.0**-8, 20), (2.0**32, 0), (4.0, 15), ((2**32 + 0.5) / 2**32, 16),
                      (0.0, 16), (1e-5, 12), (0.375, 1), (2.5, 0), ((2**32 - 0.5) / 2**32, 16)):
        expected = ref_round(Fraction(eps) * 2 ** (2 * f_in), "half_even")
        assert 0 <= expected <= top
        assert kernels.layer_norm_eps_q(eps, f_in) == expected, (eps, f_in)
    assert kernels.layer_norm_eps_q(1.0, 16) == top
    for eps, f_in in (((2**32 + 1) / 2**32, 16), ((2**32 + 1.5) / 2**32, 16), (2.0, 16), (1.0, 17),
                      (2.0**32 + 1, 0), (-(2.0**-20), 16), (-1.0, 0)):
        assert ref_round(Fraction(eps) * 2 ** (2 * f_in), "half_even") not in range(top + 1)
        with pytest.raises(ValueError, match="outside 0..2\\^32"):
            kernels.layer_norm_eps_q(eps, f_in)
    # layer_norm takes eps_q = 2^32 (a constant row: exactly beta) and refuses 2^32 + 1
    q = np.full((2, 5), 9)
    with np.errstate(all="raise"):
        assert kernels.layer_norm(q, 3, 5 << 16, top, 0, 0, 8, "floor").tolist() == [[5] * 5] * 2
    with pytest.raises(ValueError, match=r"^layer_norm takes \|beta_q\| < 2\^48 and 0 <= eps_q <= 2\^32$"):
        kernels.layer_norm(q, 3, 5 << 16, top + 1, 0, 0, 8, "floor")


@pytest.mark.parametrize("d_k", [1, 16, 64, 1000])
def test_intonly_constants_are_what_an_export_records(d_k):
    """The manifest records exactly these entries, in this order (the exporter writes the dict,
    the engine compares each entry): exp's internal grid, its scale divisor d_k, its integer
    constants at that grid and divisor, LayerNorm's K and F, the normalization variant (and the
    reciprocal's widths where it is the reciprocal one)."""
    recorded = kernels.intonly_constants(d_k)
    assert list(recorded) == ["softmax_F", "softmax_m", "softmax_constants", "layer_norm_K", "layer_norm_F",
                              "normalization"]
    assert recorded == {"softmax_F": 15, "softmax_m": d_k, "softmax_constants": list(ref_constants(15, d_k)),
                        "layer_norm_K": 24, "layer_norm_F": 16, "normalization": "exact"}
    assert type(recorded["softmax_constants"]) is list  # as JSON reads it back: the engine compares lists
    assert kernels.intonly_constants(d_k, "reciprocal") == recorded | {
        "normalization": "reciprocal", "softmax_reciprocal_guard": 8, "layer_norm_reciprocal_G": 24}


def test_softmax_with_sums_defaults_are_softmaxs():
    """The engine calls softmax_with_sums with the default internal grid F = 15 (and m given):
    its defaults are softmax's, F = EXP_F and m = 1."""
    q = np.array([[0, -700, -3000, 5], [9, 9, -(1 << 20), 0]], np.int64)
    probs, sums = kernels.softmax_with_sums(q, 6, None, 8, "half_even")
    rows = q.tolist()
    assert probs.tolist() == [ref_softmax_row(row, [True] * 4, 6, 8, "half_even", 15, 1) for row in rows]
    assert sums.tolist() == [sum(ref_exp_neg(v - max(row), 6, 15, 1) for v in row) for row in rows]


@pytest.mark.parametrize("rounding", ["floor", "half_even", "half_up"])
def test_the_softmax_input_shift_is_half_up_whatever_the_runs_rounding(rounding):
    """Scores on a grid finer than exp's (f = f_q + f_k = 17 > F = 15) are shifted onto F by a
    fixed half-up rounding, part of the exp unit (docs/integer_only.md), never by the run's R: at
    x = -6 (-1.5 units of F) half up gives -1 where floor and half-even give -2."""
    q = np.array([[6, 0]], np.int64)  # x = q - top = [0, -6] on grid 17
    assert kernels.softmax_exps(q, 17, None).tolist() == [[ref_exp_neg(0, 15), ref_exp_neg(-1, 15)]]
    assert ref_exp_neg(-1, 15) != ref_exp_neg(-2, 15)
    probs = kernels.softmax(q, 17, None, 8, rounding)
    assert probs.tolist() == [ref_softmax_row([6, 0], [True, True], 17, 8, rounding)]


def exactly(message: str) -> str:
    """A pytest.raises pattern matching the whole message (a substring would let a garbled one pass)."""
    return f"^{re.escape(message)}$"


def test_every_kernel_error_message_exactly():
    """The one-line errors the kernels raise, word for word (what a caller or an FPGA engineer
    reading a failed check sees)."""
    cases = [
        (lambda: kernels.div_round(np.array([1]), np.array([0]), "floor"),
         "div_round needs a positive divisor"),
        (lambda: kernels.shift_round(np.array([1]), 1, "bogus"), "unknown rounding 'bogus'"),
        (lambda: kernels.isqrt(np.array([-1])), "isqrt takes 0 <= n < 2^62"),
        (lambda: kernels.exp_neg(np.array([1]), 0), "exp_neg takes x <= 0"),
        (lambda: kernels.bit_length(np.array([-1])), "bit_length takes n >= 0"),
        (lambda: kernels.check_layer_norm_args(0, 0, 8, "floor", 24, 16),
         "layer_norm normalizes 1..4096 values, got d = 0"),
        (lambda: kernels.check_layer_norm_args(4, 0, 8, "floor", 1, 16),
         "layer_norm needs 2 <= K <= 31 and 0 <= F <= 24, got K = 1, F = 16"),
        (lambda: kernels.check_layer_norm_args(4, 63, 8, "floor", 24, 16),
         "layer_norm needs -13 <= f_gamma + F - f_out <= 62, got 63"),
        (lambda: kernels.layer_norm(np.int64(3), 1, 0, 0, 0, 0, 8, "floor"),
         "layer_norm needs an array with a last axis"),
        (lambda: kernels.layer_norm(np.array([[1 << 16, 0]]), np.ones(2, np.int64), 0, 0, 0, 0, 8, "floor"),
         "layer_norm takes |q| <= 2^15 and |gamma_q| <= 2^15"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=exactly(message)):
            call()


def test_layer_norm_of_no_rows_is_no_rows():
    """A batch with no rows (shape [0, d]) normalizes to no rows: the range check reads its
    minimum and maximum with a neutral start, not from an empty array."""
    out = kernels.layer_norm(np.zeros((0, 4), np.int64), np.ones(4, np.int64), np.zeros(4, np.int64), 0, 0, 0,
                             8, "half_even")
    assert out.shape == (0, 4) and out.dtype == np.int64


def test_shift_round_of_a_scalar_is_that_of_a_one_element_array():
    """A 0-d q (a Python int or a NumPy scalar) goes through the same in-place shift as an array."""
    for rounding in ("floor", "half_up", "half_even"):
        for q in (-6, -5, 5, 6, 7, -(1 << 40) - 3):
            for k in (-3, 0, 1, 2, 5):
                expected = kernels.shift_round(np.array([q]), k, rounding)[0]
                assert kernels.shift_round(q, k, rounding) == expected, (rounding, q, k)
                assert kernels.shift_round(np.int64(q), k, rounding) == expected, (rounding, q, k)
