"""The reciprocal normalizations (integer/kernels.py): softmax's normalize_reciprocal and
layer_norm(..., normalization="reciprocal") against references written from their docstrings in
unbounded Python integers and Fractions, and their stated error bounds: within one output unit of the
exact variant, equal to it wherever the exact quotient is not within the bound of a rounding boundary,
and (LayerNorm) within one unit of the float64 LayerNorm. NumPy only."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from exact import ref_round
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels

PROPERTY = settings(max_examples=80, deadline=None, database=None)
ROUNDINGS = ("half_even", "half_up", "floor")


def ref_normalize_reciprocal(e_row: list[int], out_bits: int, rounding: str) -> list[int]:
    width = out_bits + kernels.RECIPROCAL_GUARD
    total = sum(e_row)
    if total == 0:
        return [0] * len(e_row)
    t = total.bit_length() - width
    scaled = math.floor(Fraction(total, 2**t)) if t > 0 else total * 2**-t
    r = ref_round(Fraction(2 ** (2 * width), scaled), rounding)
    top = 2**out_bits - 1
    out = []
    for e in e_row:
        e_n = math.floor(Fraction(e) / Fraction(2) ** t)
        out.append(min(max(ref_round(Fraction(e_n * r, 2 ** (2 * width - out_bits)), rounding), 0), top))
    return out


@st.composite
def exp_rows(draw):
    """Rows of softmax numerators e as softmax_exps makes them (scores, a mask, grids)."""
    length = draw(st.integers(1, 40))
    f = draw(st.integers(0, 24))
    m = draw(st.sampled_from([1, 8, 64]))
    spread = draw(st.integers(0, 22))
    scores = np.array(draw(st.lists(st.integers(-(2**spread), 2**spread), min_size=length, max_size=length)))
    mask = np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    return kernels.softmax_exps(scores[None], f, mask[None], kernels.EXP_F, m)[0]


@PROPERTY
@given(exp_rows(), st.sampled_from([4, 8, 12, 16]), st.sampled_from(ROUNDINGS))
def test_softmax_reciprocal_is_its_definition_and_within_its_bound(e, out_bits, rounding):
    steps: dict = {}
    got = kernels.normalize_reciprocal(e[None], out_bits, rounding, steps)[0]
    assert got.tolist() == ref_normalize_reciprocal(e.tolist(), out_bits, rounding)
    exact = kernels.normalize(e[None], out_bits, rounding)[0]
    assert np.all(np.abs(got - exact) <= 1)
    total = int(e.sum())
    if total:
        width = out_bits + kernels.RECIPROCAL_GUARD
        assert 2**width < steps["r"][0, 0] <= 2 ** (width + 1)  # RG + 2 bits
        bound = Fraction(2 ** (out_bits + 1) + 2**out_bits, 2**width)  # 2^(b+1-RK) + 2^(b-RG)
        for ei, gi, xi in zip(e.tolist(), got.tolist(), exact.tolist()):
            v = Fraction(ei * 2**out_bits, total)
            # a different result only where v lies within the bound of a rounding boundary
            near = any(abs(v - ref_round(v, rounding) - edge) <= bound for edge in (-1, -Fraction(1, 2),
                                                                                 Fraction(1, 2), 0, 1))
            assert gi == xi or near or xi == 2**out_bits - 1


def test_softmax_reciprocal_of_a_fully_masked_row_is_zero():
    e = kernels.softmax_exps(np.array([[3, 5, 7]]), 4, np.zeros((1, 3), bool))
    steps: dict = {}
    assert kernels.normalize_reciprocal(e, 8, "half_even", steps).tolist() == [[0, 0, 0]]
    assert steps["r"].tolist() == [[0]]


def ref_layer_norm_reciprocal(q: np.ndarray, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding,
                              K=kernels.LN_K, F=kernels.LN_F):
    """The docstring's reciprocal algorithm in Python integers and Fractions."""
    G = kernels.LN_RECIPROCAL_G
    d = q.shape[-1]
    lo, hi = fixed_point.integer_range(out_bits, True)
    out, ns = [], []
    for row in q.tolist():
        s = sum(row)
        w = d * sum(x * x for x in row) - s * s + d * d * int(eps_q)
        k = (2 * K - w.bit_length()) // 2
        root = max(math.isqrt(math.floor(Fraction(w) * Fraction(2) ** (2 * k))), 1)
        r = ref_round(Fraction(2 ** (K + G), root), rounding) if w > 0 else 0
        for x, g, b in zip(row, gamma.tolist(), beta.tolist()):
            n = ref_round(Fraction((d * x - s) * r) / Fraction(2) ** (K + G - k - F), rounding)
            ns.append(n)
            scaled = ref_round(Fraction(g * n + b) / Fraction(2) ** (f_gamma + F - f_out), rounding)
            out.append(min(max(scaled, lo), hi))
    return np.array(out).reshape(q.shape), np.array(ns).reshape(q.shape)


