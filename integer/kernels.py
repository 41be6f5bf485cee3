"""Integer kernels of integer-only inference: what the accelerator computes between matmuls.

NumPy int64 only (no floating point anywhere), so each kernel is its own bit-exact spec; the
TF graph emulates the same integers for training (`integer_tf/kernels_tf.py`). Values live on power-of-two
grids (fixed_point.Grid): an integer q on grid f stands for q * 2^-f. Equations: docs/integer_only.md.

    shift_round(q, k, R)    R(q * 2^-k): a requantizing shift (k < 0 shifts left, exactly)
    div_round(a, b, R)      R(a / b) for integers, b > 0
    isqrt(n)                floor(sqrt(n)) by 6 fixed Newton steps from a power of two, 0 <= n < 2^62
    exp_neg(x, f)           exp(x 2^-f) for x <= 0 (I-BERT's i-exp): shifts and one square
    softmax(q, f, mask, b)  masked keys by selection, one integer division, unsigned b-bit output;
                            m folds a 1/sqrt(m) scaling into exp's constants
    layer_norm(q, ...)      exact mean and variance, one isqrt per row, one division per element

Both normalizations come in two variants (NORMALIZATIONS): "exact" divides each element, "reciprocal"
divides once per row and multiplies each element by the reciprocal (normalize_reciprocal,
layer_norm(..., normalization="reciprocal")): cheaper in hardware, within one output unit of "exact".
"""

from __future__ import annotations

import functools
import math

import numpy as np

from integer import fixed_point

ISQRT_MAX = 1 << 62  # isqrt's domain: n < 2^62 (the root < 2^31)
NORMALIZATIONS = ("exact", "reciprocal")  # a division per element, or one reciprocal per row
ISQRT_STEPS = 6  # Newton steps that reach floor(sqrt(n)) from 2^ceil(bits/2) for every n < 2^62


def _int64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"integer kernels take integer arrays, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def _lane(a) -> np.ndarray:
    """An int32 array as it is (a 32-bit lane), any other integer array as int64."""
    a = np.asarray(a)
    return a if a.dtype == np.int32 else _int64(a)


def div_round(a, b, rounding: str) -> np.ndarray:
    """R(a / b) for int64 a and 0 < b <= 2^62, exactly: floor, half_up (floor(a/b + 1/2)) or
    half_even. From a = q b + r, 0 <= r < b: R rounds q up when 2r > b, and at the tie 2r = b
    when half_up, or when q is odd for half_even (2r < 2^63: no intermediate leaves int64)."""
    a, b = _int64(a), _int64(b)
    if np.any(b <= 0):
        raise ValueError("div_round needs a positive divisor")
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    return _div_round(a, b, rounding)


def _div_round(a: np.ndarray, b: np.ndarray, rounding: str) -> np.ndarray:
    """div_round without the checks (the kernels' own calls, on operands valid by construction)."""
    q, r = np.divmod(a, b)
    if rounding == "floor":
        return q
    # up when 2r + t > b: t = 1 rounds the tie 2r = b up (half_up), t = q mod 2 only from an odd q
    r <<= 1
    r += 1 if rounding == "half_up" else np.bitwise_and(q, 1)
    q += r > b
    return q


def shift_round(q, k, rounding: str) -> np.ndarray:
    """R(q * 2^-k) for int64 |q| <= 2^62 and integer shifts -62 <= k <= 62 (scalar or
    broadcasting): an arithmetic right shift by k, rounded by the bits shifted out,
    r = q & (2^k - 1): up when r > 2^(k-1), and at the tie r = 2^(k-1) when half_up, or when
    q >> k is odd for half_even; k <= 0 is the exact left shift q << -k (the caller keeps the
    result inside int64). An int32 q (a 32-bit lane, |q| <= 2^30) shifted right by one scalar
    0 <= k <= 30 stays int32 (the same integers); any other q is computed in int64."""
    q = _lane(q)
    if rounding not in fixed_point.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}")
    if np.ndim(k) == 0:  # one shift for the whole tensor (a per-tensor grid): scalar constants
        k = int(k)
        if abs(k) > 62:
            raise ValueError("shift_round shifts by at most 62 bits")
        return _shift_by(q if 0 <= k <= 30 else _int64(q), k, rounding)
    q, k = _int64(q), _int64(k)
    if np.any(np.abs(k) > 62):
        raise ValueError("shift_round shifts by at most 62 bits")
    right = np.maximum(k, 0)
    shifted = np.right_shift(q, right)
    if rounding != "floor":
        half = np.left_shift(np.int64(1), np.maximum(right - 1, 0))
        rest = np.bitwise_and(q, np.left_shift(np.int64(1), right) - 1)
        tie_up = True if rounding == "half_up" else np.bitwise_and(shifted, 1) == 1
        shifted = shifted + ((right > 0) & ((rest > half) | ((rest == half) & tie_up)))
    return np.where(k > 0, shifted, np.left_shift(q, np.maximum(-k, 0)))


