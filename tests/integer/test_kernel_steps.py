"""The kernels' proven widths (kernels.layer_norm_bounds, kernels.softmax_bounds: the data sheet's and
the golden vectors' bits): every intermediate of random and extreme rows stays within its bound, and
the bounds that are tight are reached."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels


def _layer_norm_steps(q, gamma, beta, eps_q, in_bits, out_bits):
    steps: dict = {}
    kernels.layer_norm(q, gamma, beta, eps_q, 12, 10, out_bits, "half_even", steps=steps)
    return steps


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 64), in_bits=st.integers(2, 16), out_bits=st.integers(2, 16),
       eps_q=st.integers(0, 1 << 32), seed=st.integers(0, 2**31), extreme=st.booleans())
def test_layer_norm_intermediates_stay_within_their_proven_bounds(d, in_bits, out_bits, eps_q, seed, extreme):
    rng = np.random.default_rng(seed)
    n, p = fixed_point.integer_range(in_bits, True)
    q = rng.choice([n, p], size=(4, d)) if extreme else rng.integers(n, p + 1, size=(4, d))
    q[0, 0], q[0, 1:] = p, n  # one value against all the others: |c| reaches (d - 1)(p - n)
    gamma = rng.integers(-(1 << 15), (1 << 15) + 1, size=d)
    beta = rng.integers(-(1 << 40), 1 << 40, size=d)
    steps = _layer_norm_steps(q, gamma, beta, eps_q, in_bits, out_bits)
    bounds = kernels.layer_norm_bounds(d, in_bits, int(np.abs(gamma).max()), int(np.abs(beta).max()), eps_q,
                                       out_bits)
    for name, values in steps.items():
        assert np.abs(values).max() <= bounds[name], (name, int(np.abs(values).max()), bounds[name])
    c, k = steps["c"], steps["k"]
    numerator = np.where(k + kernels.LN_F >= 0, np.abs(c) << np.maximum(k + kernels.LN_F, 0), np.abs(c))
    assert numerator.max() <= bounds["numerator"]
    assert np.abs(c[0, 0]) == bounds["c"] or d == 1


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), score_bits=st.integers(2, 40), f=st.integers(-10, 40),
       m=st.sampled_from([1, 2, 16, 64, 100]), out_bits=st.integers(2, 16), seed=st.integers(0, 2**31))
def test_softmax_intermediates_stay_within_their_proven_bounds(length, score_bits, f, m, out_bits, seed):
    rng = np.random.default_rng(seed)
    top = (1 << (score_bits - 1))
    q = rng.integers(-top, top + 1, size=(3, length))
    q[0, 0], q[0, -1] = top, -top  # the widest x = q - max: -2 top (when the row has two keys)
    mask = rng.random((3, length)) < 0.8
    mask[0] = True
    steps: dict = {}
    kernels.softmax_with_sums(q, f, mask, out_bits, "half_even", m=m, steps=steps)
    bounds = kernels.softmax_bounds(top, f, length, out_bits, m=m)
    for name, values in steps.items():
        assert np.abs(values).max() <= bounds[name], (name, int(np.abs(values).max()), bounds[name])
    assert length == 1 or np.abs(steps["x"]).max() == bounds["x"]
    assert steps["L"].max() <= kernels.exp_max(kernels.EXP_F, m) == bounds["L"]


# ---- the intermediates are the documented steps (docs/integer_only.md, "Softmax", "LayerNorm") ----


def test_layer_norm_steps_are_the_documented_ones():
    rng = np.random.default_rng(5)
    q = rng.integers(-(1 << 15), 1 << 15, size=(6, 48))
    q[1] = 7  # a constant row: W = d^2 eps_q
    q[2, :] = 0  # W = 0 with eps_q = 0 below: D = 1, n = 0
    gamma, beta = rng.integers(-(1 << 15), 1 << 15, size=48), rng.integers(-(1 << 40), 1 << 40, size=48)
    for eps_q in (0, 3, 1 << 32):
        steps: dict = {}
        out = kernels.layer_norm(q, gamma, beta, eps_q, 13, 11, 16, "half_up", steps=steps)
        d = q.shape[-1]
        s = q.sum(-1, keepdims=True)
        w = d * (q * q).sum(-1, keepdims=True) - s * s + d * d * eps_q
        k = (2 * kernels.LN_K - kernels.bit_length(w)) >> 1
        shifted = np.where(k >= 0, w << np.maximum(2 * k, 0), w >> np.maximum(-2 * k, 0))
        root = np.maximum(kernels.isqrt(shifted), 1)
        up = k + kernels.LN_F
        n = kernels.div_round(np.where(up >= 0, (d * q - s) << np.maximum(up, 0), d * q - s),
                              root << np.maximum(-up, 0), "half_up")
        expected = {"s": s, "c": d * q - s, "W": w, "k": k, "D": root, "n": n, "y": gamma * n + beta}
        assert list(steps) == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(steps[name], value, err_msg=name)
        np.testing.assert_array_equal(out, kernels.requantize(expected["y"], 13 + kernels.LN_F - 11, 16, True,
                                                              "half_up"))
        assert eps_q or (steps["D"][2, 0] == 1 and not steps["n"][2].any())


def test_softmax_steps_are_the_documented_ones():
    rng = np.random.default_rng(6)
    m, f, out_bits = 16, 18, 8
    q = rng.integers(-(1 << 26), 1 << 26, size=(5, 12))
    mask = rng.random((5, 12)) < 0.7
    mask[0], mask[1] = True, False  # a full row and a row with no visible key
    steps: dict = {}
    probs, sums = kernels.softmax_with_sums(q, f, mask, out_bits, "floor", m=m, steps=steps)
    q_ln2, q_b, q_c = kernels.exp_constants(kernels.EXP_F, m)
    top = np.max(np.where(mask, q, np.iinfo(np.int64).min), axis=-1, keepdims=True)
    x = np.where(mask, q - top, 0)
    clamp = -(1 << (kernels.EXP_X_MIN_LOG2 + (m.bit_length() // 2) + f))
    assert kernels.exp_clamp(f, m) == clamp
    x_f = kernels.shift_round(np.maximum(x, clamp), f - kernels.EXP_F, "half_up")  # f > F: a rounded shift
    z = (-x_f) // q_ln2
    big = (x_f + z * q_ln2 + q_b) ** 2 + q_c
    e = np.where(mask, big >> np.minimum(z, 62), 0)
    expected = {"x": x, "x_F": np.where(mask, x_f, 0), "z": np.where(mask, z, 0), "L": np.where(mask, big, 0),
                "e": e, "S": e.sum(-1, keepdims=True)}
    assert list(steps) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(steps[name], value, err_msg=name)
    np.testing.assert_array_equal(sums, expected["S"][:, 0])
    np.testing.assert_array_equal(probs, np.minimum(((e << out_bits) // np.maximum(expected["S"], 1)),
                                                    (1 << out_bits) - 1))
    assert not probs[1].any() and steps["S"][1, 0] == 0


# ---- the bounds are the documented formulas (docs/integer_only.md, "Widths") ------------------------


def _ceil_sqrt_times(n: int, scale: Fraction) -> int:
    """floor(sqrt(n) * scale) by exact rationals: the largest r with r^2 <= n scale^2."""
    target = n * scale * scale
    r = math.isqrt(math.floor(target))
    while (r + 1) ** 2 <= target:
        r += 1
    return r


@pytest.mark.parametrize("d,in_bits,gamma,beta,eps_q,out_bits,K,F", [
    (512, 16, 1 << 15, 0, 0, 16, 24, 16), (128, 16, 1 << 14, 12345, 7, 12, 24, 16),
    (1, 8, 3, 2, 1 << 32, 8, 24, 16), (4096, 16, 1 << 15, (1 << 48) - 1, 1 << 32, 16, 24, 16),
    (300, 12, 100, 5, 0, 10, 2, 0)])
def test_layer_norm_bounds_are_the_documented_formulas(d, in_bits, gamma, beta, eps_q, out_bits, K, F):
    bounds = kernels.layer_norm_bounds(d, in_bits, gamma, beta, eps_q, out_bits, K, F)
    w = d * d * (2 ** (2 * in_bits - 2) + eps_q)
    k_min = (2 * K - w.bit_length()) // 2
    c = (d - 1) * (2**in_bits - 1)
    numerator = _ceil_sqrt_times(d - 1, Fraction(2 ** (K + F))) + 1
    n = _ceil_sqrt_times(d - 1, Fraction(2**F) * (1 + Fraction(2, 2**K))) + 2
    assert bounds == {"s": d * 2 ** (in_bits - 1), "c": c, "W": w, "k": max(K, -k_min), "D": 2**K - 1,
                      "numerator": max(numerator, c) if k_min + F < 0 else numerator, "n": n,
                      "y": gamma * n + beta, "output": 2 ** (out_bits - 1)}


@pytest.mark.parametrize("score,f,length,out_bits,m", [
    (1 << 20, 8, 512, 8, 64), (1 << 20, 16, 512, 8, 64), (1000, 20, 7, 4, 1), (1 << 30, -3, 100, 16, 2),
    (5, 30, 1, 2, 1000)])
def test_softmax_bounds_are_the_documented_formulas(score, f, length, out_bits, m):
    bounds = kernels.softmax_bounds(score, f, length, out_bits, m=m)
    clamped = min(2 * score, 2 ** max(6 + m.bit_length() // 2 + f, 0))  # |x| after the clamp, on grid f
    x_f = clamped * 2 ** (15 - f) if f <= 15 else math.ceil(Fraction(clamped, 2 ** (f - 15)) - Fraction(1, 2))
    q_ln2, q_b, q_c = kernels.exp_constants(15, m)
    top = q_b * q_b + q_c
    assert bounds == {"x": 2 * score, "x_F": x_f, "z": x_f // q_ln2, "L": top, "e": top, "S": length * top,
                      "numerator": top * 2**out_bits, "output": 2**out_bits - 1}
    default_m = kernels.softmax_bounds(score, f, length, out_bits)
    assert default_m == kernels.softmax_bounds(score, f, length, out_bits, m=1)


def test_exp_clamp_and_eps_q_edges():
    assert kernels.exp_clamp(3) == -(1 << 9) and kernels.exp_clamp(3, 16) == -(1 << 11)
    assert kernels.exp_clamp(-6) == -1 and kernels.exp_clamp(-20, 4) == -1  # value >= -2^-f: one unit
    for eps in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^the LayerNorm eps must be finite, got (inf|nan)$"):
            kernels.layer_norm_eps_q(eps, 10)
