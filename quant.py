"""Trained power-of-two quantization thresholds (TQT): the reference implementation.

Jain et al., "Trained Quantization Thresholds ..." (MLSys 2020); REFERENCE.md section 1.

For `b` bits and a trainable `log2_t` (base-2 log of the clipping threshold `t`):

    signed:    s = 2^ceil(log2_t) / 2^(b-1),   [n, p] = [-2^(b-1), 2^(b-1) - 1]
    unsigned:  s = 2^ceil(log2_t) / 2^b,       [n, p] = [0, 2^b - 1]

    forward:   q = clip(R(x / s), n, p),   y = q * s

Because `s` is a power of two, `s = 2^-f` with `f` integer fractional bits, and `x / s = x * 2^f`
is exact in floating point. `R` is the rounding mode: "half_even" (TQT's kernels), "half_up"
(Xilinx DPUs) or "floor" (truncation); integer inference must use the same one.

Backward (straight-through estimator, d ceil(u)/du := 1):

    dL/dx      = dy                     if n <= x/s <= p, else 0
    dL/dlog2_t = sum(dy * s * ln2 * g),  g = R(x/s) - x/s  inside,  n  below,  p  above

summed down to `log2_t`'s shape: a scalar (per tensor) or [C] along x's last axis (per output
channel of a weight).

Layout: the op (`tqt_fake_quant`, `frac_bits`, `quantize_bias`); one quantizer at one
matmul input (`QuantSite`, with initialization and calibration); the threshold clamp; the
run configuration (`QuantConfig`, `PRESETS`); the factory the model calls (`TQTSites`).
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

LN2 = math.log(2.0)
ROUNDINGS = ("half_even", "half_up", "floor")
# Roles of a site and whether its integers are signed: ReLU outputs and softmax
# probabilities are non-negative, so they spend no bit on the sign.
SIGNED_BY_ROLE = {"weight": True, "activation": True, "unsigned": False, "probability": False}
# With |log2_t| <= 24 and b <= 16, s and 1/s stay far inside float32's normal range
# (2^-40 .. 2^40), so x * 2^f neither overflows nor loses bits to denormals.
LOG2_T_MIN, LOG2_T_MAX = -24.0, 24.0


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def check_bits_and_rounding(num_bits: int, rounding: str) -> None:
    """Raise ValueError unless 2 <= num_bits <= 16 and rounding is one of ROUNDINGS."""
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer in 2..16, got {num_bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def integer_range(num_bits: int, signed: bool) -> tuple[int, int]:
    """[n, p] = [-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1] (unsigned)."""
    if signed:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def _round(v: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(v) for the chosen rounding mode."""
    if rounding == "half_even":
        return tf.round(v)  # what TQT's kernels do; tf.round rounds half to even
    if rounding == "half_up":
        return tf.floor(v + 0.5)  # what Xilinx DPUs do
    return tf.floor(v)  # truncation: the cheapest in FPGA logic


# Roundings that TF's QuantizeAndDequantizeV4 kernel implements.  Per tensor it computes the
# forward in one pass over x (clip x to [n s, p s], then R(x * 2^f) * 2^-f) instead of five:
# clipping x before rounding equals clipping R(x / s) because n and p are integers, and the
# kernel's scale p / (p s) is exactly 2^f.  (Its per-channel form rejects vector ranges in TF 2.21.)
FUSED_ROUND_MODES = {"half_even": "HALF_TO_EVEN", "half_up": "HALF_UP"}


def _quantize_dequantize(x: tf.Tensor, s: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, signed: bool,
                         num_bits: int, rounding: str) -> tf.Tensor:
    """y = clip(R(x / s), n, p) * s = clip(R(x / s) * s, lo, hi) with lo = n s, hi = p s (s a
    power of two: both products are exact), s a scalar or a vector along x's last axis."""
    if rounding in FUSED_ROUND_MODES and s.shape.rank == 0:
        return tf.raw_ops.QuantizeAndDequantizeV4(
            input=x, input_min=lo, input_max=hi, signed_input=signed, num_bits=num_bits,
            range_given=True, round_mode=FUSED_ROUND_MODES[rounding], narrow_range=False)
    return tf.clip_by_value(_round(x / s, rounding) * s, lo, hi)


