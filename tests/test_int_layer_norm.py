"""Integer LayerNorm (kernels.layer_norm): bit for bit against an unbounded Python-integer model of
its algorithm and against its TF twin (kernels_tf.layer_norm), within its stated error bound of the
float64 LayerNorm over a sweep of extremes, its input bounds, and no float on its path."""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import no_float
import numpy as np
import pytest
import tensorflow as tf
from exact import ref_round
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels
from integer_tf import kernels_tf

PROPERTY = settings(max_examples=200, deadline=None, database=None)
MAX_Q = kernels.LN_MAX_ABS_Q



def exact_model(q, gamma_q, beta_q, eps_q, f_gamma, f_out, out_bits, rounding, K=kernels.LN_K,
                F=kernels.LN_F):
    """The docstring's algorithm in unbounded Python integers and Fractions (no int64 to overflow)."""
    q = np.asarray(q)
    d = q.shape[-1]
    gamma = np.broadcast_to(gamma_q, (d,)).tolist()
    beta = np.broadcast_to(beta_q, (d,)).tolist()
    lo, hi = fixed_point.integer_range(out_bits, True)
    out = []
    for row in q.reshape(-1, d).tolist():
        s = sum(row)
        w = d * sum(x * x for x in row) - s * s + d * d * int(eps_q)
        k = (2 * K - w.bit_length()) // 2
        root = max(math.isqrt(math.floor(Fraction(w) * Fraction(2) ** (2 * k))), 1)
        for x, g, b in zip(row, gamma, beta):
            n = ref_round(Fraction(d * x - s) * Fraction(2) ** (k + F) / root, rounding)
            y = g * n + b
            scaled = ref_round(Fraction(y) / Fraction(2) ** (f_gamma + F - f_out), rounding)
            out.append(min(max(scaled, lo), hi))
    return np.array(out, np.int64).reshape(q.shape)


def float_reference(q, f_in, gamma_q, beta_q, eps_q, f_gamma, f_out, F=kernels.LN_F):
    """float64 LayerNorm gamma (x - mean) / sqrt(var + eps) + beta of x = q 2^-f_in, with gamma =
    gamma_q 2^-f_gamma, beta = beta_q 2^-(f_gamma + F), eps = eps_q 2^(-2 f_in), in units of the
    output grid (unrounded), and the normalized |n*|. The centering x - mean is taken from the
    exact integers d q - sum q (a float64 mean of 2^15-sized values would lose ~2^-38 of a unit,
    visible at the tiniest variances); a row with var + eps = 0 normalizes to 0 (the eps -> 0 limit)."""
    q = np.asarray(q, np.int64)
    d = q.shape[-1]
    centered = np.ldexp((d * q - q.sum(-1, keepdims=True)).astype(np.float64) / d, -f_in)
    var_eps = np.mean(centered * centered, axis=-1, keepdims=True) + np.ldexp(float(eps_q), -2 * f_in)
    n = np.divide(centered, np.sqrt(var_eps), out=np.zeros_like(centered), where=var_eps > 0)
    gamma = np.ldexp(np.asarray(gamma_q, np.float64), -f_gamma)
    beta = np.ldexp(np.asarray(beta_q, np.float64), -(f_gamma + F))
    return np.ldexp(gamma * n + beta, f_out), np.abs(n)


