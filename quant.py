"""Trained power-of-two quantization thresholds (TQT) in TensorFlow: the op and the sites.

Jain et al., "Trained Quantization Thresholds ..." (MLSys 2020). The equations, derived in
`docs/tqt.md`, for `b` bits and a trainable `log2_t` (base-2 log of the clipping threshold):

    s = 2^-f,   f = b - 1 - ceil(log2_t)  (signed)  or  b - ceil(log2_t)  (unsigned)
    forward:    q = clip(R(x / s), n, p),   y = q * s
    backward:   dL/dx      = dy * 1[n <= x/s <= p]
                dL/dlog2_t = sum(dy * s ln2 * (R(x/s) - x/s  inside,  n  below,  p  above))

The grid, the roundings and [n, p] are defined once in `integer/fixed_point.py`. `tqt_fake_quant_reference`
computes the equations line for line; `tqt_fake_quant_fused` is the same op per tensor on TF's
fused kernels (equal bit for bit, tested; docs/tqt.md "The fused path" names the two exceptions,
a zero's sign and subnormal x/s); `tqt_fake_quant` picks the fused one where it exists.

Layout: the op (`tqt_fake_quant`, `quantize_bias`); one quantizer at one matmul input
(`QuantSite`) and the threshold clamp; the run's bit widths (`QuantConfig`) and the site
factory the model calls (`TQTSites`). Calibration is in `integer/calibration.py`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from integer import fixed_point
from modules import Adam, FloatLayers

LN2 = math.log(2.0)
# Roundings that TF's QuantizeAndDequantizeV4 kernel implements (docs/tqt.md, "The fused path");
# its per-channel form rejects vector ranges in TF 2.21, so per channel uses the reference.
FUSED_ROUND_MODES = {"half_even": "HALF_TO_EVEN", "half_up": "HALF_UP"}
GRAD_KERNEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_quant_grad.so")


def load_grad_kernel(path: str = GRAD_KERNEL_PATH) -> types.ModuleType | None:
    """The one-pass backward kernel of the fused path (csrc/quant_grad.cc, built by `make kernel`), or
    None where it is not built or does not load (built against another TensorFlow): the fused
    path then takes TF's kernels, the same dL/dx and a 2.5x slower backward."""
    if not os.path.exists(path):
        return None
    try:
        return tf.load_op_library(path)
    except (tf.errors.NotFoundError, OSError):
        return None


GRAD_KERNEL = load_grad_kernel()


@contextlib.contextmanager
def without_grad_kernel() -> Iterator[None]:
    """Inside: the fused path's gradients take TF's kernels (read where the backward is traced)."""
    global GRAD_KERNEL
    kernel, GRAD_KERNEL = GRAD_KERNEL, None
    try:
        yield
    finally:
        GRAD_KERNEL = kernel


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def round_integer(v: tf.Tensor, rounding: str) -> tf.Tensor:
    """R(v) (docs/tqt.md, "Roundings"; fixed_point.round_to_integer in NumPy)."""
    if rounding == "half_even":
        return tf.round(v)  # tf.round rounds half to even
    if rounding == "half_up":
        return tf.floor(v + 0.5)
    return tf.floor(v)


def frac_bits_tensor(log2_t: tf.Tensor, num_bits: int, signed: bool) -> tf.Tensor:
    """f = (b - 1 or b) - ceil(log2_t) in the graph, int32 (fixed_point.frac_bits in NumPy)."""
    return fixed_point.magnitude_bits(num_bits, signed) - tf.cast(tf.math.ceil(log2_t), tf.int32)


def _scale(log2_t: tf.Tensor, num_bits: int, signed: bool) -> tf.Tensor:
    """s = 2^-f, f = (b - 1 or b) - ceil(log2_t): exact, a power of two (log2_t's dtype)."""
    f = fixed_point.magnitude_bits(num_bits, signed) - tf.math.ceil(log2_t)
    return tf.pow(tf.constant(2.0, log2_t.dtype), -f)


