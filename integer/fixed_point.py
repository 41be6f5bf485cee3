"""The fixed-point contract: bits, roundings, integer ranges, fractional bits and a site's grid.

    grid        x ~ q * 2^-f,  q in [n, p] = [-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1]
    frac bits   f = (b - 1 or b) - ceil(log2_t)           (docs/tqt.md, "The grid")
    quantizer   q = clip(R(x * 2^f), n, p)                R: one of ROUNDINGS
    presets     PRESETS: --quant name -> (weight bits, activation bits)

NumPy only: the TF op (quant.py) and the integer engines implement these equations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDINGS = ("half_even", "half_up", "floor")  # TQT's kernels, Xilinx DPUs, truncation
MIN_BITS, MAX_BITS = 2, 16
# --quant presets: (weight bits, activation bits); "none" is the float model
PRESETS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "w8a8": (8, 8),
    "w6a6": (6, 6),
    "w4a8": (4, 8),
    "w4a4": (4, 4),
    "w3a8": (3, 8),
    "w2a8": (2, 8),
}
# Roles of a site and whether its integers are signed: ReLU outputs and softmax
# probabilities are non-negative, so they spend no bit on the sign.
SIGNED_BY_ROLE = {"weight": True, "activation": True, "unsigned": False, "probability": False,
                  "residual": True}  # residual: the residual stream and LayerNorm (--residual_bits)
# With |log2_t| <= 24 and b <= 16, s and 1/s stay far inside float32's normal range
# (2^-40 .. 2^40), so x * 2^f neither overflows nor loses bits to denormals.
LOG2_T_MIN, LOG2_T_MAX = -24.0, 24.0
BIAS_BITS = 32  # biases are int32 on the accumulator grid


def check_bits_and_rounding(num_bits: int, rounding: str) -> None:
    """Raise ValueError unless MIN_BITS <= num_bits <= MAX_BITS and rounding is in ROUNDINGS."""
    if not isinstance(num_bits, int) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {num_bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def magnitude_bits(num_bits: int, signed: bool) -> int:
    """Bits left for the magnitude: b - 1 (signed, one is the sign) or b (unsigned)."""
    return num_bits - 1 if signed else num_bits


def integer_range(num_bits: int, signed: bool) -> tuple[int, int]:
    """[n, p] = [-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1] (unsigned)."""
    top = 2 ** magnitude_bits(num_bits, signed)
    return (-top, top - 1) if signed else (0, top - 1)


def threshold_axes(rank: int, shape: tuple[int, ...]) -> list[int]:
    """The axes of a rank-`rank` tensor along which a threshold of `shape` broadcasts (what
    dL/dlog2_t and a weight's calibration statistics sum over): all for [] (per tensor), all but
    the last for [C] (per channel), the last for [C, 1] (per row of a table)."""
    lead = rank - len(shape)
    return list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1]


def frac_bits(log2_t, num_bits: int, signed: bool) -> np.ndarray:
    """Fractional bits f of the grid, s = 2^-f:  f = (b - 1 or b) - ceil(log2_t).  int64."""
    return magnitude_bits(num_bits, signed) - np.ceil(log2_t).astype(np.int64)


def round_to_integer(v: np.ndarray, rounding: str) -> np.ndarray:
    """R(v) in v's float type, in place: rint (half to even), floor(v + 0.5) (half up, the sum
    rounded in v's type as the TF graph does), or floor."""
    if rounding == "half_even":
        return np.rint(v, out=v)
    if rounding == "half_up":
        return np.floor(v + v.dtype.type(0.5), out=v)
    if rounding == "floor":
        return np.floor(v, out=v)
    raise ValueError(f"unknown rounding {rounding!r}")


def int_dtype(bits: int, signed: bool = True) -> np.dtype:
    """The smallest NumPy integer type holding `bits`-bit values (int8, int16, int32; uint8 ...)."""
    for width in (8, 16, 32, 64):
        if bits <= width:
            return np.dtype(f"{'' if signed else 'u'}int{width}")
    raise ValueError(f"no integer type holds {bits} bits")


@dataclass(frozen=True)
class Grid:
    """A site's integer grid: x ~ q * 2^-f with q in integer_range(bits, signed). `f` is an int64
    array that broadcasts against the site's tensor: [], [channels] (a weight's last axis) or
    [rows, 1] (a table used as x @ E^T: the embedding with --per_row_embedding)."""

    bits: int
    signed: bool
    f: np.ndarray

    @property
    def range(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed)

    @property
    def output_f(self) -> np.ndarray:
        """f along the output axis of the matmul this weight feeds: [] or [channels]; a table's
        per-row [rows, 1] becomes [rows], the output channels of x @ E^T."""
        return self.f.reshape(-1) if self.f.ndim == 2 else self.f

    @property
    def max_abs(self) -> int:
        """max |q|: 2^(b-1) signed, 2^b - 1 unsigned."""
        return max(-self.range[0], self.range[1])

    def quantize(self, x: np.ndarray, rounding: str, dtype: type = np.float32) -> np.ndarray:
        """q = clip(R(x * 2^f), n, p) computed in `dtype` (float32: as the TF graph does it;
        x * 2^f is exact). Returned as `dtype` holding the integers (exact: |q| <= 2^16)."""
        v = np.asarray(x, dtype) * np.exp2(self.f).astype(dtype)  # a new array
        n, p = self.range
        return np.clip(round_to_integer(v, rounding), n, p, out=v)

    def fake_quantize(self, x: np.ndarray, rounding: str) -> np.ndarray:
        """q * 2^-f in float64: the values the grid represents x by."""
        return self.quantize(x, rounding, np.float64) * np.exp2(-self.f.astype(np.float64))