def round_float(v: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "floor":
        return np.floor(v)
    if rounding == "half_up":
        return np.floor(v + 0.5)
    return np.rint(v)


def error_bound(gamma_q, n_abs, f_gamma, f_out, rounding, K=kernels.LN_K, F=kernels.LN_F):
    """The docstring's E per element: |gamma_q| 2^(f_out - f_gamma) (|n*| 2^(1-K) + u 2^-F)."""
    u = 1.0 if rounding == "floor" else 0.5
    return np.abs(np.asarray(gamma_q, np.float64)) * 2.0 ** (f_out - f_gamma) * (n_abs * 2.0 ** (1 - K)
                                                                                 + u * 2.0**-F)


def check_against_float(q, f_in, gamma_q, beta_q, eps_q, f_gamma, f_out, out_bits, rounding,
                        K=kernels.LN_K, F=kernels.LN_F):
    """Assert the stated bound; return (max |out - rounded float|, max E)."""
    out = kernels.layer_norm(q, gamma_q, beta_q, eps_q, f_gamma, f_out, out_bits, rounding, K=K, F=F)
    lo, hi = fixed_point.integer_range(out_bits, True)
    assert out.dtype.kind == "i" and out.shape == np.shape(q)
    assert out.min() >= lo and out.max() <= hi
    ref, n_abs = float_reference(q, f_in, gamma_q, beta_q, eps_q, f_gamma, f_out, F)
    e = error_bound(gamma_q, n_abs, f_gamma, f_out, rounding, K, F)
    slack = 1e-9 + 1e-12 * np.abs(ref)  # float64's own error
    diff = np.abs(out - np.clip(round_float(ref, rounding), lo, hi))
    assert np.all(diff <= np.floor(e + slack) + 1), (diff.max(), e.max())
    u = 1.0 if rounding == "floor" else 0.5
    assert np.all(np.abs(out - np.clip(ref, lo, hi)) <= e + u + slack)  # before the output rounding
    return diff.max(), e.max()


def full_range_gamma(rng, d, f_gamma, f_out, out_bits):
    """Random gammas up to the largest the output grid holds: |gamma_q| 2^(f_out - f_gamma) <= 2^(b-1)."""
    top = min(2 ** (out_bits - 1 + f_gamma - f_out), kernels.LN_MAX_ABS_GAMMA)
    g = rng.integers(-top, top + 1, size=d)
    g[0] = top  # the extreme itself
    return g


def extreme_rows(d: int, bits: int, rng) -> np.ndarray:
    """The sweep's rows for one (d, input bits)."""
    n, p = fixed_point.integer_range(bits, True)
    rows = [np.full(d, c) for c in (0, n, p, 1)]  # constant rows: zero variance
    for big in (n, p):  # one huge value among zeros, among the other extreme, among small noise
        for base in (np.zeros(d, np.int64), np.full(d, p if big == n else n), rng.integers(-2, 3, size=d)):
            row = base.copy()
            row[rng.integers(d)] = big
            rows.append(row)
    rows.append(np.where(np.arange(d) % 2 == 0, n, p))  # the widest spread
    rows.append(np.where(np.arange(d) == 0, p - 1, p))  # tiny variance at the top of the grid
    rows.append(np.where(np.arange(d) == d - 1, n + 1, n))  # ... and at the bottom
    rows.append(np.arange(d) % 2)  # variance 1/4
    rows.append(rng.integers(n, p + 1, size=d))
    rows.append(rng.integers(-8, 9, size=d) + rng.integers(n + 8, p - 8))  # small noise on a large offset
    return np.stack(rows).astype(np.int64)


def test_layer_norm_is_within_one_unit_of_float64_over_extremes():
    """With the defaults and a gamma the output grid holds, out is within 1 unit of the float64
    LayerNorm rounded onto the output grid (the docstring's E <= 3/4), over the extremes."""
    rng = np.random.default_rng(10)
    worst_diff, worst_e, cases = 0, 0.0, 0
    for d in (1, 2, 3, 7, 64, 512, 4096):
        for bits in (8, 12, 16):
            rows = extreme_rows(d, bits, rng)
            for rounding in fixed_point.ROUNDINGS:
                for out_bits, f_out, f_gamma in ((8, 4, 7), (16, 12, 14), (16, 9, 0), (12, 3, 15)):
                    f_in = int(rng.integers(-4, 20))
                    for eps_q in (0, 1, 2**32):  # 2^32: eps dominating every variance but the widest
                        gamma = full_range_gamma(rng, d, f_gamma, f_out, out_bits)
                        top = 2 ** (f_gamma + kernels.LN_F + 2)  # |beta| <= 4
                        beta = rng.integers(-top, top, size=d)
                        diff, e = check_against_float(rows, f_in, gamma, beta, eps_q, f_gamma, f_out,
                                                      out_bits, rounding)
                        assert diff <= 1 and e <= 0.75
                        worst_diff, worst_e, cases = max(worst_diff, diff), max(worst_e, e), cases + 1
    print(f"\nLayerNorm sweep: {cases} cases, max |out - rounded float64| = {worst_diff}, "
          f"max E = {worst_e:.3f}")


ROW_D = st.one_of(st.integers(1, 64), st.sampled_from([128, 512]))


@st.composite
def layer_norm_case(draw, small_precision: bool = False):
    d = draw(ROW_D)
    bits = draw(st.integers(8, 16))
    rows = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, p = fixed_point.integer_range(bits, True)
    kind = draw(st.sampled_from(["uniform", "constant", "one_huge", "tiny", "small"]))
    if kind == "uniform":
        q = rng.integers(n, p + 1, size=(rows, d))
    elif kind == "constant":
        q = np.full((rows, d), draw(st.integers(n, p)))
    elif kind == "one_huge":
        q = rng.integers(-3, 4, size=(rows, d))
        q[:, rng.integers(d)] = draw(st.sampled_from([n, p]))
    elif kind == "tiny":
        q = np.full((rows, d), draw(st.integers(n + 1, p)))
        q[:, 0] -= 1
    else:
        q = rng.integers(-4, 5, size=(rows, d))
    if small_precision:
        K, F = draw(st.integers(2, 31)), draw(st.integers(0, 24))
    else:
        K, F = kernels.LN_K, kernels.LN_F
    f_gamma = draw(st.integers(0, 15))
    f_out = draw(st.integers(-4, min(20, f_gamma + F + 13)))
    g_bits = draw(st.integers(1, 16))
    gamma = rng.integers(-(2 ** (g_bits - 1)), 2 ** (g_bits - 1) + 1, size=d)
    b_bits = draw(st.integers(1, 48))
    beta = rng.integers(-(2 ** (b_bits - 1)), 2 ** (b_bits - 1), size=d)
    eps_q = draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32)))
    return dict(q=q.astype(np.int64), gamma_q=gamma, beta_q=beta, eps_q=eps_q, f_gamma=f_gamma,
                f_out=f_out, out_bits=draw(st.integers(2, 16)), K=K, F=F,
                rounding=draw(st.sampled_from(fixed_point.ROUNDINGS)), f_in=draw(st.integers(-8, 24)))


