"""The integer kernels of `integer/kernels.py` in TensorFlow (int64 tensors), for training: the graph
computes exactly the integers the accelerator will. Step for step like integer/kernels.py, except
where another route to the same integers costs fewer of TF's ops (each proven in its docstring and
tested against the spec): the add before a rounding shift, the float64 square root, bit length and
exp's constant division, the softmax mask by arithmetic. Every op has a GPU kernel for its dtype
(scripts/bench_gpu_placement.py): int64 throughout, no int32 (TF keeps int32 on the host).

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


def div_round(a: tf.Tensor, b: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(a / b) for int64 a and 0 < b <= 2^62 (kernels.div_round): from a = q b + r, 0 <= r < b,
    up when 2r + t > b, t = 1 for half_up (the tie goes up), t = q & 1 for half_even."""
    a, b = tf.cast(a, tf.int64), tf.cast(b, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    q = tf.math.floordiv(a, b)
    if rounding == "floor":
        return q
    twice_r = tf.bitwise.left_shift(a - q * b, tf.constant(1, tf.int64))
    t = tf.constant(1, tf.int64) if rounding == "half_up" else tf.bitwise.bitwise_and(q, 1)
    return q + tf.cast(twice_r + t > b, tf.int64)


def shift_round(q: tf.Tensor, k: tf.Tensor | int, rounding: str) -> tf.Tensor:
    """R(q * 2^-k) for |q| <= 2^62, -62 <= k <= 62 (kernels.shift_round): k > 0 is
    shift_right_round, k <= 0 the exact left shift q << -k. A Python int k picks its branch here; a
    tensor k (a scalar, or per channel along the last axis) takes both, each shifting by 0 where
    it is not the one."""
    if isinstance(k, (int, np.integer)):
        if k <= 0:
            return tf.bitwise.left_shift(tf.cast(q, tf.int64), tf.constant(-int(k), tf.int64))
        return shift_right_round(q, int(k), rounding)
    k = tf.cast(k, tf.int64)
    return tf.bitwise.left_shift(shift_right_round(q, tf.maximum(k, 0), rounding), tf.maximum(-k, 0))


def shift_right_round(q: tf.Tensor, k: tf.Tensor | int, rounding: str) -> tf.Tensor:
    """R(q * 2^-k) for |q| <= 2^62 and 0 <= k <= 62, by an add before the arithmetic right shift:
    floor(q 2^-k + 1/2) is half_up; half_even adds 1/2 - 2^-k instead, and the bit q >> k, so that
    only an even tie stays down. The added constants have k's shape: k = 0 adds nothing."""
    q = tf.cast(q, tf.int64)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    if isinstance(k, (int, np.integer)):
        k, rounds = int(k), int(k > 0)
        half = rounds << max(k - 1, 0)
    else:
        k = tf.cast(k, tf.int64)
        rounds = tf.minimum(k, 1)  # 1 where k > 0
        half = tf.bitwise.left_shift(rounds, tf.maximum(k - 1, 0))  # 2^(k-1), or 0
    if rounding != "floor":
        if rounding == "half_up":
            q = q + half
        else:
            q = q + (half - rounds) + tf.bitwise.bitwise_and(tf.bitwise.right_shift(q, k), rounds)
    return tf.bitwise.right_shift(q, tf.cast(k, tf.int64))


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
    z = _floordiv_small(-x, q_ln2, 1 << (kernels.EXP_X_MIN_LOG2 + h + F))  # the clamp on grid F bounds -x
    p = x + z * tf.constant(q_ln2, tf.int64)
    s = p + tf.constant(q_b, tf.int64)
    return tf.bitwise.right_shift(s * s + tf.constant(q_c, tf.int64),
                                  tf.minimum(z, tf.constant(kernels.EXP_SHIFT_CAP, tf.int64)))


def _floordiv_small(a: tf.Tensor, b: int, max_a: int) -> tf.Tensor:
    """floor(a / b) for int64 0 <= a <= max_a and a constant b >= 1 with max_a + b <= 2^53, in float64
    (TF's int64 division is a scalar loop): a and b are exact there, and the correctly rounded a / b
    floors to floor(a / b). Where a / b is an integer n that is exact; otherwise a / b <= n + 1 - 1/b,
    and 1/b exceeds half the float spacing below n + 1, (n + 1) 2^-53, because b (n + 1) < a + b."""
    if max_a + b > 1 << 53:
        raise ValueError(f"floor division of up to {max_a} by {b} is not exact in float64")
    quotient = tf.cast(a, tf.float64) / tf.constant(float(b), tf.float64)
    return tf.cast(tf.floor(quotient), tf.int64)


def softmax(q: tf.Tensor, f: int | tf.Tensor, mask, out_bits: int, rounding: str,
            F: int = kernels.EXP_F, m: int = 1, normalization: str = "exact") -> tf.Tensor:
    """softmax(x / sqrt(m)) over the last axis on the probability grid 2^-out_bits (kernels.softmax):
    `mask` a bool tensor broadcasting against q (True = may attend) or None; fully masked rows give
    zeros; |q| < 2^61 (scores are accumulators, far smaller). normalization="reciprocal":
    kernels.normalize_reciprocal's one division per row."""
    kernels.check_normalization(normalization)
    q = _softmax_int64(q)
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    if mask is None:
        mask = tf.ones_like(q, tf.bool)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise TypeError(f"the softmax mask is a bool tensor (True = may attend), got {mask.dtype.name}")
    # masked keys by arithmetic on the mask's own (broadcast) shape, not by selects over the scores:
    # 2^62 below every visible score (|q| < 2^61) for the row's maximum; x = min(q - top, 0), so that
    # a masked key above the top stays in exp's domain; its e is multiplied by 0
    visible = tf.cast(mask, tf.int64)
    top = tf.reduce_max(q + (visible - 1) * (1 << 62), axis=-1, keepdims=True)
    x = tf.minimum(q - top, 0)
    kernels._check_softmax_widths(x.shape[-1], out_bits, F, m)
    e = exp_neg(x, f, F, m) * visible
    total = tf.reduce_sum(e, axis=-1, keepdims=True)
    if normalization == "reciprocal":
        probs = _reciprocal_probs(e, total, out_bits, rounding)
    else:
        shifted = tf.bitwise.left_shift(e, tf.constant(out_bits, tf.int64))
        probs = div_round(shifted, tf.maximum(total, tf.constant(1, tf.int64)), rounding)
    _, p = fixed_point.integer_range(out_bits, False)
    return tf.minimum(probs, tf.constant(p, tf.int64))  # the clip: probs >= 0 (e >= 0, S > 0)


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
        up = k + F  # per row: the numerator or the divisor shifts up
        numerator = tf.bitwise.left_shift(c, tf.maximum(up, 0))
        n = div_round(numerator, tf.bitwise.left_shift(root, tf.maximum(-up, 0)), rounding)
    y = gamma_q * n + beta_q
    n_out, p_out = fixed_point.integer_range(out_bits, signed=True)
    return tf.clip_by_value(shift_round(y, out_shift, rounding), n_out, p_out)
