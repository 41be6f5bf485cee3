"""The integer kernels of `integer/kernels.py` in TensorFlow (int64 tensors), for training: the graph
computes exactly the integers the accelerator will, line for line like integer/kernels.py.

The grids (`f`, `f_gamma`, `f_out`) may be Python ints or int scalar tensors: during training they
follow trainable thresholds. Python ints are range-checked here (ValueError, as in integer/kernels.py); for
tensors the ranges are the caller's (the clamp on log2_t keeps every grid far inside them).

Gradients are not defined here: a kernel's caller wraps it as the forward of a straight-through
or surrogate estimator (docs/integer_only.md).
"""

from __future__ import annotations

import tensorflow as tf

from integer import fixed_point, kernels


def div_round(a: tf.Tensor, b: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(a / b) for int64 a and b > 0 (kernels.div_round)."""
    a, b = tf.cast(a, tf.int64), tf.cast(b, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    q = tf.math.floordiv(a, b)
    if rounding == "floor":
        return q
    r = a - q * b  # 0 <= r < b
    tie_up = tf.ones_like(q, tf.bool) if rounding == "half_up" else tf.math.floormod(q, 2) == 1
    return q + tf.cast((2 * r > b) | ((2 * r == b) & tie_up), tf.int64)


def shift_round(q: tf.Tensor, k: tf.Tensor | int, rounding: str) -> tf.Tensor:
    """R(q * 2^-k), -62 <= k <= 62: the arithmetic right shift rounded by the bits shifted out
    (kernels.shift_round)."""
    q, k = tf.cast(q, tf.int64), tf.cast(k, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    one, zero = tf.constant(1, tf.int64), tf.constant(0, tf.int64)
    # k broadcasts against q (a scalar, or per channel along the last axis): q's shape, static
    # dimensions included, is the result's
    right = tf.broadcast_to(tf.maximum(k, zero), tf.shape(q))
    shifted = tf.bitwise.right_shift(q, right)
    if rounding != "floor":
        half = tf.bitwise.left_shift(one, tf.maximum(right - 1, zero))
        rest = tf.bitwise.bitwise_and(q, tf.bitwise.left_shift(one, right) - 1)
        tie_up = (tf.ones_like(shifted, tf.bool) if rounding == "half_up"
                  else tf.bitwise.bitwise_and(shifted, one) == one)
        up = (right > 0) & ((rest > half) | ((rest == half) & tie_up))
        shifted = shifted + tf.cast(up, tf.int64)
    left = tf.bitwise.left_shift(q, tf.broadcast_to(tf.maximum(-k, zero), tf.shape(q)))
    return tf.where(k > 0, shifted, left)


def isqrt(n: tf.Tensor) -> tf.Tensor:
    """floor(sqrt(n)) for int64 0 <= n < 2^62: the same 6 Newton steps (kernels.isqrt)."""
    n = tf.cast(n, tf.int64)
    m, one = tf.maximum(n, 1), tf.constant(1, tf.int64)
    x = tf.bitwise.left_shift(one, tf.bitwise.right_shift(bit_length(m) + 1, one))
    for _ in range(kernels.ISQRT_STEPS):
        x = tf.minimum(x, tf.bitwise.right_shift(x + tf.math.floordiv(m, x), one))
    return tf.minimum(x, n)


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
    if _is_tensor_grid(f):
        kernels._check_exp_grids(0, F, m)  # F and m only: f is a tensor
        f = tf.cast(f, tf.int64)
    else:
        kernels._check_exp_grids(f, F, m)
        f = tf.constant(int(f), tf.int64)
    q_ln2, q_b, q_c = kernels.exp_constants(F, m)
    h = kernels._check_scale(m)
    zero = tf.constant(0, tf.int64)
    low = -tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.maximum(kernels.EXP_X_MIN_LOG2 + h + f, zero))
    x = tf.maximum(x, low)
    x = shift_round(x, f - F, kernels.EXP_ROUNDING)
    z = tf.math.floordiv(-x, tf.constant(q_ln2, tf.int64))
    p = x + z * tf.constant(q_ln2, tf.int64)
    s = p + tf.constant(q_b, tf.int64)
    return tf.bitwise.right_shift(s * s + tf.constant(q_c, tf.int64),
                                  tf.minimum(z, tf.constant(kernels.EXP_SHIFT_CAP, tf.int64)))


def softmax(q: tf.Tensor, f: int | tf.Tensor, mask, out_bits: int, rounding: str,
            F: int = kernels.EXP_F, m: int = 1, normalization: str = "exact") -> tf.Tensor:
    """softmax(x / sqrt(m)) over the last axis on the probability grid 2^-out_bits (kernels.softmax):
    `mask` a bool tensor broadcasting against q (True = may attend) or None; fully masked rows give
    zeros. normalization="reciprocal": kernels.normalize_reciprocal's one division per row."""
    kernels.check_normalization(normalization)
    q = _softmax_int64(q)
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    if mask is None:
        mask = tf.ones_like(q, tf.bool)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise TypeError(f"the softmax mask is a bool tensor (True = may attend), got {mask.dtype.name}")
    lowest = tf.constant(tf.int64.min, tf.int64)
    top = tf.reduce_max(tf.where(mask, q, lowest), axis=-1, keepdims=True)
    x = tf.where(mask, q, top) - top
    kernels._check_softmax_widths(x.shape[-1], out_bits, F, m)
    e = tf.where(mask, exp_neg(x, f, F, m), tf.zeros_like(x))
    total = tf.reduce_sum(e, axis=-1, keepdims=True)
    if normalization == "reciprocal":
        probs = _reciprocal_probs(e, total, out_bits, rounding)
    else:
        shifted = tf.bitwise.left_shift(e, tf.fill(tf.shape(e), tf.constant(out_bits, tf.int64)))
        probs = div_round(shifted, tf.maximum(total, tf.constant(1, tf.int64)), rounding)
    n, p = fixed_point.integer_range(out_bits, False)
    return tf.clip_by_value(probs, tf.constant(n, tf.int64), tf.constant(p, tf.int64))


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
    """The bit length of int64 0 <= n < 2^63 (kernels.bit_length): a priority encoder by 6 fixed
    halving steps (compare, shift, add)."""
    n = tf.cast(n, tf.int64)
    length = tf.zeros_like(n)
    for step in (32, 16, 8, 4, 2, 1):
        big = n >= tf.constant(1 << step, tf.int64)
        n = tf.where(big, tf.bitwise.right_shift(n, tf.constant(step, tf.int64)), n)
        length = length + tf.where(big, tf.constant(step, tf.int64), tf.constant(0, tf.int64))
    return length + tf.cast(n > 0, tf.int64)


def layer_norm(q: tf.Tensor, gamma_q: tf.Tensor, beta_q: tf.Tensor, eps_q: tf.Tensor | int,
               f_gamma: int | tf.Tensor, f_out: int | tf.Tensor, out_bits: int, rounding: str,
               K: int = kernels.LN_K, F: int = kernels.LN_F, normalization: str = "exact") -> tf.Tensor:
    """Integer LayerNorm over the last axis, the same integers as kernels.layer_norm (see there for
    the algorithm, both normalizations, bounds and error bound). The static arguments are checked
    (ValueError); the data bounds (|q|, |gamma_q| <= 2^15, |beta_q| < 2^48, 0 <= eps_q <= 2^32) are the
    caller's."""
    kernels.check_normalization(normalization)
    q, gamma_q, beta_q = tf.cast(q, tf.int64), tf.cast(gamma_q, tf.int64), tf.cast(beta_q, tf.int64)
    eps_q = tf.cast(eps_q, tf.int64)
    d, out_shift = q.shape[-1], f_gamma + F - f_out
    if d is None:
        raise ValueError("layer_norm needs a static last axis")
    tensor_grids = _is_tensor_grid(f_gamma) or _is_tensor_grid(f_out)
    kernels.check_layer_norm_args(d, None if tensor_grids else out_shift, out_bits, rounding, K, F)
    if tensor_grids:
        out_shift = tf.cast(f_gamma, tf.int64) + F - tf.cast(f_out, tf.int64)
    s = tf.reduce_sum(q, axis=-1, keepdims=True)
    c = d * q - s
    w = d * tf.reduce_sum(q * q, axis=-1, keepdims=True) - s * s + d * d * eps_q
    k = tf.bitwise.right_shift(2 * K - bit_length(w), tf.constant(1, tf.int64))  # floor division by 2
    root = tf.maximum(isqrt(shift_round(w, -2 * k, "floor")), 1)
    if normalization == "reciprocal":
        G = kernels.LN_RECIPROCAL_G
        top = tf.bitwise.left_shift(tf.ones_like(root), K + G)
        r = tf.where(w > 0, div_round(top, root, rounding), tf.zeros_like(root))
        n = shift_round(c * r, K + G - k - F, rounding)
    else:
        up = k + F
        zero = tf.constant(0, tf.int64)
        num = tf.bitwise.left_shift(c, tf.broadcast_to(tf.maximum(up, zero), tf.shape(c)))
        n = div_round(num, tf.bitwise.left_shift(root, tf.maximum(-up, zero)), rounding)
    y = gamma_q * n + beta_q
    n_out, p_out = fixed_point.integer_range(out_bits, signed=True)
    return tf.clip_by_value(shift_round(y, out_shift, rounding), n_out, p_out)