def _shift_by(q: np.ndarray, k: int, rounding: str) -> np.ndarray:
    """shift_round by one Python-int shift: the same rule as an add before the shift (floor of
    q / 2^k + 1/2, less 1/2^k at an even tie for half_even), exact while |q| <= 2^62 (int64) or
    |q| <= 2^30 (int32, k <= 30)."""
    if k <= 0:
        return np.left_shift(q, -k)
    if rounding == "floor":
        return np.right_shift(q, k)
    out = np.empty_like(q)  # an array also for a 0-d q (a ufunc without out= gives a scalar there)
    if rounding == "half_up":
        np.add(q, 1 << (k - 1), out=out)
    else:  # in place: one temporary instead of four (these are the engine's most frequent passes)
        np.right_shift(q, k, out=out)
        np.bitwise_and(out, 1, out=out)  # a tie rounds up only from an odd floor
        out += q
        out += (1 << (k - 1)) - 1
    return np.right_shift(out, k, out=out)


def isqrt(n) -> np.ndarray:
    """floor(sqrt(n)) for int64 0 <= n < 2^62: Newton's x <- min(x, (x + n // x) >> 1) for 6
    fixed steps from x = 2^ceil(bit_length(n) / 2) (computed on max(n, 1); n = 0 gives 0).

    Why 6 suffice: x starts in [sqrt n, 2 sqrt n), so its relative error e = x / sqrt(n) - 1 is
    < 1, and a Newton step maps e to e^2 / (2 (1 + e)): 1/4, 2.5e-2, 3.1e-4, 4.7e-8, 1.1e-15, so
    after 5 steps x < sqrt(n) + 2^31 1.1e-15, i.e. x <= r + 1 for r = floor(sqrt n). The floors
    only lower x and never below r ((x + n // x) >> 1 >= r for every x >= 1, by AM-GM), the min
    makes the sequence non-increasing, and from x = r + 1 ((r + 1)^2 > n) one more step gives r."""
    n = _int64(n)
    if np.any(n < 0) or np.any(n >= ISQRT_MAX):
        raise ValueError("isqrt takes 0 <= n < 2^62")
    return _isqrt(n)