def float_layer_norm(q, f_in, gamma, beta, eps_q, f_gamma, f_out, F=kernels.LN_F):
    """float64 LayerNorm in output units (unrounded), centering from the exact d q - sum q."""
    d = q.shape[-1]
    centered = np.ldexp((d * q - q.sum(-1, keepdims=True)).astype(np.float64) / d, -f_in)
    var_eps = np.mean(centered * centered, -1, keepdims=True) + np.ldexp(float(eps_q), -2 * f_in)
    n = np.divide(centered, np.sqrt(var_eps), out=np.zeros_like(centered), where=var_eps > 0)
    return np.ldexp(np.ldexp(gamma.astype(np.float64), -f_gamma) * n
                    + np.ldexp(beta.astype(np.float64), -(f_gamma + F)), f_out)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_layer_norm_reciprocal_is_its_definition_and_within_one_unit(rounding):
    """Rows of every kind (constant with eps_q 0 and > 0, one outlier, alternating extremes, random) at
    d = 1 .. 4096: equal to the Fraction reference; n within one unit of the exact variant's; out within
    one unit of the exact variant's and of the rounded float64 LayerNorm (gammas the output grid holds)."""
    rng = np.random.default_rng(11)
    f_gamma, f_out, out_bits = 14, 13, 16
    for d in (1, 3, 64, 512, 4096):
        top = 1 << 15
        rows = [np.full(d, 777), rng.integers(-top, top, d), np.where(np.arange(d) % 2, top - 1, -top),
                np.zeros(d, np.int64), rng.integers(-3, 4, d)]
        rows[3][0] = -top
        q = np.stack(rows).astype(np.int64)
        gamma = rng.integers(-(1 << 14), 1 << 14, d)  # |gamma| 2^(f_out - f_gamma) <= 2^(out_bits - 1)
        beta = rng.integers(-(1 << 32), 1 << 32, d)
        for eps_q in (0, 5):
            steps: dict = {}
            got = kernels.layer_norm(q, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding, steps=steps,
                                     normalization="reciprocal")
            ref, ref_n = ref_layer_norm_reciprocal(q, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding)
            assert np.array_equal(got, ref) and np.array_equal(steps["n"], ref_n)
            exact_steps: dict = {}
            exact = kernels.layer_norm(q, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding,
                                       steps=exact_steps)
            assert np.abs(steps["n"] - exact_steps["n"]).max() <= 1 and np.abs(got - exact).max() <= 1
            lo, hi = fixed_point.integer_range(out_bits, True)
            floats = float_layer_norm(q, 10, gamma, beta, eps_q, f_gamma, f_out)
            rounded = np.clip(np.floor(floats) if rounding == "floor" else np.floor(floats + 0.5)
                              if rounding == "half_up" else np.rint(floats), lo, hi)
            assert np.abs(got - rounded).max() <= 1
            r = steps["r"][:, 0]
            assert np.all((r == 0) == (steps["W"][:, 0] == 0))
            g = kernels.LN_RECIPROCAL_G
            assert np.all((r[r > 0] > 2**g) & (r[r > 0] <= 2 ** (g + 1)))


def test_an_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown normalization 'approximate'"):
        kernels.layer_norm(np.ones((1, 4), np.int64), np.ones(4, np.int64), np.zeros(4, np.int64), 1, 0, 0, 8,
                           "floor", normalization="approximate")