def frac_bits(log2_t: tf.Tensor | np.ndarray | float, num_bits: int, signed: bool) -> tf.Tensor | np.ndarray:
    """Fractional bits f of the grid, s = 2^-f:

        f = b - 1 - ceil(log2_t)   (signed)
        f = b     - ceil(log2_t)   (unsigned)

    A TF tensor or variable gives an int32 tensor (in-graph, no gradient); a Python or NumPy
    value gives a NumPy int64 array.
    """
    magnitude_bits = num_bits - 1 if signed else num_bits
    if tf.is_tensor(log2_t):
        return magnitude_bits - tf.cast(tf.math.ceil(log2_t), tf.int32)
    return magnitude_bits - np.ceil(log2_t).astype(np.int64)


def _inside_mask(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor):
    """The function t -> t * 1[lo <= x <= hi] (lo, hi scalars or vectors along x's last axis).

    Per tensor it is TF's QuantizeAndDequantizeV4Grad kernel, which computes exactly this
    product in one pass (it is the straight-through gradient of the fused forward).
    """
    if lo.shape.rank == 0:
        return lambda t: tf.raw_ops.QuantizeAndDequantizeV4Grad(
            gradients=t, input=x, input_min=lo, input_max=hi)[0]
    inside = tf.logical_and(x >= lo, x <= hi)
    return lambda t: tf.where(inside, t, tf.zeros([], t.dtype))


