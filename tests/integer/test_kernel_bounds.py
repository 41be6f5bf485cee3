"""The kernels' proven widths (kernels.layer_norm_bounds, kernels.softmax_bounds: the data sheet's and
the golden vectors' bits): every intermediate of random and extreme rows stays within its bound, and
the bounds that are tight are reached."""

from __future__ import annotations

import numpy as np
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