def test_normalize_reciprocal_works_row_by_row():
    """Several rows at once give each row's own result (the sum, t and r are per row)."""
    rng = np.random.default_rng(12)
    q = rng.integers(-(1 << 12), 1 << 12, (5, 9))
    e = kernels.softmax_exps(q, 6, rng.random((5, 9)) < 0.8, kernels.EXP_F, 8)
    steps: dict = {}
    together = kernels.normalize_reciprocal(e, 8, "half_even", steps)
    assert steps["r"].shape == steps["t"].shape == (5, 1)
    assert np.array_equal(kernels.normalize_reciprocal(e[None], 8, "half_even")[0], together)  # 3-D
    for row in range(5):
        alone: dict = {}
        assert np.array_equal(together[row], kernels.normalize_reciprocal(e[row:row + 1], 8, "half_even",
                                                                          alone)[0])
        assert steps["r"][row, 0] == alone["r"][0, 0] and steps["t"][row, 0] == alone["t"][0, 0]


def test_the_reciprocal_bounds_are_the_stated_ones_and_hold():
    """softmax_bounds and layer_norm_bounds of the reciprocal variant: the exact variant's bounds
    (the division's numerator replaced) plus t, r and the product, each its documented formula, and
    the steps of extreme rows stay within them."""
    exact = kernels.softmax_bounds(1 << 18, 4, 64, 8, kernels.EXP_F, 8)
    bounds = kernels.softmax_bounds(1 << 18, 4, 64, 8, kernels.EXP_F, 8, "reciprocal")
    assert set(exact) == {"x", "x_F", "z", "L", "e", "S", "numerator", "output"}
    assert set(bounds) == set(exact) | {"t", "r", "product"}
    assert {k: v for k, v in bounds.items() if k in exact and k != "numerator"} == {
        k: v for k, v in exact.items() if k != "numerator"}
    width = 8 + kernels.RECIPROCAL_GUARD
    top = 64 * kernels.exp_max(kernels.EXP_F, 8)
    assert (bounds["t"], bounds["r"], bounds["numerator"], bounds["product"]) == (
        max(width - 1,
            top.bit_length() - width), 2 ** (width + 1), 2 ** (2 * width), 2 ** (2 * width + 1) - 1)
    # a small row sum: |t| is RK - 1 (S = 1 shifts left by RK - 1), reached
    assert kernels.softmax_bounds(1, 0, 1, 8, 4, 1, "reciprocal")["t"] == width - 1
    steps: dict = {}
    kernels.normalize_reciprocal(np.array([[1, 0]]), 8, "floor", steps)
    assert steps["t"][0, 0] == 1 - width
    rng = np.random.default_rng(13)
    scores = np.concatenate([rng.integers(-(1 << 18), 1 << 18, (6, 64)), np.zeros((1, 64), np.int64),
                             np.where(np.arange(64) == 0, 1 << 18, -(1 << 18))[None]])
    steps = {}
    kernels.softmax_with_sums(scores, 4, None, 8, "half_even", kernels.EXP_F, 8, steps, "reciprocal")
    e_n = kernels.shift_round(steps["e"], steps["t"], "floor")
    assert np.abs(steps["t"]).max() <= bounds["t"] and steps["r"].max() <= bounds["r"]
    assert (e_n * steps["r"]).max() <= bounds["product"]

    exact = kernels.layer_norm_bounds(512, 16, 1 << 15, 1 << 40, 17, 16)
    bounds = kernels.layer_norm_bounds(512, 16, 1 << 15, 1 << 40, 17, 16, normalization="reciprocal")
    assert set(bounds) == set(exact) | {"r", "product"}
    assert {k: v for k, v in bounds.items() if k in exact and k != "numerator"} == {
        k: v for k, v in exact.items() if k != "numerator"}
    g = kernels.LN_RECIPROCAL_G
    assert (bounds["r"], bounds["numerator"], bounds["product"]) == (
        2 ** (g + 1), 2 ** (kernels.LN_K + g), exact["c"] * 2 ** (g + 1))
    with pytest.raises(ValueError, match="unknown normalization"):
        kernels.softmax_bounds(1, 4, 8, 8, normalization="lut")
    with pytest.raises(ValueError, match="unknown normalization"):
        kernels.layer_norm_bounds(8, 16, 1, 1, 1, 16, normalization="lut")