def _dot_to(a: tf.Tensor, b: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """sum(a * b) down to like's shape: [] (per tensor) or [C] (per channel, x's last axis)."""
    if like.shape.rank == 0:
        return tf.reduce_sum(a * b)
    return tf.reduce_sum(tf.reshape(a * b, [-1, tf.shape(like)[0]]), axis=0)


def tqt_fake_quant(
    x: tf.Tensor,
    log2_t: tf.Tensor | float,
    num_bits: int = 8,
    signed: bool = True,
    rounding: str = "half_even",
) -> tf.Tensor:
    """TQT fake quantization with straight-through gradients:

        s = 2^-f,   f = b - 1 - ceil(log2_t)  (signed)  or  b - ceil(log2_t)  (unsigned)
        q = clip(R(x/s), n, p)
        y = q * s
        dL/dx      = dy * 1[n <= x/s <= p]
        dL/dlog2_t = sum(dy * g),   g = s ln2 * (R(x/s) - x/s  inside,  n  below,  p  above)

    `log2_t` is an explicit input (a scalar, or [C] broadcast along x's last axis), cast to
    x's dtype; a variable passed here gets its gradient through the read. float32/float64.
    """
    check_bits_and_rounding(num_bits, rounding)
    x = tf.convert_to_tensor(x)
    n, p = integer_range(num_bits, signed)
    magnitude_bits = num_bits - 1 if signed else num_bits

    @tf.custom_gradient
    def fake_quant(x, log2_t):
        f = magnitude_bits - tf.math.ceil(log2_t)  # s = 2^-f,  f integer
        s = tf.pow(tf.constant(2.0, x.dtype), -f)  # exact: a power of two
        lo, hi = n * s, p * s  # the clipping range in x's units
        y = _quantize_dequantize(x, s, lo, hi, signed, num_bits, rounding)  # y = clip(R(x/s), n, p) s

        def grad(dy):
            inside = _inside_mask(x, lo, hi)  # t -> t * 1[n <= x/s <= p]
            dx = inside(dy)  # dL/dx = dy * 1[inside]
            # g = s ln2 (q - 1[inside] x/s) = ln2 (y - 1[inside] x), since y equals R(x/s) s,
            # n s, p s in the three cases; y - x is exact inside (they are within s/2).
            dlog2_t = _dot_to(dy, y - inside(x), log2_t) * LN2  # sum(dy * g)
            return dx, dlog2_t

        return y, grad

    return fake_quant(x, tf.cast(log2_t, x.dtype))


def _int32_max(dtype: tf.DType) -> float:
    """Largest integer <= 2^31 - 1 that dtype represents (2^31 - 128 in float32)."""
    d = dtype.as_numpy_dtype
    return float(np.floor(np.nextafter(d(2**31), d(0))))


def quantize_bias(b: tf.Tensor, frac_bits_acc: tf.Tensor | int) -> tf.Tensor:
    """Fake-quantize a bias to int32 on the accumulator grid, f_acc = f_x + f_w:

        q = clip(round_half_even(b * 2^f_acc), -2^31, 2^31 - 1),   y = q * 2^-f_acc

    `frac_bits_acc` is a scalar or a per-channel vector (b's last axis). Straight-through
    gradient to b (int32 clipping is a range guard, not a trained trade-off); none to the
    fractional bits.
    """
    b = tf.convert_to_tensor(b)
    f = tf.stop_gradient(tf.cast(frac_bits_acc, b.dtype))
    two = tf.constant(2.0, b.dtype)

    def forward(b):
        q = tf.clip_by_value(tf.round(b * tf.pow(two, f)), -(2.0**31), _int32_max(b.dtype))
        return q * tf.pow(two, -f)

    return tf.grad_pass_through(forward)(b)


# --------------------------------------------------------------------------------------------
# Observation and calibration (eager, NumPy)
# --------------------------------------------------------------------------------------------


class _Observations:
    """Statistics of the values seen at a site, bounded in memory.

    `hist` counts the nonzero |x| over [0, top] in BINS equal bins; `top` is a power of two
    that doubles (merging bin pairs, so no count moves between bins) when a larger |x|
    arrives. Exact zeros (ReLU, padding) are only counted in `zeros`: every grid represents
    them exactly, and as a spike in the first bin they would dominate the KL search.
    `sample` is a uniform random subsample of x without replacement (the SAMPLE values with
    the smallest random keys), kept signed so MSE sees the asymmetric grid.
    """

    BINS = 2048
    SAMPLE = 1 << 16

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.max = 0.0
        self.top = 0.0
        self.hist = np.zeros(self.BINS, np.int64)
        self.zeros = 0
        self.keys = np.empty(0)
        self.sample = np.empty(0)

    def add(self, x: np.ndarray) -> None:
        x = x.ravel().astype(np.float64)
        if x.size == 0:
            return
        a = np.abs(x)
        self.max = max(self.max, float(a.max()))
        self._grow_to(self.max)
        self.zeros += int(np.count_nonzero(a == 0))
        a = a[a > 0]
        idx = np.minimum((a * (self.BINS / self.top)).astype(np.int64), self.BINS - 1)
        self.hist += np.bincount(idx, minlength=self.BINS)
        self.keys = np.concatenate([self.keys, self.rng.random(x.size)])
        self.sample = np.concatenate([self.sample, x])
        if self.keys.size > self.SAMPLE:
            keep = np.argpartition(self.keys, self.SAMPLE)[: self.SAMPLE]
            self.keys, self.sample = self.keys[keep], self.sample[keep]

    def _grow_to(self, m: float) -> None:
        if self.top == 0.0:
            self.top = 2.0 ** math.ceil(math.log2(max(m, 2.0**LOG2_T_MIN)))
        while m > self.top:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros_like(merged)])
            self.top *= 2.0

    def count(self) -> int:
        return self.zeros + int(self.hist.sum())

    def bin_width(self) -> float:
        return self.top / self.BINS


def _log2(t) -> np.ndarray:
    """log2 of a threshold, kept inside [LOG2_T_MIN, LOG2_T_MAX] (t = 0 gives the minimum)."""
    t = np.maximum(np.asarray(t, np.float64), 2.0**LOG2_T_MIN)
    return np.clip(np.log2(t), LOG2_T_MIN, LOG2_T_MAX)