def _isqrt(n: np.ndarray) -> np.ndarray:
    """isqrt without the checks (layer_norm's normalized W, in range by construction)."""
    m = np.maximum(n, 1)
    x = np.left_shift(np.int64(1), np.right_shift(_bit_length(m) + 1, 1))
    for _ in range(ISQRT_STEPS):
        x = np.minimum(x, np.right_shift(x + m // x, 1))
    return np.minimum(x, n)


def clip_to(q, bits: int, signed: bool) -> np.ndarray:
    """q clipped into the integer range of a `bits`-bit grid (fixed_point.integer_range); an int32 q
    stays int32."""
    n, p = fixed_point.integer_range(bits, signed)
    out = np.maximum(_lane(q), n)
    return np.minimum(out, p, out=out)


def requantize(q, k, bits: int, signed: bool, rounding: str) -> np.ndarray:
    """clip_to(shift_round(q, k, rounding), bits, signed): an edge from one grid onto a `bits`-bit
    grid k bits coarser (the clip in place on shift_round's fresh result)."""
    n, p = fixed_point.integer_range(bits, signed)
    out = shift_round(q, k, rounding)
    np.maximum(out, n, out=out)
    return np.minimum(out, p, out=out)


# ---- softmax ----
# I-BERT's i-exp (Kim et al. 2021, "I-BERT: Integer-only BERT Quantization") on power-of-two grids,
# then softmax by one integer division per element. Every constant below is an integer (or an
# exact ratio of integers); exp_constants(F) derives the kernel's integers from them without floats.
#
#   x <= 0 on grid f  --clamp at -64, shift_round-->  x on grid F (the internal grid, 2^-F)
#   z = (-x) // q_ln2,  p = x + z q_ln2 in (-q_ln2, 0]          (x = -z ln2 + p)
#   L = (p + q_b)^2 + q_c                                        exp(p) ~ A ((p + B)^2 + C/A)
#   e = L >> min(z, 62)                                          on the grid A 2^-2F (A = 0.3585)
#
# Error budget (value x 2^-f vs exp, measured in tests/test_int_softmax.py): the polynomial's
# relative error on (-ln2, 0] is <= 3.1e-3 (A=0.3585, B=1.353, C=0.344; its spread max/min - 1 is
# 5.6e-3, the part that survives softmax's normalization); q_ln2's rounding adds z |q_ln2 2^-F - ln2|
# to the exponent, 1.4e-6 z at F = 15 (ln2 2^15 = 22713.047, a lucky F: 0.05 of a unit); the floor
# shift loses < 1 unit of A 2^-2F absolutely; an input grid f > F rounds x by 2^-F-1. F = 15 keeps
# all but the polynomial's error under 1e-4 for every z that matters (e >= 2^-20 of the max) while
# L <= EXP_MAX = q_b^2 + q_c < 2^31.5 stays a 32-bit number.
EXP_F = 15  # default internal grid of exp_neg
EXP_F_MAX = 30  # L < 2^(2F+2) <= 2^62: L >> 62 is 0 and (p + q_b)^2 + q_c fits int64
LN2_Q64 = 12786308645202655660  # round(ln(2) * 2^64); q_ln2 = round(ln2 2^F) is derived from it
EXP_A = (717, 2000)  # A = 0.3585, the result grid's non-power-of-two factor (cancels in softmax)
EXP_B = (1353, 1000)  # B = 1.353
EXP_C_OVER_A = (688, 717)  # C / A = 0.344 / 0.3585
EXP_SHIFT_CAP = 62  # z is capped here; L < 2^62 so the capped shift gives 0, as exp(-43) ~ 0 does
EXP_X_MIN_LOG2 = 6  # x is clamped at -2^(6+h) (value, 2^h ~ sqrt(m)) first: exp(-64) is 0 on every grid
EXP_M_MAX = 1 << 20  # the scale divisor m of exp(x / sqrt(m)): d_k up to 2^20
EXP_ROUNDING = "half_up"  # of the shift onto grid F when f > F (f <= F is an exact left shift)


def _round_ratio(num: int, den: int) -> int:
    """round(num / den) half up, num >= 0, den > 0, Python integers."""
    return (2 * num + den) // (2 * den)


def _round_sqrt(num: int, den: int, bits: int) -> int:
    """round(sqrt(num / den) 2^bits) for Python integers num >= 0, den > 0: math.isqrt with 32
    guard bits (exact integer arithmetic, the same on every machine)."""
    return (math.isqrt((num << (2 * (bits + 32))) // den) + (1 << 31)) >> 32


def _check_scale(m) -> int:
    if isinstance(m, bool | np.bool_) or not isinstance(m, int | np.integer) or not 1 <= m <= EXP_M_MAX:
        raise ValueError(f"the softmax scale divisor m (x / sqrt(m)) must be an integer in 1..{EXP_M_MAX}, "
                         f"got {m!r}")
    return int(m).bit_length() // 2  # h: 2^h >= sqrt(m) / sqrt(2), the clamp's extra range


def exp_constants(F: int = EXP_F, m: int = 1) -> tuple[int, int, int]:
    """(q_ln2, q_b, q_c) = (round(ln2 sqrt(m) 2^F), round(B sqrt(m) 2^F), round(m C/A 2^2F)),
    integers (exported): the constants of exp(x / sqrt(m)) for x on grid F. With m = d_k the
    attention's 1/sqrt(d_k) is folded into them: no non-power-of-two multiply survives."""
    _check_exp_grids(0, F, m)
    return _exp_constants(int(F), int(m))


@functools.cache  # every softmax call needs them: worked out once per (F, m)
def _exp_constants(F: int, m: int) -> tuple[int, int, int]:
    q_ln2 = _round_sqrt(LN2_Q64 * LN2_Q64 * m, 1 << 128, F)
    q_b = _round_sqrt(EXP_B[0] * EXP_B[0] * m, EXP_B[1] * EXP_B[1], F)
    q_c = _round_ratio((EXP_C_OVER_A[0] * m) << (2 * F), EXP_C_OVER_A[1])
    return q_ln2, q_b, q_c


def exp_max(F: int = EXP_F, m: int = 1) -> int:
    """exp_neg's largest result, at x = 0: q_b^2 + q_c (about 2.79 m 2^2F < m 2^(2F+2))."""
    _, q_b, q_c = exp_constants(F, m)
    return q_b * q_b + q_c


def _check_exp_grids(f, F, m: int = 1) -> None:
    h = _check_scale(m)
    wide = 2 * F + 2 + (int(m) - 1).bit_length() > 62 if isinstance(F, int | np.integer) else True
    if not isinstance(F, int | np.integer) or not 1 <= F <= EXP_F_MAX or wide:
        raise ValueError(f"the internal grid F must be an integer in 1..{EXP_F_MAX} with "
                         f"2F + 2 + bit_length(m - 1) <= 62, got F={F!r}, m={m}")
    if not isinstance(f, int | np.integer) or not F - 62 <= f <= 62 - EXP_X_MIN_LOG2 - h:
        raise ValueError(f"the input grid f must be an integer in {F - 62}..{62 - EXP_X_MIN_LOG2 - h}, "
                         f"got {f!r}")


def exp_neg(x, f: int, F: int = EXP_F, m: int = 1) -> np.ndarray:
    """exp(x 2^-f / sqrt(m)) for int64 x <= 0 on grid f, as e on the grid A 2^-2F / m (exp ~ e *
    0.3585 * 2^-2F / m): I-BERT's i-exp with shifts, one integer division by the constant q_ln2,
    one square and adds. 0 <= e <= exp_max(F, m) < m 2^(2F+2); e = 0 once z > 62 or the value is
    below -64 * 2^h. Relative error <= 3.1e-3 (the polynomial) + 1.4e-6 z (q_ln2, F = 15) plus an
    absolute A 2^-2F / m (the shift)."""
    x = _int64(x)
    if np.any(x > 0):
        raise ValueError("exp_neg takes x <= 0")
    return _exp_neg(x, f, F, m)


def exp_clamp(f: int, m: int = 1) -> int:
    """The clamp of exp's input on grid f: x >= -2^max(6 + h + f, 0), the value -64 2^h (or -1)."""
    return -(1 << max(EXP_X_MIN_LOG2 + _check_scale(m) + int(f), 0))


def _exp_neg(x: np.ndarray, f: int, F: int, m: int, steps: dict | None = None) -> np.ndarray:
    """exp_neg without the check on x (softmax's x - top <= 0 by construction); `steps` (a dict)
    receives the intermediates x_F, z and L."""
    _check_exp_grids(f, F, m)
    q_ln2, q_b, q_c = exp_constants(F, m)
    x = np.maximum(x, exp_clamp(f, m))  # value >= -64 2^h (or x >= -1)
    x = shift_round(x, int(f) - F, EXP_ROUNDING)  # onto grid F: |x| <= 2^(F+6+h) (or 2^62)
    z = (-x) // q_ln2
    p = x + z * q_ln2  # in (-q_ln2, 0]
    s = p + q_b  # in (q_b - q_ln2, q_b]: positive
    big = s * s + q_c  # L
    if steps is not None:
        steps.update(x_F=x, z=z, L=big)
    return np.right_shift(big, np.minimum(z, EXP_SHIFT_CAP))


def _check_softmax_widths(length, out_bits: int, F: int, m: int = 1) -> None:
    """The row sum S <= length * exp_max(F, m) and the numerator 2 (e << out_bits) + S of
    div_round must fit int64: S < 2^62 and exp_max(F, m) << (out_bits + 1) < 2^62."""
    top = exp_max(F, m)
    if length is not None and length * top >= 1 << 62:
        raise ValueError(f"a softmax row of {length} overflows the int64 sum at F={F}")
    if top << (out_bits + 1) >= 1 << 62:
        raise ValueError(f"out_bits={out_bits} with F={F} overflows the int64 division")


def softmax(q, f: int, mask, out_bits: int, rounding: str, F: int = EXP_F, m: int = 1,
            normalization: str = "exact") -> np.ndarray:
    """softmax_with_sums' probabilities."""
    return softmax_with_sums(q, f, mask, out_bits, rounding, F, m, normalization=normalization)[0]


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}: one of {', '.join(NORMALIZATIONS)}")


def softmax_with_sums(q, f: int, mask, out_bits: int, rounding: str, F: int = EXP_F, m: int = 1,
                      steps: dict | None = None, normalization: str = "exact"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(out, S): softmax(x / sqrt(m)) over the last axis of int64 scores q on grid f (|q| < 2^62),
    as unsigned integers on the probability grid 2^-out_bits (threshold 1), clipped to
    [0, 2^out_bits - 1], and the row sums S of its exps:

        top = max of q over the unmasked positions,  e = exp_neg(q - top, f, F, m) there and 0
        where masked,  S = sum(e) (int64: S <= row length * exp_max(F, m), 2.79 m 2^30 length at
        F = 15),
        out = clip(R((e << out_bits) / S), 0, 2^out_bits - 1).

    `mask` is a bool array broadcasting against q (True = may attend; e.g. [B,1,1,L] padding or
    [L,L] causal) or None (no mask). Masked positions are selected out (exactly 0), never pushed
    down by a large negative number. A fully masked row has S = 0 and gives all zeros.
    Error vs the float64 softmax p: |out 2^-out_bits - p| <= p (1 - p) 5.6e-3 (<= 1.4e-3; 5.6e-3 is
    exp_neg's relative spread max/min - 1, which normalization does not cancel) + 1e-4 + one unit
    of 2^-out_bits (the rounding R, or the clip at p ~ 1): measured in tests/test_int_softmax.py.
    S (int64, q's shape without the last axis) is returned for the data sheet's observed widths.
    `steps` (a dict) receives the intermediates for golden vectors: x = q - top, x_F, z, L, e (0
    where masked) and S (softmax_bounds gives their proven widths). normalization="reciprocal"
    normalizes by normalize_reciprocal (one division per row; steps also t and r)."""
    q = _int64(q)
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    check_normalization(normalization)
    if np.any(q >= 1 << 62) or np.any(q <= -(1 << 62)):
        raise ValueError("softmax takes scores |q| < 2^62")
    if mask is None:
        mask = np.ones(q.shape, bool)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"the softmax mask is a bool array (True = may attend), got {mask.dtype}")
    q, mask = np.broadcast_arrays(q, mask)
    _check_softmax_widths(q.shape[-1], out_bits, F, m)
    e = softmax_exps(q, f, mask, F, m, steps)
    total = np.sum(e, axis=-1, keepdims=True)
    if steps is not None:
        steps["S"] = total
    if normalization == "reciprocal":
        return _normalize_reciprocal(e, total, out_bits, rounding, steps), total[..., 0]
    return _normalize(e, total, out_bits, rounding), total[..., 0]


def softmax_exps(q, f: int, mask, F: int = EXP_F, m: int = 1, steps: dict | None = None) -> np.ndarray:
    """softmax's numerators: e = exp_neg(q - top) where mask is True (bool, q's shape; None: every
    position), 0 elsewhere; top = the largest unmasked q of the row. `steps` (a dict) receives x,
    x_F, z, L and e, each 0 where masked."""
    _check_softmax_widths(q.shape[-1], 0, F, m)
    q = _int64(q)
    if mask is None:
        x = q - np.max(q, axis=-1, keepdims=True)
    else:
        top = np.max(np.where(mask, q, np.iinfo(np.int64).min), axis=-1, keepdims=True)
        x = np.where(mask, q, top) - top  # <= 0; 0 where masked (and everywhere in a fully masked row)
    if steps is not None:
        steps["x"] = x
    e = _exp_neg(x, f, F, m, steps)
    if mask is not None:
        e = np.where(mask, e, 0)
    if steps is not None:
        steps["e"] = e
        if mask is not None:
            for key in ("x_F", "z", "L"):  # computed at masked positions too, then not used
                steps[key] = np.where(mask, steps[key], 0)
    return e


def normalize(e, out_bits: int, rounding: str) -> np.ndarray:
    """clip(R((e << out_bits) / S)), S = sum(e) over the last axis (S = 0: all zeros); e from
    softmax_exps (within _check_softmax_widths)."""
    e = _int64(e)
    return _normalize(e, np.sum(e, axis=-1, keepdims=True), out_bits, rounding)


def _normalize(e: np.ndarray, total: np.ndarray, out_bits: int, rounding: str) -> np.ndarray:
    """normalize with the row sums S already summed (softmax_with_sums returns them too)."""
    probs = _div_round(np.left_shift(e, out_bits), np.maximum(total, 1), rounding)  # S = 0: e = 0
    return clip_to(probs, out_bits, signed=False)


RECIPROCAL_GUARD = 8  # the softmax reciprocal's bits beyond the output's: RK = RG = out_bits + 8


def normalize_reciprocal(e, out_bits: int, rounding: str, steps: dict | None = None) -> np.ndarray:
    """softmax's normalization by one division per row: S = sum(e) over the last axis, then with
    RK = RG = out_bits + RECIPROCAL_GUARD

        t   = bitlength(S) - RK                       S_n = S 2^-t in [2^(RK-1), 2^RK) (floor shift;
        S_n = shift_round(S, t, floor)                a left shift, exact, when t < 0)
        r   = div_round(2^(RK+RG), S_n, R)            the row's reciprocal, in (2^RG, 2^(RG+1)]; 0 if S = 0
        P   = clip(shift_round((e 2^-t floored) r, RK + RG - out_bits, R), 0, 2^out_bits - 1)

    so each element costs a shift, an (RK x RG+2)-bit multiply and a rounding shift. Error: with
    E = e 2^-t, e_n its floor, and 0 <= e <= S, |e_n / S_n - e / S| <= 1 / S_n <= 2^(1-RK) and
    |r - 2^(RK+RG) / S_n| <= 1 adds below 2^-RG, so before the rounding R the value differs from the
    exact e 2^b / S by less than 2^(b+1-RK) + 2^(b-RG) = 2^-7 + 2^-8 output units: P equals the
    exact normalization's R(e 2^b / S) except where that lies within 0.012 units of a rounding
    boundary, and never differs from it by more than one unit. `steps` receives t and r (one per row)."""
    e = _int64(e)
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    return _normalize_reciprocal(e, np.sum(e, axis=-1, keepdims=True), out_bits, rounding, steps)


def _normalize_reciprocal(e: np.ndarray, total: np.ndarray, out_bits: int, rounding: str,
                          steps: dict | None = None) -> np.ndarray:
    """normalize_reciprocal with the row sums S already summed."""
    width = out_bits + RECIPROCAL_GUARD  # RK = RG
    t = _bit_length(total) - width
    scaled = shift_round(total, t, "floor")
    r = np.where(total > 0, _div_round(np.int64(1) << (2 * width), np.maximum(scaled, 1), rounding), 0)
    if steps is not None:
        steps.update(t=t, r=r)
    probs = shift_round(shift_round(e, t, "floor") * r, 2 * width - out_bits, rounding)
    return clip_to(probs, out_bits, signed=False)


def softmax_bounds(score_max_abs: int, f: int, length: int, out_bits: int, F: int = EXP_F,
                   m: int = 1, normalization: str = "exact") -> dict[str, int]:
    """The proven largest |value| of each softmax intermediate for scores |q| <= score_max_abs on
    grid f in rows of `length` keys: x = q - top (2 score_max_abs), x_F (the clamp shifted onto F:
    shift_round is monotone, so the clamp's image bounds it), z = |x_F| // q_ln2, L and e (exp_max),
    S (length exp_max), the division's numerator e << out_bits, and the output. The reciprocal
    variant: |t| (S's shift: from 1 - RK at S = 1 up to bitlength(S) - RK), r <= 2^(RK+1), the
    division's numerator 2^(2 RK) and the product (e 2^-t) r < 2^RK 2^(RK+1)."""
    check_normalization(normalization)
    q_ln2 = exp_constants(F, m)[0]
    x_max = 2 * int(score_max_abs)
    x_f = -int(shift_round(max(-x_max, exp_clamp(f, m)), int(f) - F, EXP_ROUNDING))
    top = exp_max(F, m)
    bounds = {"x": x_max, "x_F": x_f, "z": x_f // q_ln2, "L": top, "e": top, "S": length * top,
              "numerator": top << out_bits, "output": (1 << out_bits) - 1}
    if normalization == "reciprocal":
        width = out_bits + RECIPROCAL_GUARD
        bounds |= {"t": max(width - 1, (length * top).bit_length() - width), "r": 1 << (width + 1),
                   "numerator": 1 << (2 * width), "product": (1 << (2 * width + 1)) - 1}
    return bounds


# ---- LayerNorm ----

LN_MAX_D = 4096  # the longest normalized axis
LN_MAX_ABS_Q = 1 << 15  # |q| <= 2^15: inputs on grids of at most 16 bits
LN_MAX_ABS_GAMMA = 1 << 15  # |gamma_q| <= 2^15: a 16-bit gamma
LN_MAX_ABS_BETA = 1 << 48  # |beta_q| < 2^48 on the product grid f_gamma + F
LN_MAX_EPS_Q = 1 << 32  # 0 <= eps_q <= 2^32
LN_K, LN_F = 24, 16  # defaults: the divisor D has K bits, the normalized value F fractional bits
LN_RECIPROCAL_G = 24  # the reciprocal variant's r = R(2^(K+G) / D): G - F >= log2 sqrt(4095) + 2
_POWERS_OF_TWO = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))  # 2^0 .. 2^62


def bit_length(n) -> np.ndarray:
    """The bit length of int64 0 <= n < 2^63 (0 for 0; floor(log2 n) + 1 otherwise): how many of
    2^0 .. 2^62 are <= n, a priority encoder (a binary search by compares; the TF twin takes 6
    fixed halving steps)."""
    n = _int64(n)
    if np.any(n < 0):
        raise ValueError("bit_length takes n >= 0")
    return _bit_length(n)


def _bit_length(n: np.ndarray) -> np.ndarray:
    return np.searchsorted(_POWERS_OF_TWO, n, side="right").astype(np.int64)


def layer_norm_eps_q(eps: float, f_in: int) -> int:
    """Export time, not inference: the float LayerNorm's eps on the input grid squared, the integer
    eps_q = round_half_even(eps * 2^(2 f_in)) (the scaling by 2^(2 f_in) is exact; 0 is allowed)."""
    if not np.isfinite(eps):
        raise ValueError(f"the LayerNorm eps must be finite, got {eps!r}")
    eps_q = int(np.rint(np.ldexp(np.float64(eps), 2 * f_in)))
    if not 0 <= eps_q <= LN_MAX_EPS_Q:
        raise ValueError(f"eps * 2^(2 f_in) rounds to {eps_q}, outside 0..2^32")
    return eps_q


def check_layer_norm_args(d: int, out_shift: int | None, out_bits: int, rounding: str, K: int,
                          F: int) -> None:
    """The static arguments of layer_norm (shared with integer_tf/kernels_tf.py): ValueError beyond
    the bounds;
    out_shift None: not known yet (kernels_tf with grids as tensors)."""
    fixed_point.check_bits_and_rounding(out_bits, rounding)
    if not 1 <= d <= LN_MAX_D:
        raise ValueError(f"layer_norm normalizes 1..{LN_MAX_D} values, got d = {d}")
    if not (2 <= K <= 31 and 0 <= F <= 24):
        raise ValueError(f"layer_norm needs 2 <= K <= 31 and 0 <= F <= 24, got K = {K}, F = {F}")
    if out_shift is not None and not -13 <= out_shift <= 62:
        raise ValueError(f"layer_norm needs -13 <= f_gamma + F - f_out <= 62, got {out_shift}")


def layer_norm_moments(q, eps_q) -> tuple[np.ndarray, np.ndarray]:
    """(s, W) = (sum q, d sum q^2 - s^2 + d^2 eps_q) over the last axis (kept): LayerNorm's two
    reductions, exact (|s| <= d 2^15, 0 <= W < 2^57 within layer_norm's bounds)."""
    q, d = _int64(q), np.shape(q)[-1]
    s = np.sum(q, axis=-1, keepdims=True)
    return s, d * np.sum(q * q, axis=-1, keepdims=True) - s * s + d * d * _int64(eps_q)


def layer_norm(q, gamma_q, beta_q, eps_q, f_gamma: int, f_out: int, out_bits: int, rounding: str,
               K: int = LN_K, F: int = LN_F, steps: dict | None = None,
               normalization: str = "exact") -> np.ndarray:
    """Integer LayerNorm over the last axis: gamma (x - mean) / sqrt(var + eps) + beta, exact but for
    the floor of one square root per row and two roundings R, on power-of-two grids, in int64 only.

    Arguments (integers; shapes broadcast against q's [..., d]):
        q        [..., d] on the input grid f_in, |q| <= 2^15 (b_in <= 16), 1 <= d <= 4096
        gamma_q  [d] on grid f_gamma, |gamma_q| <= 2^15
        beta_q   [d] on the product grid f_gamma + F (like a bias on an accumulator grid), |beta_q| < 2^48
        eps_q    eps on the input grid squared: eps = eps_q 2^(-2 f_in), 0 <= eps_q <= 2^32
                 (layer_norm_eps_q); f_in enters only here (LayerNorm is scale invariant)
        f_out, out_bits, rounding: the output grid (signed) and the rounding R of both roundings
        K, F     the divisor's bits and the normalized value's fractional bits (defaults 24, 16)
    Returns int64 [..., d] in fixed_point.integer_range(out_bits, signed=True), on grid f_out.

    Algorithm (all integers, per row; every step exact unless marked R):
        s  = sum q                       |s| <= 2^27
        c  = d q - s                     = d (x - mean) in q units, exact: |c| <= 2^28
        S2 = d sum q^2 - s^2             = d^2 var, exact: 0 <= S2 <= d^2 2^30 <= 2^54
        W  = S2 + d^2 eps_q              = d^2 (var + eps) < 2^57;  then n = c / sqrt(W) exactly
        k  = floor((2K - bit_length(W)) / 2)     normalization: W 2^2k in [2^(2K-2), 2^2K)
        D  = max(isqrt(floor(W 2^2k)), 1)        = floor(2^k sqrt(W)) in [2^(K-1), 2^K) (1 if W = 0)
        n  = R(c 2^(k+F) / D)            the normalized value on grid F (div_round, the shift on
                                         the numerator or the denominator by the sign of k + F)
        y  = gamma_q n + beta_q          on grid f_gamma + F, |y| < 2^49
        out = clip(R(y 2^-(f_gamma + F - f_out)), out_bits)     the output site's shift
    A constant row (W = 0 only when eps_q = 0, then c = 0) gives n = 0, out = R(beta): the limit
    of the float LayerNorm for eps -> 0; never a division by zero.

    normalization="reciprocal" replaces the division per element by one per row (G = LN_RECIPROCAL_G):
        r  = R(2^(K+G) / D)  (0 when W = 0)      in (2^G, 2^(G+1)]: G + 1 bits (G + 2 to hold 2^(G+1))
        n  = R(c r 2^-(K+G-k-F))                 a multiply and a rounding shift per element
    |r - 2^(K+G) / D| <= 1 moves c r 2^-(K+G-k-F) from c 2^(k+F) / D by at most |c 2^(k+F)| 2^-(K+G) <
    sqrt(d - 1) 2^(F-G) <= 2^-2 (d <= 4096), so n is within one unit of the exact variant's, and the
    error bound below gains sqrt(d - 1) 2^-G in the parenthesis: E <= 2^15 (2^6 2^-23 + 2^6 2^-24 +
    2^-16) = 7/8 < 1 with the defaults, the same one-unit guarantee.

    `steps` (a dict) receives the intermediates s, c, W, k, D (each row's, last axis kept), n and y for
    golden vectors (layer_norm_bounds gives their proven widths), and r for the reciprocal variant.

    Error bound. With u = 1/2 (half_even, half_up) or 1 (floor): D <= 2^k sqrt(W) < D + 1 and
    D >= 2^(K-1) give n = c 2^(k+F)/D within |n*| 2^(1-K) 2^F of the exact n* 2^F = c 2^F / sqrt(W),
    and |n*| <= sqrt(d - 1); rounding n adds u. So y differs from the exact gamma_q n* 2^F + beta_q
    by at most, in units of the output grid,
        E = |gamma_q| 2^(f_out - f_gamma) (sqrt(d - 1) 2^(1-K) + u 2^-F),
    and out differs from the float64 LayerNorm (gamma = gamma_q 2^-f_gamma, beta = beta_q
    2^-(f_gamma+F), eps = eps_q 2^(-2 f_in)) rounded by R onto the output grid and clipped by at
    most floor(E) + 1 units: at most 1 unit whenever E < 1. With the defaults, d <= 4096 and a gamma
    the output grid holds (|gamma_q| 2^(f_out - f_gamma) <= 2^(out_bits - 1) <= 2^15):
    E <= 2^15 (2^6 2^-23 + 2^-16) = 3/4, so out is within 1 unit of the rounded float LayerNorm.
    """
    q, gamma_q, beta_q, eps_q = _int64(q), _int64(gamma_q), _int64(beta_q), _int64(eps_q)
    if q.ndim == 0:
        raise ValueError("layer_norm needs an array with a last axis")
    check_normalization(normalization)
    d, out_shift = q.shape[-1], f_gamma + F - f_out
    check_layer_norm_args(d, out_shift, out_bits, rounding, K, F)
    if q.min(initial=0) < -LN_MAX_ABS_Q or q.max(initial=0) > LN_MAX_ABS_Q or np.any(
            np.abs(gamma_q) > LN_MAX_ABS_GAMMA):
        raise ValueError("layer_norm takes |q| <= 2^15 and |gamma_q| <= 2^15")
    if np.any(np.abs(beta_q) >= LN_MAX_ABS_BETA) or np.any(eps_q < 0) or np.any(eps_q > LN_MAX_EPS_Q):
        raise ValueError("layer_norm takes |beta_q| < 2^48 and 0 <= eps_q <= 2^32")
    s, w = layer_norm_moments(q, eps_q)
    c = q * d
    c -= s
    k = np.right_shift(2 * K - _bit_length(w), 1)  # floor division by 2
    # floor(W 2^2k): a left shift, or (W >= 2^2K, k < 0) a floor right shift
    root = np.maximum(_isqrt(np.right_shift(np.left_shift(w, np.maximum(2 * k, 0)),
                                            np.maximum(-2 * k, 0))), 1)
    if steps is not None:
        steps.update(s=s, c=c.copy(), W=w, k=k, D=root)
    if normalization == "reciprocal":
        G = LN_RECIPROCAL_G
        r = np.where(w > 0, _div_round(np.int64(1) << (K + G), root, rounding), 0)
        if steps is not None:
            steps["r"] = r
        y = shift_round(c * r, K + G - k - F, rounding)  # n, then in place:
    else:
        up = k + F
        np.left_shift(c, np.maximum(up, 0), out=c)
        y = _div_round(c, np.left_shift(root, np.maximum(-up, 0)), rounding)  # n, then in place:
    if steps is not None:
        steps["n"] = y.copy()
    y *= gamma_q
    y += beta_q
    if steps is not None:
        steps["y"] = y.copy()
    return requantize(y, out_shift, out_bits, True, rounding)


def layer_norm_bounds(d: int, in_bits: int, gamma_max_abs: int, beta_max_abs: int, eps_q: int,
                      out_bits: int, K: int = LN_K, F: int = LN_F,
                      normalization: str = "exact") -> dict[str, int]:
    """The proven largest |value| of each layer_norm intermediate for a row of d values on a signed
    in_bits grid (q in [-2^(b-1), 2^(b-1) - 1]):
        s <= d 2^(b-1);  c = d q_i - s = (d - 1) q_i - (the others) <= (d - 1)(2^b - 1);
        W <= d^2 (2^(2b-2) + eps_q) (the bound layer_norm's checks assume);  k in [k_min, K];
        D < 2^K;  numerator |c 2^(k+F)| < sqrt(d - 1) 2^(K+F), because c_i^2 <= (d - 1) W
        (c sums to 0 over the row and sum c^2 = d S2) and W 2^2k < 2^2K (or |c| when k + F < 0);
        |n| < sqrt(d - 1) 2^F (1 + 2^(1-K)) + 1 (D >= 2^(K-1) and 2^k sqrt(W) < D + 1);
        |y| <= max|gamma_q| |n| + max|beta_q|.
    The reciprocal variant: r <= 2^(G+1), the division's numerator 2^(K+G), the product
    |c r| <= max|c| 2^(G+1); n stays within the same bound (it is within 1/4 + the rounding of the
    exact quotient, and the bound has 2 of slack)."""
    check_normalization(normalization)
    q_max = 1 << (in_bits - 1)
    w_max = d * d * (q_max * q_max + int(eps_q))
    c_max = (d - 1) * ((1 << in_bits) - 1)
    k_min = (2 * K - w_max.bit_length()) >> 1
    numerator = math.isqrt((d - 1) << (2 * (K + F))) + 1
    if k_min + F < 0:
        numerator = max(numerator, c_max)
    n_max = (math.isqrt((d - 1) * (((1 << (K - 1)) + 1) << F) ** 2) >> (K - 1)) + 2
    bounds = {"s": d * q_max, "c": c_max, "W": w_max, "k": max(K, -k_min), "D": (1 << K) - 1,
              "numerator": numerator, "n": n_max, "y": int(gamma_max_abs) * n_max + int(beta_max_abs),
              "output": 1 << (out_bits - 1)}
    if normalization == "reciprocal":
        G = LN_RECIPROCAL_G
        bounds |= {"r": 1 << (G + 1), "numerator": 1 << (K + G), "product": c_max << (G + 1)}
    return bounds


# ---- what an export records ----


def intonly_constants(d_k: int, normalization: str = "exact") -> dict:
    """The kernels' static choices for a model with head size d_k and a normalization variant, as its
    manifest records them: the exporter writes this dict and the engine refuses an export whose
    record differs. A kernel swapped for another (a LUT exp, say) changes its function here and its
    twin in integer_tf/kernels_tf.py, and records what it needs in this dict."""
    check_normalization(normalization)
    constants = {"softmax_F": EXP_F, "softmax_m": d_k, "softmax_constants": list(exp_constants(EXP_F, d_k)),
                 "layer_norm_K": LN_K, "layer_norm_F": LN_F, "normalization": normalization}
    if normalization == "reciprocal":
        constants |= {"softmax_reciprocal_guard": RECIPROCAL_GUARD,
                      "layer_norm_reciprocal_G": LN_RECIPROCAL_G}
    return constants