def _sum_to(t: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """sum(t) down to like's shape, over the axes like broadcasts along (fixed_point.threshold_axes)."""
    axes = fixed_point.threshold_axes(t.shape.rank, tuple(like.shape))
    return tf.reshape(tf.reduce_sum(t, axis=axes), tf.shape(like))


def _inputs(x, log2_t, num_bits: int, rounding: str) -> tuple[tf.Tensor, tf.Tensor]:
    fixed_point.check_bits_and_rounding(num_bits, rounding)
    x = tf.convert_to_tensor(x)
    return x, tf.cast(log2_t, x.dtype)  # a variable still gets its gradient through the read


def tqt_fake_quant_reference(x: tf.Tensor, log2_t: tf.Tensor | float, num_bits: int, signed: bool,
                             rounding: str) -> tf.Tensor:
    """TQT fake quantization, docs/tqt.md "Forward" and "Gradients" line for line. `log2_t` is a
    scalar, [C] along x's last axis (per output channel) or [C, 1] along x's first axis (per row
    of a table); it broadcasts against x, and dL/dlog2_t sums over the broadcast axes.
    float32/float64."""
    x, log2_t = _inputs(x, log2_t, num_bits, rounding)
    n, p = fixed_point.integer_range(num_bits, signed)

    @tf.custom_gradient
    def fake_quant(x, log2_t):
        s = _scale(log2_t, num_bits, signed)  # s = 2^-f
        v = x / s  # x / s, exact: s is a power of two
        r = round_integer(v, rounding)  # R(x / s)
        y = tf.clip_by_value(r, n, p) * s  # y = q s,  q = clip(R(x / s), n, p)

        def grad(dy):
            inside = (v >= n) & (v <= p)
            dx = dy * tf.cast(inside, dy.dtype)  # dL/dx = dy 1[n <= x/s <= p]
            below_or_above = tf.where(v < n, tf.constant(n, v.dtype), tf.constant(p, v.dtype))
            g = tf.where(inside, r - v, below_or_above)  # R(x/s) - x/s | n | p
            dlog2_t = LN2 * _sum_to(dy * (s * g), log2_t)  # sum(dy s ln2 g)
            return dx, dlog2_t

        return y, grad

    return fake_quant(x, log2_t)


def tqt_fake_quant_fused(x: tf.Tensor, log2_t: tf.Tensor | float, num_bits: int, signed: bool,
                         rounding: str) -> tf.Tensor:
    """The same op per tensor (scalar log2_t, rounding in FUSED_ROUND_MODES) on TF's kernels,
    docs/tqt.md "The fused path": one pass over x forward instead of five.

    QuantizeAndDequantizeV4 clips x to [n s, p s], then computes R(x 2^f) 2^-f; its gradient
    kernel is the mask 1[n s <= x <= p s]. The threshold gradient uses s (R(x/s) - x/s) = y - x
    inside, and n s = y below, p s = y above: sum(dy s ln2 g) = ln2 sum(dy (y - 1[inside] x)).
    The backward is one pass of GRAD_KERNEL where `uses_grad_kernel` (the same dL/dx; dL/dlog2_t
    summed in another order), else five passes of TF's kernels.
    """
    x, log2_t = _inputs(x, log2_t, num_bits, rounding)
    if rounding not in FUSED_ROUND_MODES or log2_t.shape.rank != 0:
        raise ValueError(f"no fused kernel for rounding {rounding!r} with log2_t of shape "
                         f"{log2_t.shape}: use tqt_fake_quant_reference")
    n, p = fixed_point.integer_range(num_bits, signed)

    @tf.custom_gradient
    def fake_quant(x, log2_t):
        s = _scale(log2_t, num_bits, signed)
        lo, hi = n * s, p * s  # the clipping range in x's units (exact)
        y = tf.raw_ops.QuantizeAndDequantizeV4(
            input=x, input_min=lo, input_max=hi, signed_input=signed, num_bits=num_bits,
            range_given=True, round_mode=FUSED_ROUND_MODES[rounding], narrow_range=False)

        def grad(dy):
            if uses_grad_kernel(x):
                dx, total = GRAD_KERNEL.tqt_fake_quant_grad(dy, x, y, lo, hi)
                return dx, LN2 * total

            def inside(t):  # t 1[lo <= x <= hi]
                return tf.raw_ops.QuantizeAndDequantizeV4Grad(
                    gradients=t, input=x, input_min=lo, input_max=hi)[0]

            dlog2_t = LN2 * tf.reduce_sum(dy * (y - inside(x)))
            return inside(dy), dlog2_t

        return y, grad

    return fake_quant(x, log2_t)


def _grad_kernel_device() -> bool:
    """The kernel is CPU-only: it serves where no GPU is visible (on a GPU TF's kernels stay there)."""
    return not tf.config.list_logical_devices("GPU")


def uses_grad_kernel(x: tf.Tensor) -> bool:
    """Whether the fused path's backward of x runs on GRAD_KERNEL: it is loaded, x is float32 or
    float64, and no GPU is visible."""
    return GRAD_KERNEL is not None and x.dtype in (tf.float32, tf.float64) and _grad_kernel_device()


def grad_kernel_missing() -> bool:
    """Whether the fused path would run on GRAD_KERNEL here (no GPU) but it is not loaded."""
    return GRAD_KERNEL is None and _grad_kernel_device()


def tqt_fake_quant(x: tf.Tensor, log2_t: tf.Tensor | float, num_bits: int, signed: bool,
                   rounding: str) -> tf.Tensor:
    """TQT fake quantization with straight-through gradients: the fused kernels where TF has them
    (per tensor, half_even or half_up), else the reference; both compute the same bits."""
    per_tensor = tf.convert_to_tensor(log2_t).shape.rank == 0
    if per_tensor and rounding in FUSED_ROUND_MODES:
        return tqt_fake_quant_fused(x, log2_t, num_bits, signed, rounding)
    return tqt_fake_quant_reference(x, log2_t, num_bits, signed, rounding)


def _int32_max(dtype: tf.DType) -> float:
    """Largest integer <= 2^31 - 1 that dtype represents (2^31 - 128 in float32)."""
    d = dtype.as_numpy_dtype
    return float(np.floor(np.nextafter(d(2**31), d(0))))


def quantize_bias(b: tf.Tensor, frac_bits_acc: tf.Tensor | int) -> tf.Tensor:
    """Fake-quantize a bias to int32 on the accumulator grid, f_acc = f_x + f_w (docs/tqt.md,
    "Bias grid"):

        q = clip(round_half_even(b * 2^f_acc), -2^31, 2^31 - 1),   y = q * 2^-f_acc

    `frac_bits_acc` is a scalar or a per-channel vector (b's last axis). Straight-through
    gradient to b (int32 clipping is a range guard, not a trained trade-off); none to the
    fractional bits.
    """
    b = tf.convert_to_tensor(b)
    f = tf.stop_gradient(tf.cast(frac_bits_acc, b.dtype))
    two = tf.constant(2.0, b.dtype)
    n, _ = fixed_point.integer_range(fixed_point.BIAS_BITS, True)

    def forward(b):
        q = tf.clip_by_value(tf.round(b * tf.pow(two, f)), float(n), _int32_max(b.dtype))
        return q * tf.pow(two, -f)

    return tf.grad_pass_through(forward)(b)


# --------------------------------------------------------------------------------------------
# One quantizer at one matmul input
# --------------------------------------------------------------------------------------------


def _module_name(site_name: str) -> str:
    """tf.Module names must be identifiers: 'decoder/block_1/q' -> 'decoder_block_1_q'."""
    return re.sub(r"\W|^(?=\d)", "_", site_name)


class QuantSite(tf.Module):
    """The quantizer at one matrix-multiplication input, owning its trainable `log2_t`.

    `name` is a stable hierarchical name (`decoder/block_1/cross_attention/value_input`, built
    by integer/site_names.py), kept as `site_name`. `role` is one of fixed_point.SIGNED_BY_ROLE: "weight" or
    "activation" (signed), "unsigned" (ReLU output) or "probability" (unsigned softmax output).
    `channels` gives a weight one log2_t per output channel of its matmul: shape [channels] along
    the weight's last axis (x @ W), or [channels, 1] along its first with `channel_axis=0` (a table
    E used as x @ E^T, whose rows are the output channels: the embedding).

    `frozen` and `observer` are read when the call is traced: set them before building (or
    retracing) a tf.function. With an `observer` (calibration.observe) the site hands it each
    input eagerly and passes the input through in float.
    """

    def __init__(
        self,
        name: str,
        role: str,
        num_bits: int = 8,
        rounding: str = "half_even",
        channels: int | None = None,
        channel_axis: int = -1,
    ):
        super().__init__(name=_module_name(name))
        fixed_point.check_bits_and_rounding(num_bits, rounding)
        if role not in fixed_point.SIGNED_BY_ROLE:
            raise ValueError(f"site {name!r}: role must be one of {list(fixed_point.SIGNED_BY_ROLE)}")
        if channels is not None and role != "weight":
            raise ValueError(f"site {name!r}: per-channel thresholds are for weights only")
        if channel_axis not in (-1, 0):
            raise ValueError(f"site {name!r}: channel_axis must be -1 (last axis) or 0 (rows)")
        self.site_name = name
        self.role = role
        self.num_bits = num_bits
        self.signed = fixed_point.SIGNED_BY_ROLE[role]
        self.rounding = rounding
        self.channels = channels
        self.frozen = False
        self.observer: Callable[[np.ndarray], None] | None = None
        # eager only: when a list, every call appends (x, q): its input and the integers
        # q = y * 2^f the op produced (clip statistics, engine comparisons)
        self.recorded: list[tuple[np.ndarray, np.ndarray]] | None = None
        shape = [] if channels is None else [channels] if channel_axis == -1 else [channels, 1]
        with self.name_scope:
            # ONLY_FIRST_REPLICA: a clamp inside a MirroredStrategy replica function writes
            # the same value on every replica, so take the first one's.
            self.log2_t = tf.Variable(
                tf.zeros(shape, tf.float32),
                name="log2_t",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self.observer is not None:
            if not tf.executing_eagerly():
                raise RuntimeError(f"site {self.site_name!r}: observing works eagerly only")
            self.observer(np.asarray(x))
            return x  # calibration runs the model in float
        log2_t = tf.stop_gradient(self.log2_t) if self.frozen else self.log2_t
        y = tqt_fake_quant(x, log2_t, self.num_bits, self.signed, self.rounding)
        if self.recorded is not None:  # y * 2^f is exact: a power-of-two scale
            self.recorded.append((np.asarray(x), np.asarray(y, np.float64) * np.exp2(self.frac_bits())))
        return y

    @property
    def trains_threshold(self) -> bool:
        """Whether log2_t is a trained variable (intonly_layers.FixedSite's is a constant)."""
        return isinstance(self.log2_t, tf.Variable)

    def set_log2_t(self, log2_t) -> None:
        """log2_t := the value (broadcast to the site's shape), clipped to the allowed range."""
        value = np.clip(log2_t, fixed_point.LOG2_T_MIN, fixed_point.LOG2_T_MAX)
        self.log2_t.assign(np.broadcast_to(value, self.log2_t.shape).astype(np.float32))

    # ---- the grid, read back as NumPy -------------------------------------------------------

    def frac_bits(self) -> np.ndarray:
        """f with s = 2^-f (int64; log2_t's shape: [], [channels] or [channels, 1])."""
        return fixed_point.frac_bits(self.log2_t.numpy(), self.num_bits, self.signed)

    def frac_bits_tensor(self) -> tf.Tensor:
        """f as an int32 tensor computed in-graph from log2_t (no gradient)."""
        return frac_bits_tensor(self.log2_t, self.num_bits, self.signed)

    def grid(self) -> fixed_point.Grid:
        return fixed_point.Grid(self.num_bits, self.signed, self.frac_bits())

    def threshold(self) -> np.ndarray:
        """The effective power-of-two threshold 2^ceil(log2_t)."""
        return np.exp2(np.ceil(self.log2_t.numpy().astype(np.float64)))

    def clip_fraction(self, x) -> float:
        """Fraction of x outside [n*s, p*s], i.e. clipped by the current grid."""
        n, p = fixed_point.integer_range(self.num_bits, self.signed)
        v = np.asarray(x, np.float64) * np.exp2(self.frac_bits().astype(np.float64))
        return float(np.mean((v < n) | (v > p)))


def clamp_log2_t(sites, lo: float = fixed_point.LOG2_T_MIN, hi: float = fixed_point.LOG2_T_MAX) -> None:
    """Clip every site's log2_t into [lo, hi]; call after each optimizer update.

    The log2_t gradient is a sum over the whole tensor, so one plain-SGD step can throw
    log2_t to -300, where 2^f overflows and the site outputs NaN for good. An absolute range
    (not one relative to the current value) is enough: real thresholds live far inside it.
    """
    for site in sites:
        site.log2_t.assign(tf.clip_by_value(site.log2_t, lo, hi))


def trained_threshold_sites(sites) -> list[QuantSite]:
    """The sites whose log2_t trains (fixed grids, intonly_layers.FixedSite, aside)."""
    return [s for s in sites if isinstance(s, QuantSite) and s.trains_threshold]


class ThresholdOptimizer:
    """TQT's optimizer for the thresholds, apart from the weights': Adam on every trained log2_t
    (beta2 = 0.999, eps = 1e-8) at lr_t = lr * 0.5^(step // decay_steps), each log2_t clamped
    into [LOG2_T_MIN, LOG2_T_MAX] after the update (clamp_log2_t)."""

    def __init__(self, sites: list[QuantSite], lr: float, decay_steps: int, fused: bool = False):
        self.sites = list(sites)
        self.variables = [s.log2_t for s in self.sites]
        self.adam = Adam(self.variables, name="th_adam", beta2=0.999, eps=1e-8, fused=fused)
        self.base_lr, self.decay_steps = lr, decay_steps

    def lr(self, step: tf.Tensor) -> tf.Tensor:
        halvings = tf.cast(step // self.decay_steps, tf.float32)
        return self.base_lr * tf.pow(0.5, halvings)

    def apply(self, grads: list[tf.Tensor], step: tf.Tensor) -> None:
        """One update at `step` (the training step before this one's update)."""
        self.adam.apply(grads, self.lr(step))
        clamp_log2_t(self.sites)


# --------------------------------------------------------------------------------------------
# Configuration and the factory the model calls
# --------------------------------------------------------------------------------------------


def _parse_override(flag: str) -> tuple[str, int]:
    """'GLOB=BITS' -> (GLOB, BITS), e.g. '*/softmax_output=8'."""
    pattern, sep, bits = flag.rpartition("=")
    lo, hi = fixed_point.MIN_BITS, fixed_point.MAX_BITS
    if not sep or not pattern or not bits.strip().isdigit() or not lo <= int(bits) <= hi:
        raise ValueError(f"--quant_override {flag!r}: expected GLOB=BITS with BITS in {lo}..{hi}")
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
    integer_only: bool = False
    residual_bits: int = 16
    per_row_embedding: bool = False
    normalization: str = "exact"  # integer-only LayerNorm and softmax (integer/kernels.NORMALIZATIONS)

    def __post_init__(self):
        for bits in (self.wbits, self.abits, self.residual_bits):
            fixed_point.check_bits_and_rounding(bits, self.rounding)

    @classmethod
    def from_flags(
        cls,
        quant: str,
        wbits: int | None = None,
        abits: int | None = None,
        rounding: str = "half_even",
        per_channel: bool = False,
        overrides: list[str] | None = None,
        integer_only: bool = False,
        residual_bits: int = 16,
        per_row_embedding: bool = False,
        normalization: str = "exact",
    ) -> QuantConfig | None:
        """Build from command-line flags; None for --quant none. `wbits`/`abits` replace the
        preset's widths when given."""
        if quant not in fixed_point.PRESETS:
            raise ValueError(f"--quant must be one of {list(fixed_point.PRESETS)}, got {quant!r}")
        preset = fixed_point.PRESETS[quant]
        if normalization != "exact" and not integer_only:
            raise ValueError(f"--normalization {normalization} needs --integer_only (the float and "
                             "matmul-only models normalize in float)")
        if preset is None:
            if integer_only:
                raise ValueError("--integer_only needs a --quant preset (it quantizes every tensor)")
            return None
        return cls(
            wbits=preset[0] if wbits is None else wbits,
            abits=preset[1] if abits is None else abits,
            rounding=rounding,
            per_channel=per_channel,
            overrides=[_parse_override(flag) for flag in overrides or []],
            integer_only=integer_only,
            residual_bits=residual_bits,
            per_row_embedding=per_row_embedding,
            normalization=normalization,
        )

    def bits_for(self, site_name: str, role: str, default: int | None = None) -> int:
        """The role's width (or `default`), then the overrides."""
        widths = {"weight": self.wbits, "residual": self.residual_bits}
        bits = default or widths.get(role, self.abits)
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(site_name, pattern):
                bits = override
        return bits


class TQTSites(FloatLayers, tf.Module):
    """Creates the model's quantization sites (the quantized counterpart of FloatSites); the
    layers between matmuls stay float (intonly_layers.IntegerOnlySites makes them integer).

    A tf.Module, so `trainable_variables` lists every log2_t and a tf.train.Checkpoint of it
    saves them.
    """

    def __init__(self, config: QuantConfig):
        super().__init__(name="tqt_sites")
        self.config = config
        self.sites: dict[str, QuantSite] = {}

    def site(self, name: str, role: str, channels: int | None = None, bits: int | None = None,
             rows: int | None = None) -> QuantSite:
        """A new site for `name` (each name once: the model reuses the returned object); `bits`
        replaces the role's width (overrides still apply). A weight gets a threshold per output
        channel: `channels` (its last axis) with `per_channel`, `rows` (a table used transposed,
        the embedding) with `per_row_embedding`."""
        if name in self.sites:
            raise ValueError(f"quant site {name!r} created twice")
        if rows is not None:
            channels, channel_axis = (rows if self.config.per_row_embedding else None), 0
        else:
            channel_axis = -1
            channels = channels if self.config.per_channel and role == "weight" else None
        site = QuantSite(
            name,
            role,
            num_bits=self.config.bits_for(name, role, bits),
            rounding=self.config.rounding,
            channels=channels,
            channel_axis=channel_axis,
        )
        self.sites[name] = site
        return site

    def relu(self, x: tf.Tensor, into: QuantSite) -> tf.Tensor:
        """max(0, x) before the site `into`, or nothing where `into` does the ReLU's work.

        An unsigned grid starts at 0 (n = 0), so Q(max(0, x)) = Q(x): x < 0 is clipped to 0, its
        dL/dx is 0 (outside the range) and it adds n s = 0 to dL/dlog2_t, as a ReLU'd 0 would
        (R(0) - 0 = 0). Skipping the ReLU removes its forward and backward passes from the QAT
        step. The one difference is at x = 0 exactly: the site passes dy, TF's ReLU gives 0 (both
        are subgradients of the kink). The ReLU stays where the site looks at its input
        (calibration's observer, `recorded`) and before a signed site."""
        looks_at_input = into.observer is not None or into.recorded is not None
        if not into.signed and not looks_at_input:
            return x
        return tf.nn.relu(x)

    def bias(self, b: tf.Tensor, x_site: QuantSite, w_site: QuantSite) -> tf.Tensor:
        """The bias on the accumulator grid of x_site's input times w_site's weight."""
        return quantize_bias(b, x_site.frac_bits_tensor() + w_site.frac_bits_tensor())