def _percentile_threshold(obs: _Observations, percentile: float) -> float:
    """Upper edge of the histogram bin holding the percentile of |x| (never above max)."""
    cdf = (obs.zeros + np.cumsum(obs.hist)) / obs.count()
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return min((i + 1) * obs.bin_width(), obs.max)


def _mse_log2_t(obs: _Observations, num_bits: int, signed: bool, rounding: str) -> float:
    """Integer log2_t minimizing the quantization MSE of the subsample.

    The forward uses 2^ceil(log2_t), so every log2_t in (k - 1, k] quantizes like k: the
    power-of-two thresholds are the only distinct candidates, searched 16 octaves below max.
    """
    x = tf.constant(obs.sample)
    top = math.ceil(float(_log2(obs.max)))
    candidates = [k for k in range(top, top - 16, -1) if k >= LOG2_T_MIN]

    def mse(k: int) -> float:
        y = tqt_fake_quant(x, tf.constant(float(k), tf.float64), num_bits, signed, rounding)
        return float(tf.reduce_mean(tf.square(y - x)))

    return float(min(candidates, key=mse))  # ties go to the larger threshold (first)


def _kl_j(hist: np.ndarray, i: int, levels: int) -> float:
    """Symmetric KL J = KL(P||Q) + KL(Q||P) = sum (P - Q) log(P/Q) between

    P: hist clipped at bin i, the mass beyond it folded into the last kept bin, and
    Q: hist[:i] quantized to `levels` equal groups of bins, each group's mass spread evenly
       over the group's bins where P > 0. Q leaves the clipped mass out, so clipping costs.
    On P's support Q is zero only where a group holds nothing but clipped mass; a tiny floor
    keeps J finite (and large) there.
    """
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()
    group = np.arange(i) * levels // i
    mass = np.bincount(group, weights=hist[:i], minlength=levels)
    occupied = np.bincount(group, weights=p > 0, minlength=levels)
    support = p > 0
    p, group = p[support], group[support]
    q = mass[group] / occupied[group]
    p, q = p / p.sum(), np.maximum(q / q.sum(), 1e-12)
    return float(np.sum((p - q) * np.log(p / q)))


def _kl_threshold(obs: _Observations, num_bits: int, signed: bool) -> float:
    """Threshold (a histogram bin edge) minimizing KL-J between |x| and its quantized version,
    as in the TQT paper. Grids with at least as many levels as occupied bins cannot lose
    anything to rounding at this resolution, so they keep the max."""
    levels = 2 ** (num_bits - 1) if signed else 2**num_bits
    nonzero = np.flatnonzero(obs.hist)
    if nonzero.size == 0 or levels > nonzero[-1]:
        return obs.max
    occupied = int(nonzero[-1]) + 1
    hist = obs.hist.astype(np.float64)
    # a cut must keep at least one occupied bin: with nothing below it P is empty (J = 0/0)
    first = max(levels, int(nonzero[0]) + 1)
    best = min(range(first, occupied + 1), key=lambda i: _kl_j(hist, i, levels))
    return best * obs.bin_width()


# --------------------------------------------------------------------------------------------
# One quantizer at one matmul input
# --------------------------------------------------------------------------------------------


def _module_name(site_name: str) -> str:
    """tf.Module names must be identifiers: 'decoder/block_1/q' -> 'decoder_block_1_q'."""
    return re.sub(r"\W|^(?=\d)", "_", site_name)


