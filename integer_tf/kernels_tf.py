"""The integer kernels of `integer/kernels.py` in TensorFlow, for training and TF decoding: the graph
computes exactly the integers the accelerator will. Step for step like integer/kernels.py, except
where another route to the same integers costs less in TF (each proven in its docstring and tested
against the spec):

- int64 is the general route. TF's int64 ops are several times slower per element than its float64
  ones, and its int64 division is a scalar loop. So where every integer of a kernel provably stays
  exact in float64 (below 2^53, or the rounding provably cannot matter), the kernel holds its
  integers in float64: the division's quotient (`div_round`), LayerNorm's exact normalization
  (`_layer_norm_float64`, for d <= 1295 at the default precision), the softmax of float64 scores
  (`_softmax_float64`, for score grids f <= 45 - h; a tf.cond picks the int64 route above, as the
  residual add in intonly_layers does). The int64 route stays for the rest and is tested as hard.
- the add before a rounding shift, the float64 square root and bit length, the softmax mask by
  arithmetic, exact powers of two built from their exponent bits (`power_of_two`).
- a grid that comes from outside a while loop (cached decoding) has its scalar constants built there
  (`in_home_graph`), once per decoded batch instead of once per token.

Every op has a GPU kernel for its dtype (scripts/bench_gpu_placement.py): int64 and float64, no int32
(TF keeps int32 on the host).

The grids (`f`, `f_gamma`, `f_out`) may be Python ints or int scalar tensors: during training they
follow trainable thresholds. Python ints are range-checked here (ValueError, as in integer/kernels.py); for
tensors the ranges are the caller's (the clamp on log2_t keeps every grid far inside them).

Gradients are not defined here: a kernel's caller wraps it as the forward of a straight-through
or surrogate estimator (docs/integer_only.md).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from integer import fixed_point, kernels


def in_home_graph(fn, *grids):
    """fn(*grids), built in the graph that holds the grid tensors. In a while loop (cached decoding)
    a grid comes from the graph around it (intonly_layers.graph_constant), so the scalar constants a
    kernel derives from it (shift amounts, rounding offsets, powers of two) are computed once per
    decoded batch instead of once per token; anywhere else this is fn(*grids)."""
    graphs = {getattr(g, "graph", None) for g in grids if tf.is_tensor(g)} - {None}
    if tf.executing_eagerly() or len(graphs) != 1:
        return fn(*grids)
    (graph,) = graphs
    if graph is tf.compat.v1.get_default_graph():
        return fn(*grids)
    with graph.as_default():
        return fn(*grids)


def div_round(a: tf.Tensor, b: tf.Tensor, rounding: str, max_abs_a: int | None = None) -> tf.Tensor:
    """R(a / b) for int64 a and 0 < b <= 2^62 (kernels.div_round). With a static bound |a| <=
    max_abs_a < 2^51 (the kernels below know theirs) in float64 (_div_round_float64); otherwise
    from a = q b + r, 0 <= r < b: up when 2r + t > b, t = 1 for half_up (the tie goes up), t = q & 1
    for half_even."""
    a, b = tf.cast(a, tf.int64), tf.cast(b, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    if max_abs_a is not None and max_abs_a < 1 << 51:
        return _div_round_float64(a, b, rounding)
    q = tf.math.floordiv(a, b)
    if rounding == "floor":
        return q
    twice_r = tf.bitwise.left_shift(a - q * b, tf.constant(1, tf.int64))
    t = tf.constant(1, tf.int64) if rounding == "half_up" else tf.bitwise.bitwise_and(q, 1)
    return q + tf.cast(twice_r + t > b, tf.int64)


def _div_round_float64(a: tf.Tensor, b: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(a / b) for int64 |a| < 2^51 and b >= 1 from y = fl(a / fl(b)), the float64 quotient (TF's
    int64 division is a scalar loop, several times slower): round_float64's proof."""
    return tf.cast(round_float64(tf.cast(a, tf.float64) / tf.cast(b, tf.float64), rounding), tf.int64)