@PROPERTY
@given(case=layer_norm_case(small_precision=True))
def test_layer_norm_numpy_twin_and_exact_model_agree_bit_for_bit(case):
    f_in = case.pop("f_in")
    got = kernels.layer_norm(**case)
    assert got.dtype == np.int64
    lo, hi = fixed_point.integer_range(case["out_bits"], True)
    assert got.min() >= lo and got.max() <= hi
    np.testing.assert_array_equal(got, exact_model(**case))
    tf_case = dict(case, q=tf.constant(case["q"], tf.int64), gamma_q=tf.constant(case["gamma_q"], tf.int64),
                   beta_q=tf.constant(case["beta_q"], tf.int64))
    np.testing.assert_array_equal(kernels_tf.layer_norm(**tf_case).numpy(), got)
    # and the stated bound of the float64 LayerNorm, at every precision K, F and any gamma
    check_against_float(case["q"], f_in, case["gamma_q"], case["beta_q"], case["eps_q"], case["f_gamma"],
                        case["f_out"], case["out_bits"], case["rounding"], K=case["K"], F=case["F"])


@PROPERTY
@given(case=layer_norm_case())
def test_layer_norm_default_precision_twin_and_bound(case):
    f_in = case.pop("f_in")
    got = kernels.layer_norm(**case)
    np.testing.assert_array_equal(kernels_tf.layer_norm(**dict(case, q=tf.constant(case["q"]))).numpy(), got)
    check_against_float(case["q"], f_in, case["gamma_q"], case["beta_q"], case["eps_q"], case["f_gamma"],
                        case["f_out"], case["out_bits"], case["rounding"])


def test_layer_norm_takes_float64_only_where_its_integers_are_exact():
    """kernels_tf's float64 route needs W < 2^53 (d <= 1295), W 2^2k < 2^52 (K <= 26) and the
    division's numerator below 2^51 (K + F + log2 sqrt(d - 1) < 51); the int64 route takes the rest."""
    fits = kernels_tf._layer_norm_fits_float64
    assert fits(1024, kernels.LN_K, kernels.LN_F) and fits(1295, 26, 18) and fits(1, 2, 0)
    assert not fits(1296, kernels.LN_K, kernels.LN_F)  # W
    assert not fits(128, 27, 0)  # the square root
    assert not fits(1024, 26, 21) and not fits(128, 24, 24)  # the numerator