class QuantSite(tf.Module):
    """The quantizer at one matrix-multiplication input, owning its trainable `log2_t`.

    `name` is a stable hierarchical name (`decoder/block_1/cross_attention/value_input`),
    kept as `site_name`. `role` is "weight" or "activation" (signed), "unsigned" (ReLU output)
    or "probability" (unsigned, softmax output: its threshold is 1 whatever the calibration).
    `channels` gives a per-output-channel log2_t of shape [channels] (weights only).

    `frozen` and `observing` are Python flags read when the call is traced: set them before
    building (or retracing) a tf.function.
    """

    def __init__(
        self,
        name: str,
        role: str,
        num_bits: int = 8,
        rounding: str = "half_even",
        channels: int | None = None,
    ):
        super().__init__(name=_module_name(name))
        check_bits_and_rounding(num_bits, rounding)
        if role not in SIGNED_BY_ROLE:
            raise ValueError(f"site {name!r}: role must be one of {list(SIGNED_BY_ROLE)}")
        if channels is not None and role != "weight":
            raise ValueError(f"site {name!r}: per-channel thresholds are for weights only")
        self.site_name = name
        self.role = role
        self.num_bits = num_bits
        self.signed = SIGNED_BY_ROLE[role]
        self.rounding = rounding
        self.channels = channels
        self.frozen = False
        self.calibrated = False
        self.observing = False
        self._observations: _Observations | None = None
        # eager only: when a list, every call appends (x, q): its input and the integers
        # q = y * 2^f the op produced (clip statistics, engine comparisons)
        self.recorded: list[tuple[np.ndarray, np.ndarray]] | None = None
        shape = [] if channels is None else [channels]
        with self.name_scope:
            # ONLY_FIRST_REPLICA: a clamp inside a MirroredStrategy replica function writes
            # the same value on every replica, so take the first one's.
            self.log2_t = tf.Variable(
                tf.zeros(shape, tf.float32),
                name="log2_t",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self.observing:
            self._observe(x)
            return x  # calibration runs the model in float
        log2_t = tf.stop_gradient(self.log2_t) if self.frozen else self.log2_t
        y = tqt_fake_quant(x, log2_t, self.num_bits, self.signed, self.rounding)
        if self.recorded is not None:  # y * 2^f is exact: a power-of-two scale
            self.recorded.append((np.asarray(x), np.asarray(y, np.float64) * np.exp2(self.frac_bits())))
        return y

    def _observe(self, x: tf.Tensor) -> None:
        if not tf.executing_eagerly():
            raise RuntimeError(f"site {self.site_name!r}: observing works eagerly only")
        if self._observations is None:
            self._observations = _Observations(seed=zlib.crc32(self.site_name.encode()))
        self._observations.add(np.asarray(x))

    # ---- the grid, read back as NumPy -------------------------------------------------------

    def frac_bits(self) -> np.ndarray:
        """f with s = 2^-f (int64; shape [] or [channels])."""
        return frac_bits(self.log2_t.numpy(), self.num_bits, self.signed)

    def frac_bits_tensor(self) -> tf.Tensor:
        """f as an int32 tensor computed in-graph from log2_t (no gradient)."""
        return frac_bits(self.log2_t, self.num_bits, self.signed)

    def threshold(self) -> np.ndarray:
        """The effective power-of-two threshold 2^ceil(log2_t)."""
        return np.exp2(np.ceil(self.log2_t.numpy().astype(np.float64)))

    def scale(self) -> np.ndarray:
        """s = 2^-f."""
        return np.exp2(-self.frac_bits().astype(np.float64))

    def clip_fraction(self, x) -> float:
        """Fraction of x outside [n*s, p*s], i.e. clipped by the current grid."""
        n, p = integer_range(self.num_bits, self.signed)
        v = np.asarray(x, np.float64) / self.scale()
        return float(np.mean((v < n) | (v > p)))

    # ---- initialization and calibration -----------------------------------------------------

    def _set_log2_t(self, log2_t) -> None:
        value = np.clip(log2_t, LOG2_T_MIN, LOG2_T_MAX)
        self.log2_t.assign(np.broadcast_to(value, self.log2_t.shape).astype(np.float32))
        self.calibrated = True

    def init_from_weight(self, w, method: str = "max") -> None:
        """log2_t = log2(max|w|) ("max") or log2(|mean(w)| + 3 std(w)) ("3sd"), per channel
        over all axes but the last when the site is per-channel."""
        w = np.asarray(w, np.float64)
        axes = tuple(range(w.ndim - 1)) if self.channels is not None else None
        if method == "max":
            t = np.abs(w).max(axis=axes)
        elif method == "3sd":
            t = np.abs(w.mean(axis=axes)) + 3.0 * w.std(axis=axes)
        else:
            raise ValueError(f"init_from_weight method must be 'max' or '3sd', got {method!r}")
        self._set_log2_t(_log2(t))
        self._observations = None
        self.observing = False

    def calibrate(self, method: str = "max", percentile: float = 99.99) -> None:
        """Set log2_t from the observed values, then drop them and stop observing.

        "max": log2(max|x|). "percentile": log2 of that percentile of |x|. "mse": the
        power-of-two threshold minimizing the quantization MSE of the subsample. "kl": the
        threshold minimizing symmetric KL between the histogram of |x| and its quantized
        version (TQT paper).
        """
        obs = self._observations
        if obs is None or obs.count() == 0:
            raise ValueError(f"site {self.site_name!r} observed no data; cannot calibrate")
        if self.role == "probability":
            # softmax outputs lie in [0, 1] by construction: threshold 1. A histogram search
            # sees mostly near-zero probabilities and would clip the few large ones that matter
            # (measured: KL put one cross-attention site at 1/8 and cost 69 BLEU).
            log2_t = 0.0
        elif method == "max":
            log2_t = _log2(obs.max)
        elif method == "percentile":
            log2_t = _log2(_percentile_threshold(obs, percentile))
        elif method == "mse":
            log2_t = _mse_log2_t(obs, self.num_bits, self.signed, self.rounding)
        elif method == "kl":
            log2_t = _log2(_kl_threshold(obs, self.num_bits, self.signed))
        else:
            raise ValueError(f"calibration method must be max|percentile|mse|kl, got {method!r}")
        self._set_log2_t(log2_t)
        self._observations = None
        self.observing = False


def clamp_log2_t(sites, lo: float = LOG2_T_MIN, hi: float = LOG2_T_MAX) -> None:
    """Clip every site's log2_t into [lo, hi]; call after each optimizer update.

    The log2_t gradient is a sum over the whole tensor, so one plain-SGD step can throw
    log2_t to -300, where 2^f overflows and the site outputs NaN for good. An absolute range
    (not one relative to the current value) is enough: real thresholds live far inside it.
    """
    for site in sites:
        site.log2_t.assign(tf.clip_by_value(site.log2_t, lo, hi))


# --------------------------------------------------------------------------------------------
# Configuration and the factory the model calls
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "w8a8": (8, 8),
    "w6a6": (6, 6),
    "w4a8": (4, 8),
    "w4a4": (4, 4),
}


