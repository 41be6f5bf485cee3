"""Exact integer accumulation: how large a K-term sum of integer products can get, and when
float32 or float64 BLAS carries it exactly (float64 holds every integer below 2^53, float32
below 2^24)."""

from __future__ import annotations

import numpy as np

from integer.fixed_point import Grid

# float64 holds every integer up to 2^53 exactly; float32 up to 2^24
FLOAT64_EXACT, FLOAT32_EXACT = 2**53, 2**24


# --------------------------------------------------------------------------------------------
# Exact integer accumulation
# --------------------------------------------------------------------------------------------


def accumulator_bound(k: int, gx: Grid, gw: Grid) -> int:
    """K * max|q_x| * max|q_w|: no partial sum of a K-term product of these grids is larger.
    A Python integer, so a wide layer's bound cannot wrap."""
    return k * gx.max_abs * gw.max_abs


def bias_dtype(bound: int, bias: np.ndarray) -> type:
    """float32 when every accumulator (|acc| <= bound) plus the int32 bias stays below 2^24, so
    the float32 add is exact; float64 otherwise. |-2^31| is taken in int64, where it exists."""
    largest = int(np.abs(bias.astype(np.int64)).max(initial=0))
    return np.float32 if bound + largest < FLOAT32_EXACT else np.float64


def check_exact(k: int, gx: Grid, gw: Grid) -> None:
    """Raise OverflowError unless a K-term accumulation is exact in float64:

        |acc| <= K * max|q_x| * max|q_w| + 2^31 (bias) < 2^53,

    where max|q| = 2^(b-1) (signed) or 2^b - 1 (unsigned), so for signed operands
    |acc| <= K * 2^(bx-1) * 2^(bw-1) + 2^31. With b <= 16 each product is at most 2^31, so any
    K < 2^21 qualifies: every sum of integer products is then an integer below
    2^53, each partial sum is exactly representable whatever the summation order, and
    float64 arithmetic on them equals int64 arithmetic.
    """
    if accumulator_bound(k, gx, gw) + 2**31 >= FLOAT64_EXACT:
        raise OverflowError(f"a {k}-term accumulation of {gx.bits}x{gw.bits}-bit products "
                            "could exceed 2^53")


def gemm(x: np.ndarray, w: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """x @ w in `dtype`; a 2-D w as one GEMM over all rows (np.matmul would loop over the
    leading axes)."""
    x, w = x.astype(dtype, copy=False), w.astype(dtype, copy=False)
    if w.ndim == 2:
        return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
    return np.matmul(x, w)


def signed_bits(magnitude: int) -> int:
    """Bits of a two's-complement register holding -magnitude .. magnitude."""
    return int(magnitude).bit_length() + 1