def round_float64(y: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(y) as an integral float64: exact for an exact y, and R(Q) for y = fl(Q), the float64
    quotient of integers Q = a / b with |a| < 2^51, b >= 1 (a exact in float64; b may round where it
    exceeds 2^53). Proof for the quotient:
    - b <= 2^53: |y - Q| <= |Q| 2^-53 < 1 / (2b). Where Q is no integer, the next integer is at least
      1/b away, so floor(y) = floor(Q); where Q is no half-integer, the nearest half-integer is at
      least 1/(2b) away ((2a - (2n+1) b) / b is a nonzero integer over b), so y lies on Q's side of
      it; a tie Q = n + 1/2 is exact in float64, y = Q.
    - b > 2^53: |Q| < 2^-2 and |y| < 1/2: the rounded quotient is 0 (floor: -1 for a < 0), and so
      are the roundings of y.
    So floor(y) is floor(Q), round_half_even(y) (tf.round) is R(Q), and half_up goes up where
    y - floor(y) >= 1/2 (that difference is exact: a multiple of y's ulp below 1)."""
    if rounding == "half_even":
        return tf.round(y)
    down = tf.floor(y)
    if rounding == "floor":
        return down
    return down + tf.cast(y - down >= 0.5, tf.float64)


def shift_round(q: tf.Tensor, k: tf.Tensor | int, rounding: str) -> tf.Tensor:
    """R(q * 2^-k) for |q| <= 2^62, -62 <= k <= 62 (kernels.shift_round): k > 0 is
    shift_right_round, k <= 0 the exact left shift q << -k. A Python int k picks its branch here; a
    tensor k (a scalar, or per channel along the last axis) takes both, each shifting by 0 where
    it is not the one."""
    if isinstance(k, (int, np.integer)):
        if k <= 0:
            return tf.bitwise.left_shift(tf.cast(q, tf.int64), tf.constant(-int(k), tf.int64))
        return shift_right_round(q, int(k), rounding)
    right, left = in_home_graph(lambda k: (tf.maximum(k, 0), tf.maximum(-k, 0)), _as_int64(k))
    return tf.bitwise.left_shift(shift_right_round(q, right, rounding), left)


def shift_right_round(q: tf.Tensor, k: tf.Tensor | int, rounding: str) -> tf.Tensor:
    """R(q * 2^-k) for |q| <= 2^62 and 0 <= k <= 62, by an add before the arithmetic right shift:
    floor(q 2^-k + 1/2) is half_up; half_even adds 1/2 - 2^-k instead, and the bit q >> k, so that
    only an even tie stays down. The added constants have k's shape: k = 0 adds nothing."""
    q = tf.cast(q, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    k = int(k) if isinstance(k, (int, np.integer)) else _as_int64(k)
    if rounding == "floor":
        return tf.bitwise.right_shift(q, k)
    rounds, half = in_home_graph(lambda k: _rounding_offsets(k, rounding), k)
    if rounding == "half_up":
        q = q + half
    elif rounding == "half_even":
        q = q + half + tf.bitwise.bitwise_and(tf.bitwise.right_shift(q, k), rounds)
    return tf.bitwise.right_shift(q, k)


def _as_int64(k) -> tf.Tensor:
    """k as an int64 tensor, cast in k's own graph (in_home_graph)."""
    k = tf.convert_to_tensor(k)
    return k if k.dtype == tf.int64 else in_home_graph(lambda k: tf.cast(k, tf.int64), k)


def _rounding_offsets(k, rounding: str):
    """(rounds, half) for shift_right_round by k >= 0: rounds = 1 where k > 0; half = 2^(k-1) for
    half_up, 2^(k-1) - 1 for half_even (its tie bit is added apart), 0 where k = 0."""
    if isinstance(k, int):
        rounds = int(k > 0)
        half = rounds << max(k - 1, 0)
    else:
        rounds = tf.minimum(k, 1)
        half = tf.bitwise.left_shift(rounds, tf.maximum(k - 1, 0))
    return rounds, half - rounds if rounding == "half_even" else half


def isqrt(n: tf.Tensor) -> tf.Tensor:
    """floor(sqrt(n)) for int64 0 <= n < 2^62 (kernels.isqrt's integer), by the float64 root and one
    correction instead of Newton steps. With r = floor(sqrt(n)) < 2^31, x = floor(fl(sqrt(fl(n)))):
    - x >= r: fl and sqrt are monotonic and fl(r^2) is within 2^-53 of r^2 relative, so sqrt(fl(r^2))
      lies less than r 2^-54, under half an ulp of r, from the float r, and rounds to it;
    - x <= r + 1: the float root is within 2^-52 relative, below 2^-21 absolute, of sqrt(n);
    so one step down where x^2 > n makes it exact."""
    n = tf.cast(n, tf.int64)
    x = tf.cast(tf.sqrt(tf.cast(n, tf.float64)), tf.int64)
    return x - tf.cast(x * x > n, tf.int64)


# ---- softmax ----


def _softmax_int64(a) -> tf.Tensor:
    a = tf.convert_to_tensor(a)
    if not a.dtype.is_integer:
        raise TypeError(f"integer kernels take integer tensors, got {a.dtype.name}")
    return tf.cast(a, tf.int64)


def _is_tensor_grid(f) -> bool:
    return tf.is_tensor(f) or isinstance(f, tf.Variable)


def exp_neg(x: tf.Tensor, f: int | tf.Tensor, F: int = kernels.EXP_F, m: int = 1) -> tf.Tensor:
    """exp(x 2^-f / sqrt(m)) for int64 x <= 0 on grid f, on the grid 0.3585 * 2^-2F / m
    (kernels.exp_neg; x > 0 is not checked here)."""
    x = _softmax_int64(x)
    kernels._check_exp_grids(0 if _is_tensor_grid(f) else f, F, m)  # f only when it is a Python int
    q_ln2, q_b, q_c = kernels.exp_constants(F, m)
    h = kernels._check_scale(m)

    def grid_constants(f):  # the clamp -2^c and the shift onto grid F, as integers
        clamp_log2, to_grid_F = _exp_grid(f, F, h)
        if not _is_tensor_grid(f):
            return -(1 << clamp_log2), to_grid_F
        return -tf.bitwise.left_shift(tf.constant(1, tf.int64), clamp_log2), to_grid_F

    low, to_grid_F = in_home_graph(grid_constants, f)
    x = tf.maximum(x, low)
    x = shift_round(x, to_grid_F, kernels.EXP_ROUNDING)
    z = div_round(-x, q_ln2, "floor", max_abs_a=1 << (kernels.EXP_X_MIN_LOG2 + h + F))  # -x: the clamp
    p = x + z * tf.constant(q_ln2, tf.int64)
    s = p + tf.constant(q_b, tf.int64)
    return tf.bitwise.right_shift(s * s + tf.constant(q_c, tf.int64),
                                  tf.minimum(z, tf.constant(kernels.EXP_SHIFT_CAP, tf.int64)))


def _exp_grid(f: int | tf.Tensor, F: int, h: int):
    """(c, f - F) for exp_neg's input on grid f: the clamp at -2^c, c = max(6 + h + f, 0) (exp(-64)
    is 0 on every grid), and the shift onto grid F; Python ints for an int f, else int64 tensors."""
    if not _is_tensor_grid(f):
        return max(kernels.EXP_X_MIN_LOG2 + h + int(f), 0), int(f) - F
    f = tf.cast(f, tf.int64)
    return tf.maximum(kernels.EXP_X_MIN_LOG2 + h + f, 0), f - F


def _mask_terms(mask: tf.Tensor, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
    """(visible, offset) in dtype on the mask's own (broadcast) shape: 1 where a key may be attended,
    and 0 there or -2^62 where it is masked, 2^62 below every visible score (|q| < 2^61). Built
    where the mask lives (in_home_graph): a source mask's once, outside a decoding loop."""
    def terms(mask):
        visible = tf.cast(mask, dtype)
        return visible, (visible - 1) * tf.constant(2**62, dtype)
    return in_home_graph(terms, mask)


def softmax(q: tf.Tensor, f: int | tf.Tensor, mask, out_bits: int, rounding: str,
            F: int = kernels.EXP_F, m: int = 1, normalization: str = "exact",
            grid_fits_float64: bool | None = None) -> tf.Tensor:
    """softmax(x / sqrt(m)) over the last axis on the probability grid 2^-out_bits (kernels.softmax):
    `mask` a bool tensor broadcasting against q (True = may attend) or None; fully masked rows give
    zeros; |q| < 2^61 (scores are accumulators, far smaller), as int64 or as float64 holding the
    integers (intonly_layers' scores: then in float64 where softmax_fits_float64 and
    softmax_grid_fits_float64 admit it). `grid_fits_float64`: the caller's value of
    softmax_grid_fits_float64 when it has decided it for a whole graph (a decoding); None: the
    kernel decides, by a tf.cond for a tensor grid. normalization="reciprocal":
    kernels.normalize_reciprocal's one division per row."""
    kernels.check_normalization(normalization)
    q = tf.convert_to_tensor(q)
    if q.dtype != tf.float64:
        q = _softmax_int64(q)
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    if mask is None:
        mask = tf.ones_like(q, tf.bool)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise TypeError(f"the softmax mask is a bool tensor (True = may attend), got {mask.dtype.name}")
    kernels._check_softmax_widths(q.shape[-1], out_bits, F, m)

    def float64_route():
        return _softmax_float64(q, f, mask, out_bits, rounding, F, m)

    def int64_route():
        return _softmax_int64_route(tf.cast(q, tf.int64), f, mask, out_bits, rounding, F, m, normalization)

    if q.dtype != tf.float64 or not softmax_fits_float64(out_bits, F, m, normalization):
        return int64_route()
    fits = softmax_grid_fits_float64(f, m) if grid_fits_float64 is None else grid_fits_float64
    if isinstance(fits, bool | np.bool_):
        return float64_route() if fits else int64_route()
    return tf.cond(fits, float64_route, int64_route)


def _softmax_int64_route(q: tf.Tensor, f, mask: tf.Tensor, out_bits: int, rounding: str, F: int, m: int,
                         normalization: str) -> tf.Tensor:
    # masked keys by arithmetic on the mask's shape, not by selects over the scores (_mask_terms);
    # x = min(q - top, 0), so that a masked key above the top stays in exp's domain; its e is
    # multiplied by 0
    visible, offset = _mask_terms(mask, tf.int64)
    top = tf.reduce_max(q + offset, axis=-1, keepdims=True)
    x = tf.minimum(q - top, 0)
    e = exp_neg(x, f, F, m) * visible
    total = tf.reduce_sum(e, axis=-1, keepdims=True)
    if normalization == "reciprocal":
        probs = _reciprocal_probs(e, total, out_bits, rounding)
    else:
        shifted = tf.bitwise.left_shift(e, tf.constant(out_bits, tf.int64))
        probs = div_round(shifted, tf.maximum(total, tf.constant(1, tf.int64)), rounding,
                          max_abs_a=kernels.exp_max(F, m) << out_bits)
    _, p = fixed_point.integer_range(out_bits, False)
    return tf.minimum(probs, tf.constant(p, tf.int64))  # the clip: probs >= 0 (e >= 0, S > 0)


# _softmax_float64 is exact for scores on grids f <= this - h (2^h ~ sqrt(m)): exp's clamp 2^(6+h+f)
# then stays below 2^51, and every value of the shift onto grid F below 2^53
SOFTMAX_FLOAT64_MAX_F = 45


def softmax_fits_float64(out_bits: int, F: int, m: int, normalization: str = "exact") -> bool:
    """Whether _softmax_float64's static bounds hold: the exact normalization, exp's largest
    L = q_b^2 + q_c below 2^53 (and with it every exp value), the division's numerator e 2^out_bits
    below 2^51."""
    return normalization == "exact" and kernels.exp_max(F, m) << out_bits < 1 << 51


def softmax_grid_fits_float64(f: int | tf.Tensor, m: int) -> bool | tf.Tensor:
    """Whether scores on grid f are within _softmax_float64's grid bound, f <= SOFTMAX_FLOAT64_MAX_F
    - h: a bool for a Python int f, a bool tensor (built where f lives) for a tensor."""
    max_f = SOFTMAX_FLOAT64_MAX_F - kernels._check_scale(m)
    if not _is_tensor_grid(f):
        return bool(f <= max_f)
    return in_home_graph(lambda f: tf.cast(f, tf.int64) <= max_f, f)


def _scale_down(v: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """v 2^-k exactly, for float64 v >= 1 and int64 0 <= k <= 1000: k off v's biased exponent field
    (the result stays a normal float; one integer op instead of building 2^-k)."""
    bits = tf.bitcast(v, tf.int64) - tf.bitwise.left_shift(k, tf.constant(52, tf.int64))
    return tf.bitcast(bits, tf.float64)


def _softmax_float64(q: tf.Tensor, f, mask: tf.Tensor, out_bits: int, rounding: str, F: int, m: int
                     ) -> tf.Tensor:
    """The exact softmax with its integers held in float64 (TF's int64 ops are several times slower
    per element, its division a scalar loop), for scores q on a grid f <= SOFTMAX_FLOAT64_MAX_F - h
    and the precisions softmax_fits_float64 admits. Each step is the int64 route's, exact:
    - the row maximum and x = min(q - top, 0): a masked key's q - 2^62 rounds but stays below every
      visible score (> -2^61); q - top is exact below 2^53, and beyond it at most -2^53, clamped to
      -2^max(6+h+f, 0) >= -2^51 like the exact difference;
    - the shift onto grid F, floor(x 2^(F-f) + 1/2) (half_up), on a value of at most 53 bits;
    - z = floor(-x / q_ln2) (round_float64's floor: -x < 2^51), p, s, L = s^2 + q_c < 2^53 exactly,
      e = floor(L 2^-z) (_scale_down; z < 2^(6.5) / ln 2 < 132, and the int64 route's cap at 62
      gives 0 like L 2^-z, for L < 2^62);
    - S = sum e is exact while below 2^53; above it both S and the float sum exceed 2^52, and
      e 2^out_bits < 2^51 makes every probability 0 either way. R(e 2^out_bits / S) by round_float64."""
    q_ln2, q_b, q_c = kernels.exp_constants(F, m)
    h = kernels._check_scale(m)

    def grid_constants(f):  # exp_neg's clamp -2^c and 2^(F-f), exact powers of two
        clamp_log2, to_grid_F = _exp_grid(f, F, h)
        return -power_of_two(clamp_log2), power_of_two(-to_grid_F)

    low, to_grid_F = in_home_graph(grid_constants, f)
    visible, offset = _mask_terms(mask, tf.float64)
    top = tf.reduce_max(q + offset, axis=-1, keepdims=True)
    x = tf.maximum(tf.minimum(q - top, 0.0), low)
    x = tf.floor(x * to_grid_F + 0.5)
    z = tf.floor(x / -q_ln2)
    s = x + z * q_ln2 + q_b
    e = tf.floor(_scale_down(s * s + q_c, tf.cast(z, tf.int64))) * visible
    total = tf.maximum(tf.reduce_sum(e, axis=-1, keepdims=True), 1.0)
    probs = round_float64(e / (total * 2.0**-out_bits), rounding)  # the float of e 2^out_bits / S
    _, p = fixed_point.integer_range(out_bits, False)
    return tf.cast(tf.minimum(probs, float(p)), tf.int64)


def _reciprocal_probs(e: tf.Tensor, total: tf.Tensor, out_bits: int, rounding: str) -> tf.Tensor:
    """kernels._normalize_reciprocal before the clip: t = bitlength(S) - RK, r = R(2^(2 RK) / (S 2^-t)),
    R((e 2^-t) r 2^-(2 RK - out_bits))."""
    width = out_bits + kernels.RECIPROCAL_GUARD
    t = bit_length(total) - width
    scaled = shift_round(total, t, "floor")
    r = tf.where(total > 0, div_round(tf.bitwise.left_shift(tf.ones_like(total), 2 * width),
                                      tf.maximum(scaled, 1), rounding), tf.zeros_like(total))
    return shift_round(shift_round(e, t, "floor") * r, 2 * width - out_bits, rounding)


# ---- LayerNorm ----


def bit_length(n: tf.Tensor) -> tf.Tensor:
    """The bit length of int64 0 <= n < 2^63 (kernels.bit_length's integer), read from the exponent
    of float64(n): n >= 1 lies in [2^(E-1023), 2^(E-1022)) for the biased exponent E, so the length
    is E - 1022. Above 2^53 the conversion may round n up to the next power of two, one too long:
    where n >> (length - 1) is 0, one less. n = 0 has E = 0 and gives 0."""
    n = tf.cast(n, tf.int64)
    exponent = tf.bitwise.right_shift(tf.bitcast(tf.cast(n, tf.float64), tf.int64), 52)
    length = exponent - 1022
    too_long = tf.bitwise.right_shift(n, tf.maximum(length - 1, 0)) == 0
    return tf.maximum(length - tf.cast(too_long, tf.int64), 0)


def _layer_norm_fits_float64(d: int, K: int, F: int) -> bool:
    """Whether every integer of _layer_norm_float64 is exact in float64 for rows of d values: the
    moment W < d^2 (2^30 + 2^32) below 2^53 (d <= 1295), floor(W 2^2k) < 2^2K at most 2^52, and the
    division's numerator below 2^51 (the defaults K = 24, F = 16: up to d = 1024 and beyond)."""
    w_max = d * d * (kernels.LN_MAX_ABS_Q**2 + kernels.LN_MAX_EPS_Q)
    return (w_max < 1 << 53 and 1 << 2 * K <= ISQRT_FLOAT64_LIMIT
            and _layer_norm_max_numerator(d, K, F) < 1 << 51)


def power_of_two(k: tf.Tensor) -> tf.Tensor:
    """2^k as float64 for integer -1022 <= k <= 1023, exactly: the float64 whose biased exponent is
    k + 1023 and whose mantissa is zero (tf.pow need not be exact)."""
    k = tf.cast(k, tf.int64)
    return tf.bitcast(tf.bitwise.left_shift(k + 1023, tf.constant(52, tf.int64)), tf.float64)


def _layer_norm_float64(q: tf.Tensor, gamma_q: tf.Tensor, beta_q: tf.Tensor, eps_q: tf.Tensor,
                        out_shift: tf.Tensor | int, out_bits: int, rounding: str, K: int, F: int
                        ) -> tf.Tensor:
    """layer_norm's exact normalization with its integers held in float64 (TF's int64 ops are
    several times slower per element, its division a scalar loop), for the shapes and precisions
    _layer_norm_fits_float64 admits. Each step is kernels.layer_norm's, exact:
    - s, c, sum q^2 and W = d sum q^2 - s^2 + d^2 eps_q are integers below 2^53: exact sums and products;
    - bit_length(W) is E - 1022 for the biased exponent E of the exact W >= 1, so
      k = (2K - bit_length(W)) >> 1 = (2K + 1022 - max(E, 1022)) >> 1 (W = 0: E = 0, k = K);
    - floor(W 2^2k) scales exactly by a power of two (power_of_two) and floors: below 2^2K <= 2^52;
    - isqrt(floor(W 2^2k)) by _isqrt_float64;
    - n = R(c 2^(k+F) / D) is the float quotient c / (D 2^-(k+F)), the same float as fl(A / B) of
      the integers the int64 route divides (round_float64, |A| < 2^51);
    - y 2^-out_shift = (gamma_q 2^-out_shift) n + beta_q 2^-out_shift: y = gamma_q n + beta_q < 2^49
      is exact, and so is each power-of-two scaling; then R and the clip, exact on an exact value."""
    d = q.shape[-1]
    x = tf.cast(q, tf.float64)
    s = tf.reduce_sum(x, axis=-1, keepdims=True)
    c = d * x - s
    d2_eps = in_home_graph(lambda e: tf.cast(d * d * tf.cast(e, tf.int64), tf.float64), eps_q)
    w = d * tf.reduce_sum(x * x, axis=-1, keepdims=True) - s * s + d2_eps
    exponent = tf.bitwise.right_shift(tf.bitcast(w, tf.int64), tf.constant(52, tf.int64))  # biased
    k = tf.bitwise.right_shift(2 * K + 1022 - tf.maximum(exponent, 1022), tf.constant(1, tf.int64))
    root = tf.maximum(_isqrt_float64(tf.floor(w * power_of_two(2 * k))), 1.0)
    n = round_float64(c / (root * power_of_two(-F - k)), rounding)

    def scaled(g, b, o):  # gamma_q and beta_q times 2^-out_shift: y 2^-out_shift in one multiply-add
        scale = power_of_two(-tf.cast(o, tf.int64))
        return tf.cast(g, tf.float64) * scale, tf.cast(b, tf.float64) * scale

    gamma, beta = in_home_graph(scaled, gamma_q, beta_q, out_shift)
    n_out, p_out = fixed_point.integer_range(out_bits, signed=True)
    out = round_float64(gamma * n + beta, rounding)
    return tf.cast(tf.clip_by_value(out, float(n_out), float(p_out)), tf.int64)


ISQRT_FLOAT64_LIMIT = 1 << 52  # _isqrt_float64 takes v below this


def _isqrt_float64(v: tf.Tensor) -> tf.Tensor:
    """floor(sqrt(v)) for integral float64 0 <= v < 2^52 (ISQRT_FLOAT64_LIMIT), exactly, with no
    correction step: for r^2 <= v < (r + 1)^2 the correctly rounded root is at least r (sqrt and the
    rounding are monotonic, r is a float) and stays below r + 1, for sqrt(v) <= sqrt((r + 1)^2 - 1)
    lies more than 1 / (2r + 2) below r + 1 and the rounding moves it by at most r 2^-53, less than
    that while r < 2^26."""
    return tf.floor(tf.sqrt(v))


def _layer_norm_max_numerator(d: int, K: int, F: int) -> int:
    """The largest |c 2^(k+F)| of layer_norm's division (kernels.layer_norm_bounds' numerator for
    16-bit inputs, the widest it takes)."""
    return kernels.layer_norm_bounds(d, 16, 1, 0, kernels.LN_MAX_EPS_Q, 8, K, F)["numerator"]


def layer_norm(q: tf.Tensor, gamma_q: tf.Tensor, beta_q: tf.Tensor, eps_q: tf.Tensor | int,
               f_gamma: int | tf.Tensor, f_out: int | tf.Tensor, out_bits: int, rounding: str,
               K: int = kernels.LN_K, F: int = kernels.LN_F, normalization: str = "exact") -> tf.Tensor:
    """Integer LayerNorm over the last axis, the same integers as kernels.layer_norm (see there for
    the algorithm, both normalizations, bounds and error bound): q as int64, or as float64 holding
    the integers (residual sums: intonly_layers). The static arguments are checked
    (ValueError); the data bounds (|q|, |gamma_q| <= 2^15, |beta_q| < 2^48, 0 <= eps_q <= 2^32) are the
    caller's."""
    kernels.check_normalization(normalization)
    q = tf.convert_to_tensor(q)
    gamma_q, beta_q = tf.cast(gamma_q, tf.int64), tf.cast(beta_q, tf.int64)
    d = q.shape[-1]
    if d is None:
        raise ValueError("layer_norm needs a static last axis")
    if _is_tensor_grid(f_gamma) or _is_tensor_grid(f_out):
        kernels.check_layer_norm_args(d, None, out_bits, rounding, K, F)
        out_shift = in_home_graph(lambda f_g, f_o: tf.cast(f_g, tf.int64) + F - tf.cast(f_o, tf.int64),
                                  f_gamma, f_out)
    else:
        out_shift = f_gamma + F - f_out
        kernels.check_layer_norm_args(d, out_shift, out_bits, rounding, K, F)
    if normalization == "exact" and _layer_norm_fits_float64(d, K, F):
        return _layer_norm_float64(q, gamma_q, beta_q, eps_q, out_shift, out_bits, rounding, K, F)
    q = tf.cast(q, tf.int64)
    s = tf.reduce_sum(q, axis=-1, keepdims=True)
    c = d * q - s
    d2_eps = in_home_graph(lambda e: d * d * tf.cast(e, tf.int64), eps_q)
    w = d * tf.reduce_sum(q * q, axis=-1, keepdims=True) - s * s + d2_eps
    k = tf.bitwise.right_shift(2 * K - bit_length(w), tf.constant(1, tf.int64))  # floor division by 2
    root = tf.maximum(isqrt(shift_round(w, -2 * k, "floor")), 1)
    if normalization == "reciprocal":
        G = kernels.LN_RECIPROCAL_G
        top = tf.bitwise.left_shift(tf.ones_like(root), K + G)
        r = tf.where(w > 0, div_round(top, root, rounding), tf.zeros_like(root))
        n = shift_round(c * r, K + G - k - F, rounding)
    else:
        up = k + F  # per row: the numerator or the divisor shifts up
        numerator = tf.bitwise.left_shift(c, tf.maximum(up, 0))
        n = div_round(numerator, tf.bitwise.left_shift(root, tf.maximum(-up, 0)), rounding,
                      max_abs_a=_layer_norm_max_numerator(d, K, F))
    y = gamma_q * n + beta_q
    n_out, p_out = fixed_point.integer_range(out_bits, signed=True)
    return tf.clip_by_value(shift_round(y, out_shift, rounding), n_out, p_out)