def _parse_override(flag: str) -> tuple[str, int]:
    """'GLOB=BITS' -> (GLOB, BITS), e.g. '*/softmax_output=8'."""
    pattern, sep, bits = flag.rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit() or not 2 <= int(bits) <= 16:
        raise ValueError(f"--quant_override {flag!r}: expected GLOB=BITS with BITS in 2..16")
    return pattern, int(bits)


@dataclass
class QuantConfig:
    """Bit widths of a quantized run. `overrides` are (glob on the site name, bits) pairs;
    the glob's `*` also matches '/', and the last matching pair wins."""

    wbits: int = 8
    abits: int = 8
    rounding: str = "half_even"
    per_channel: bool = False
    overrides: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self):
        for bits in (self.wbits, self.abits):
            check_bits_and_rounding(bits, self.rounding)

    @classmethod
    def from_flags(
        cls,
        quant: str,
        wbits: int | None = None,
        abits: int | None = None,
        rounding: str = "half_even",
        per_channel: bool = False,
        overrides: list[str] | None = None,
    ) -> QuantConfig | None:
        """Build from command-line flags; None for --quant none. `wbits`/`abits` replace the
        preset's widths when given."""
        if quant not in PRESETS:
            raise ValueError(f"--quant must be one of {list(PRESETS)}, got {quant!r}")
        preset = PRESETS[quant]
        if preset is None:
            return None
        return cls(
            wbits=preset[0] if wbits is None else wbits,
            abits=preset[1] if abits is None else abits,
            rounding=rounding,
            per_channel=per_channel,
            overrides=[_parse_override(flag) for flag in overrides or []],
        )

    def bits_for(self, site_name: str, role: str) -> int:
        bits = self.wbits if role == "weight" else self.abits
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(site_name, pattern):
                bits = override
        return bits