@pytest.mark.parametrize("d", [1024, kernels.LN_MAX_D])
def test_layer_norm_at_the_bounds_does_not_overflow(d):
    """The largest inputs, gammas, betas, eps and d the bounds allow: NumPy and TF equal the
    unbounded Python-integer model (an int64 overflow anywhere would show). d = 1024 is the widest
    row TF's float64 route takes at the default precision, 4096 the int64 route's."""
    assert kernels_tf._layer_norm_fits_float64(d, kernels.LN_K, kernels.LN_F) == (d == 1024)
    rng = np.random.default_rng(4096)
    rows = np.stack([np.where(np.arange(d) % 2 == 0, -MAX_Q, MAX_Q),  # the largest variance
                     np.where(np.arange(d) == 7, -MAX_Q, MAX_Q),  # one huge value: |n*| = sqrt(d - 1)
                     np.full(d, -MAX_Q), rng.integers(-MAX_Q, MAX_Q + 1, size=d)])
    gamma = np.where(np.arange(d) % 3 == 0, -kernels.LN_MAX_ABS_GAMMA, kernels.LN_MAX_ABS_GAMMA)
    beta = np.where(np.arange(d) % 2 == 0, 1 - kernels.LN_MAX_ABS_BETA, kernels.LN_MAX_ABS_BETA - 1)
    grids = ((31, 24, 0, 37), (24, 16, 0, 29), (2, 0, 0, 13), (31, 0, 15, 15), (31, 24, 15, -16),
             (24, 16, 15, -13))
    for K, F, f_gamma, f_out in grids:  # output shifts -13 (the largest left shift), 0 and 55
        for eps_q in (0, kernels.LN_MAX_EPS_Q):
            for rounding in fixed_point.ROUNDINGS:
                args = (gamma, beta, eps_q, f_gamma, f_out, 16, rounding)
                got = kernels.layer_norm(rows, *args, K=K, F=F)
                np.testing.assert_array_equal(got, exact_model(rows, *args, K=K, F=F))
                twin = kernels_tf.layer_norm(tf.constant(rows), *args, K=K, F=F)
                np.testing.assert_array_equal(twin.numpy(), got)


def test_layer_norm_hand_values():
    """A few rows by hand: [-1, 1] -> -/+1 and [0, 0, 0, 4] -> (-1, -1, -1, 3) / sqrt(3) on grid F,
    a constant row -> beta, d = 1 -> beta."""
    F = kernels.LN_F
    out = kernels.layer_norm(np.array([[-1, 1], [5, 5]]), 1, 0, 0, 0, F, 16, "half_even")  # out = n on grid F
    np.testing.assert_array_equal(out, [[-(2**15), 2**15 - 1], [0, 0]])  # +-2^16 clipped to 16 bits
    out = kernels.layer_norm(np.array([0, 0, 0, 4]), 1, 0, 0, 0, F - 4, 16, "half_even")
    np.testing.assert_array_equal(out, np.round(np.array([-1, -1, -1, 3]) / np.sqrt(3) * 2**12))
    out = kernels.layer_norm(np.array([[3], [-7]]), 5, 3 << F, 1, 0, 0, 8, "floor")
    np.testing.assert_array_equal(out, [[3], [3]])


def test_layer_norm_rejects_inputs_beyond_its_bounds():
    q = np.zeros((2, 8), np.int64)
    ok = dict(gamma_q=1, beta_q=0, eps_q=1, f_gamma=0, f_out=8, out_bits=8, rounding="half_even")
    kernels.layer_norm(q, **ok)  # the baseline passes
    bad_data = [dict(q=q + MAX_Q + 1), dict(q=q - MAX_Q - 1), dict(gamma_q=kernels.LN_MAX_ABS_GAMMA + 1),
                dict(beta_q=kernels.LN_MAX_ABS_BETA), dict(beta_q=-kernels.LN_MAX_ABS_BETA), dict(eps_q=-1),
                dict(eps_q=kernels.LN_MAX_EPS_Q + 1), dict(q=np.zeros((2, kernels.LN_MAX_D + 1), np.int64)),
                dict(q=np.zeros((2, 0), np.int64)), dict(q=np.int64(3))]
    bad_static = [dict(K=1), dict(K=32), dict(F=-1), dict(F=25), dict(f_out=30), dict(f_gamma=63),
                  dict(out_bits=17), dict(out_bits=1), dict(rounding="nearest")]
    for bad in bad_data + bad_static:
        args = dict(dict(q=q), **ok) | bad
        with pytest.raises(ValueError):
            kernels.layer_norm(**args)
    assert kernels.layer_norm(q + MAX_Q, **ok).shape == q.shape  # the bounds themselves pass
    assert kernels.layer_norm(q - MAX_Q, **dict(ok, gamma_q=-kernels.LN_MAX_ABS_GAMMA)).shape == q.shape
    for bad in bad_static + [dict(q=np.zeros((2, kernels.LN_MAX_D + 1), np.int64))]:  # TF: the static ones
        args = dict(dict(q=q), **ok) | bad
        with pytest.raises(ValueError):
            kernels_tf.layer_norm(**dict(args, q=tf.constant(args["q"])))
    with pytest.raises(TypeError, match="integer"):
        kernels.layer_norm(q.astype(np.float32), **ok)
    with pytest.raises(TypeError, match="integer"):
        kernels.layer_norm(q, **dict(ok, gamma_q=np.float64(1.0)))


