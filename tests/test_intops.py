"""The integer primitives of integer-only inference (integer/kernels.py) against Python integers, and their
TF twins (integer_tf/kernels_tf.py) against them bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from exact import ref_round
from hypothesis import given, settings
from hypothesis import strategies as st

from integer import fixed_point, kernels
from integer_tf import kernels_tf

PROPERTY = settings(max_examples=150, deadline=None, database=None)
# small values hit the ties (x / b = k + 1/2) often; large ones the carries
INT64 = st.one_of(st.integers(-64, 64), st.integers(-(2**40), 2**40))



@PROPERTY
@given(a=st.lists(INT64, min_size=1, max_size=20), b=st.one_of(st.integers(1, 8), st.integers(1, 2**20)),
       rounding=st.sampled_from(fixed_point.ROUNDINGS))
def test_div_round_is_the_exact_rounded_quotient(a, b, rounding):
    got = kernels.div_round(np.array(a), np.array(b), rounding)
    assert got.dtype == np.int64
    assert got.tolist() == [ref_round(Fraction(x, b), rounding) for x in a]
    twin = kernels_tf.div_round(tf.constant(a, tf.int64), tf.constant(b, tf.int64), rounding)
    np.testing.assert_array_equal(twin.numpy(), got)


FLOAT64_ROUTE_A = 2**51 - 1  # the largest |a| div_round takes in float64


@st.composite
def quotients_near_ties(draw):
    """(a, b) with |a| < 2^51 at and around the integers and half-integers of a / b (where a float
    quotient would first round the wrong way), b up to 2^62 (beyond float64's exact integers)."""
    b = draw(st.one_of(st.integers(1, 2**20), st.integers(2**52 - 8, 2**53 + 8), st.integers(1, 2**62)))
    n = draw(st.integers(-FLOAT64_ROUTE_A // b, FLOAT64_ROUTE_A // b))
    offset = draw(st.sampled_from([0, 1, -1, b // 2, (b + 1) // 2, b // 2 + 1, b // 2 - 1, b - 1]))
    a = n * b + offset
    return max(-FLOAT64_ROUTE_A, min(FLOAT64_ROUTE_A, a)), b


@PROPERTY
@given(ab=st.lists(quotients_near_ties(), min_size=1, max_size=20),
       rounding=st.sampled_from(fixed_point.ROUNDINGS))
def test_div_round_in_float64_is_the_exact_rounded_quotient(ab, rounding):
    a, b = (list(v) for v in zip(*ab))
    twin = kernels_tf.div_round(tf.constant(a, tf.int64), tf.constant(b, tf.int64), rounding,
                                max_abs_a=FLOAT64_ROUTE_A)
    assert twin.numpy().tolist() == [ref_round(Fraction(x, y), rounding) for x, y in zip(a, b)]


def test_div_round_on_ties_and_signs():
    a = np.array([5, 7, -5, -7, 6, -6, 4, -4])  # /2: 2.5 3.5 -2.5 -3.5 3 -3 2 -2
    assert kernels.div_round(a, 2, "half_even").tolist() == [2, 4, -2, -4, 3, -3, 2, -2]
    assert kernels.div_round(a, 2, "half_up").tolist() == [3, 4, -2, -3, 3, -3, 2, -2]
    assert kernels.div_round(a, 2, "floor").tolist() == [2, 3, -3, -4, 3, -3, 2, -2]
    with pytest.raises(ValueError, match="positive divisor"):
        kernels.div_round(a, 0, "floor")
    with pytest.raises(ValueError, match="unknown rounding"):
        kernels.div_round(a, 2, "nearest")


@PROPERTY
@given(q=st.lists(INT64, min_size=1, max_size=20), k=st.one_of(st.integers(1, 4), st.integers(-20, 62)),
       rounding=st.sampled_from(fixed_point.ROUNDINGS))
def test_shift_round_is_the_rounded_power_of_two_scaling(q, k, rounding):
    got = kernels.shift_round(np.array(q), k, rounding)
    assert got.tolist() == [ref_round(Fraction(x) / Fraction(2) ** k, rounding) for x in q]
    for shift in (k, tf.constant(k, tf.int64)):  # a Python int picks its branch; a tensor computes both
        twin = kernels_tf.shift_round(tf.constant(q, tf.int64), shift, rounding)
        np.testing.assert_array_equal(twin.numpy(), got)


def test_the_constants_of_a_shift_from_outside_a_loop_are_built_outside_it():
    """kernels_tf.in_home_graph: inside a while loop (cached decoding), a shift amount that comes from
    outside gives its rounding constants and shift splits outside the loop (once, not per token);
    the loop body keeps only the per-element ops, and the integers are the spec's."""
    @tf.function
    def shifted_thrice(q, k):
        body = lambda i, q: (i + 1, kernels_tf.shift_round(q, k, "half_even"))  # noqa: E731
        return tf.while_loop(lambda i, q: i < 3, body, [tf.constant(0), q])[1]

    q = np.array([37, -37, 12, -12, 6, 7], np.int64)
    expected = q
    for _ in range(3):
        expected = kernels.shift_round(expected, 1, "half_even")
    np.testing.assert_array_equal(shifted_thrice(tf.constant(q), tf.constant(1, tf.int64)).numpy(), expected)
    graph = shifted_thrice.get_concrete_function(tf.TensorSpec([None], tf.int64),
                                                 tf.TensorSpec([], tf.int64)).graph.as_graph_def()
    (body,) = [fn for fn in graph.library.function if "body" in fn.signature.name]
    ops = sorted(n.op for n in body.node_def if n.op not in ("Identity", "Const", "NoOp"))
    # the loop's two counters, then q + half + ((q >> k) & 1) >> k << 0: no max/min/shift constants
    assert ops == ["AddV2"] * 4 + ["BitwiseAnd", "LeftShift", "RightShift", "RightShift"], ops


def test_shift_round_per_element_shifts_and_its_range():
    q = np.array([12, 12, 12, -12])
    shifts = np.array([2, 0, -3, 3])
    np.testing.assert_array_equal(kernels.shift_round(q, shifts, "half_even"), [3, 12, 96, -2])
    for rounding in fixed_point.ROUNDINGS:
        np.testing.assert_array_equal(kernels_tf.shift_round(tf.constant(q), tf.constant(shifts), rounding),
                                      kernels.shift_round(q, shifts, rounding))
    # the largest shift: 2^62 as the divisor, no intermediate may leave int64
    top = np.array([0, 2**61, -(2**61), 2**62 - 1, -(2**62)])
    for rounding, expected in (("half_up", [0, 1, 0, 1, -1]), ("half_even", [0, 0, 0, 1, -1]),
                               ("floor", [0, 0, -1, 0, -1])):
        assert kernels.shift_round(top, 62, rounding).tolist() == expected
        for shift in (62, tf.constant(62, tf.int64)):
            assert kernels_tf.shift_round(tf.constant(top), shift, rounding).numpy().tolist() == expected
    with pytest.raises(ValueError, match="62 bits"):
        kernels.shift_round(q, 63, "floor")


@PROPERTY
@given(n=st.lists(st.one_of(st.integers(0, 2**62 - 1), st.integers(0, 2**12),
                            st.integers(1, 2**31 - 1).map(lambda r: r * r - 1)), min_size=1, max_size=20))
def test_isqrt_is_the_integer_square_root(n):
    got = kernels.isqrt(np.array(n, np.int64))
    assert got.tolist() == [math.isqrt(x) for x in n]
    np.testing.assert_array_equal(kernels_tf.isqrt(tf.constant(n, tf.int64)).numpy(), got)


def test_isqrt_six_newton_steps_reach_the_root_at_the_hardest_inputs():
    # every n below 2^16, and r^2 - 1, r^2, r^2 + 2r around the largest roots (the start 2^16, 2^31
    # is farthest from sqrt(n) just above a power of four; r^2 - 1 ends one above the root after
    # five steps: the sixth is needed)
    roots = np.concatenate([np.arange(2**15 - 40, 2**15 + 40), np.arange(2**31 - 80, 2**31)])
    n = np.concatenate([np.arange(2**16), roots * roots - 1, roots * roots, roots * roots + 2 * roots,
                        4 ** np.arange(31), 4 ** np.arange(1, 31) + 1])
    n = n[n < kernels.ISQRT_MAX]
    assert kernels.isqrt(n).tolist() == [math.isqrt(int(x)) for x in n]
    np.testing.assert_array_equal(kernels_tf.isqrt(tf.constant(n, tf.int64)).numpy(), kernels.isqrt(n))


def test_isqrt_in_float64_is_exact_below_its_limit_and_not_above():
    """_isqrt_float64 (TF's float64 LayerNorm route) at its hardest inputs, r^2 - 1 and r^2 for the
    largest roots below the limit; above it the float root of r^2 - 1 rounds up to r, which is why
    the route stops there."""
    limit = kernels_tf.ISQRT_FLOAT64_LIMIT
    roots = np.concatenate([np.arange(1, 2**12), np.arange(math.isqrt(limit) - 2**12, math.isqrt(limit))])
    v = np.concatenate([roots * roots - 1, roots * roots, roots * roots + 2 * roots, [limit - 1]])
    assert v.max() < limit
    got = kernels_tf._isqrt_float64(tf.constant(v, tf.float64)).numpy()
    assert got.tolist() == [math.isqrt(int(x)) for x in v]
    r = 2**31 - 1  # beyond the limit the shortcut fails
    assert kernels_tf._isqrt_float64(tf.constant([r * r - 1], tf.float64)).numpy()[0] == r


def test_int32_lanes_keep_their_width_and_the_same_integers():
    q = np.array([-(2**30), -5, -3, -2, 0, 1, 2, 3, 6, 2**30 - 1], np.int32)
    for rounding in fixed_point.ROUNDINGS:
        for k in (0, 1, 2, 17, 30):
            got = kernels.shift_round(q, k, rounding)
            assert got.dtype == np.int32
            assert got.tolist() == kernels.shift_round(q.astype(np.int64), k, rounding).tolist()
        # a left shift or a shift past 30 bits leaves the lane: int64
        assert kernels.shift_round(q, -3, rounding).dtype == np.int64
        assert kernels.shift_round(q, 31, rounding).dtype == np.int64
    assert kernels.clip_to(q, 8, True).dtype == np.int32
    assert kernels.requantize(q, 2, 8, True, "half_even").tolist() == \
        kernels.clip_to(kernels.shift_round(q.astype(np.int64), 2, "half_even"), 8, True).tolist()


def test_isqrt_domain_and_integer_inputs_only():
    assert kernels.isqrt(np.array([2**62 - 1])).tolist() == [2**31 - 1]
    for bad in ([-1], [2**62]):
        with pytest.raises(ValueError, match="0 <= n < 2"):
            kernels.isqrt(np.array(bad, np.int64))
    with pytest.raises(TypeError, match="integer arrays"):
        kernels.isqrt(np.array([4.0]))


def test_clip_to_the_grid_range():
    q = np.array([-300, -128, 0, 127, 300])
    assert kernels.clip_to(q, 8, True).tolist() == [-128, -128, 0, 127, 127]
    assert kernels.clip_to(q, 8, False).tolist() == [0, 0, 0, 127, 255]


# ---- grids as tensors (they follow trainable thresholds in training) ------------------------------


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 12), out_bits=st.integers(4, 16),
       rounding=st.sampled_from(fixed_point.ROUNDINGS))
def test_tf_twins_take_the_grids_as_tensors_in_a_graph(seed, f, out_bits, rounding):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-(2**15), 2**15, size=(2, 3, 9))
    mask = rng.random((2, 1, 9)) < 0.8
    f_var, f_out_var = tf.Variable(f, dtype=tf.int64), tf.Variable(f + 2, dtype=tf.int64)

    @tf.function
    def twins(scores, q):
        probs = kernels_tf.softmax(scores, f_var, tf.constant(mask), out_bits, rounding)
        normed = kernels_tf.layer_norm(q, gamma, beta, 3, f_var, f_out_var, 16, rounding)
        return probs, normed

    q = rng.integers(-(2**15), 2**15, size=(4, 24))
    gamma, beta = rng.integers(1, 2**12, size=24), rng.integers(-(2**20), 2**20, size=24)
    probs, normed = twins(tf.constant(scores), tf.constant(q))
    np.testing.assert_array_equal(probs.numpy(), kernels.softmax(scores, f, mask, out_bits, rounding))
    np.testing.assert_array_equal(normed.numpy(),
                                  kernels.layer_norm(q, gamma, beta, 3, f, f + 2, 16, rounding))
    f_var.assign(f + 1)  # the same graph follows the new grid
    probs = twins(tf.constant(scores), tf.constant(q))[0]
    np.testing.assert_array_equal(probs.numpy(), kernels.softmax(scores, f + 1, mask, out_bits, rounding))