class TQTSites(tf.Module):
    """Creates the model's quantization sites (the quantized counterpart of FloatSites).

    A tf.Module, so `trainable_variables` lists every log2_t and a tf.train.Checkpoint of it
    saves them.
    """

    def __init__(self, config: QuantConfig):
        super().__init__(name="tqt_sites")
        self.config = config
        self.sites: dict[str, QuantSite] = {}

    def site(self, name: str, role: str, channels: int | None = None) -> QuantSite:
        """A new site for `name` (each name once: the model reuses the returned object)."""
        if name in self.sites:
            raise ValueError(f"quant site {name!r} created twice")
        per_channel = self.config.per_channel and role == "weight"
        site = QuantSite(
            name,
            role,
            num_bits=self.config.bits_for(name, role),
            rounding=self.config.rounding,
            channels=channels if per_channel else None,
        )
        self.sites[name] = site
        return site

    def bias(self, b: tf.Tensor, x_site: QuantSite, w_site: QuantSite) -> tf.Tensor:
        """The bias on the accumulator grid of x_site's input times w_site's weight."""
        return quantize_bias(b, x_site.frac_bits_tensor() + w_site.frac_bits_tensor())


# --------------------------------------------------------------------------------------------
# Calibrating a whole model
# --------------------------------------------------------------------------------------------


def calibrate(model, batches, method: str = "kl", weight_init: str = "max") -> None:
    """Initialize every site of `model` (a Transformer built with TQTSites).

    Weights: log2_t from max|w| or |mean| + 3 std (`weight_init`). Activations: run the float
    model (every site passes its input through unchanged while observing) eagerly on the
    (src, tgt) `batches`, then calibrate each activation site from what it saw (`method`).
    """
    sites = list(model.sites.sites.values())
    for site in sites:
        site.observing = True
    for src, tgt in batches:
        model(tf.constant(src), tf.constant(tgt[:, :-1]), training=False)
    for site, weight in model.weight_sites():
        site.init_from_weight(weight.numpy(), weight_init)
    for site in sites:
        if site.role != "weight":
            site.calibrate(method)


def sites_from_flags(hp):
    """The site factory for the --quant/--wbits/--abits/--rounding/--per_channel/--quant_override
    flags: TQTSites, or modules.FloatSites (identity hooks) for --quant none."""
    from modules import FloatSites

    config = QuantConfig.from_flags(hp.quant, hp.wbits, hp.abits, hp.rounding, hp.per_channel,
                                    hp.quant_override)
    return FloatSites() if config is None else TQTSites(config)


def site_table(sites, clip_fractions: dict[str, float] | None = None) -> str:
    """A text table of the sites: name, bits, signed, threshold 2^ceil(log2_t), f, % clipped."""
    rows = [f"{'site':58s} {'bits':>4s} {'sign':>4s} {'threshold':>10s} {'f':>4s} {'clipped':>8s}"]
    for site in sites:
        f = site.frac_bits()
        t = site.threshold()
        f_text = str(int(f)) if f.ndim == 0 else f"{int(f.min())}..{int(f.max())}"
        t_text = f"{float(t):g}" if t.ndim == 0 else f"{float(t.min()):g}.."
        clipped = "" if clip_fractions is None else f"{100 * clip_fractions[site.site_name]:7.3f}%"
        rows.append(f"{site.site_name:58s} {site.num_bits:4d} {'s' if site.signed else 'u':>4s} "
                    f"{t_text:>10s} {f_text:>4s} {clipped:>8s}")
    return "\n".join(rows)