class IntOnly(np.ndarray):
    """An int64 array whose every descendant (ufunc and operator results, NumPy functions, astype,
    views) is checked: any dtype but integer or bool is recorded in IntOnly.seen."""

    seen: list[str] = []

    def __array_finalize__(self, obj):
        if self.dtype.kind not in "iub":
            IntOnly.seen.append(str(self.dtype))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return int_only(getattr(ufunc, method)(*plain(inputs), **plain(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        return int_only(func(*plain(args), **plain(kwargs)))


def plain(x):
    return no_float.plain(x, IntOnly)


def int_only(x):
    return no_float.traced(x, IntOnly, lambda v: IntOnly.seen.append(type(v).__name__))


def test_layer_norm_computes_no_float(monkeypatch):
    """Every array the kernel computes descends from its inputs, which kernels._int64 hands over as
    IntOnly: no intermediate (inline ones included) may be a float. Plus every local of every
    integer/kernels.py frame, at every line and return, is checked (Python floats included)."""
    IntOnly.seen = []
    (int_only(np.arange(3)) / 2 + 1).astype(np.int64)  # the detector itself sees a float
    assert IntOnly.seen == ["float64", "float64"]  # x / 2, then + 1
    IntOnly.seen = []
    to_int64 = kernels._int64
    monkeypatch.setattr(kernels, "_int64", lambda a: to_int64(a).view(IntOnly))
    rng = np.random.default_rng(1)
    q = rng.integers(-(2**15), 2**15, size=(3, 48))
    q[1] = 5  # a constant row
    floats = []

    def is_float(v):
        return isinstance(v, float | np.inexact) or (isinstance(v, np.ndarray) and v.dtype.kind in "fc")

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != kernels.__file__:
            return None

        def local(frame, event, arg):
            values = list(frame.f_locals.values()) + ([arg] if event == "return" else [])
            floats.extend(f"{frame.f_code.co_name}:{frame.f_lineno}" for v in values if is_float(v))
            return local
        return local

    for eps_q, rounding, K, F in ((7, "half_up", kernels.LN_K, kernels.LN_F), (0, "half_even", 31, 0),
                                  (2**32, "floor", 2, 24)):
        sys.settrace(tracer)
        try:
            out = kernels.layer_norm(q, rng.integers(-99, 99, 48), rng.integers(-999, 999, 48), eps_q,
                                     6, 4, 8, rounding, K=K, F=F)
        finally:
            sys.settrace(None)
        assert isinstance(out, IntOnly) and out.dtype == np.int64
    assert not IntOnly.seen, IntOnly.seen[:5]
    assert not floats, floats[:5]


@PROPERTY
@given(n=st.lists(st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 2**10),
                            st.integers(0, 62).map(lambda j: 2**j),
                            st.integers(1, 62).map(lambda j: 2**j - 1)),
                  min_size=1, max_size=20))
def test_bit_length_is_pythons(n):
    got = kernels.bit_length(np.array(n, np.int64))
    assert got.tolist() == [x.bit_length() for x in n]
    np.testing.assert_array_equal(kernels_tf.bit_length(tf.constant(n, tf.int64)).numpy(), got)


def test_bit_length_rejects_negatives_and_eps_q_converts():
    with pytest.raises(ValueError):
        kernels.bit_length(np.array([-1]))
    assert kernels.layer_norm_eps_q(1e-6, 10) == 1  # 1.048576
    assert kernels.layer_norm_eps_q(1e-6, 8) == 0  # 0.0655
    assert kernels.layer_norm_eps_q(1e-5, 12) == 168  # 167.77
    assert kernels.layer_norm_eps_q(2.5, 0) == 2 and kernels.layer_norm_eps_q(0.375, 1) == 2  # half to even
    with pytest.raises(ValueError):
        kernels.layer_norm_eps_q(1.0, 17)  # 2^34 > 2^32
