"""Initial thresholds: observe the float model's activations, then search max / percentile / MSE /
KL-J (docs/tqt.md, "Calibration"). NumPy only; the model runs eagerly while its sites observe.

Usage: `calibrate(model, batches, method, weight_init)` for a model built with quant.TQTSites;
the per-site pieces (`Observations`, `activation_log2_t`, `weight_log2_t`) are what it is made of.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from integer import fixed_point

METHODS = ("max", "percentile", "mse", "kl")
WEIGHT_INITS = ("max", "3sd", "mse")


class Observations:
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

    def add(self, x) -> None:
        x = np.asarray(x).ravel().astype(np.float64)
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
            self.top = 2.0 ** math.ceil(math.log2(max(m, 2.0**fixed_point.LOG2_T_MIN)))
        while m > self.top:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros_like(merged)])
            self.top *= 2.0

    def count(self) -> int:
        return self.zeros + int(self.hist.sum())

    def bin_width(self) -> float:
        return self.top / self.BINS


def log2_threshold(t) -> np.ndarray:
    """log2 of a threshold, kept inside [LOG2_T_MIN, LOG2_T_MAX] (t = 0 gives the minimum)."""
    t = np.maximum(np.asarray(t, np.float64), 2.0**fixed_point.LOG2_T_MIN)
    return np.clip(np.log2(t), fixed_point.LOG2_T_MIN, fixed_point.LOG2_T_MAX)


def percentile_threshold(obs: Observations, percentile: float) -> float:
    """Upper edge of the histogram bin holding the percentile of |x| (never above max)."""
    cdf = (obs.zeros + np.cumsum(obs.hist)) / obs.count()
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return min((i + 1) * obs.bin_width(), obs.max)


def mse_log2_t(obs: Observations, num_bits: int, signed: bool, rounding: str) -> float:
    """Integer log2_t minimizing the quantization MSE of the subsample.

    The forward uses 2^ceil(log2_t), so every log2_t in (k - 1, k] quantizes like k: the
    power-of-two thresholds are the only distinct candidates, searched 16 octaves below max.
    """
    top = np.ceil(log2_threshold(obs.max))
    return float(least_error_log2_t(obs.sample, top, 16, (), num_bits, signed, rounding))


def least_error_log2_t(x: np.ndarray, top, octaves: int, shape: tuple[int, ...], num_bits: int,
                       signed: bool, rounding: str) -> np.ndarray:
    """Of the thresholds 2^top, 2^(top - 1), ... (`octaves` of them, none below LOG2_T_MIN; `top`
    of `shape`), the log2_t whose grid represents x with the least mean squared error over the
    axes the threshold broadcasts along; ties go to the larger threshold."""
    best, least = top, np.inf
    for octave in range(octaves):
        log2_t = np.maximum(top - octave, fixed_point.LOG2_T_MIN)
        grid = fixed_point.Grid(num_bits, signed, fixed_point.frac_bits(log2_t, num_bits, signed))
        error = _over_channels(np.mean, np.square(grid.fake_quantize(x, rounding) - x), shape)
        best, least = np.where(error < least, log2_t, best), np.minimum(error, least)
    return best


def kl_j(hist: np.ndarray, i: int, levels: int) -> float:
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


def kl_threshold(obs: Observations, num_bits: int, signed: bool) -> float:
    """Threshold (a histogram bin edge) minimizing KL-J between |x| and its quantized version,
    as in the TQT paper. Grids with at least as many levels as occupied bins cannot lose
    anything to rounding at this resolution, so they keep the max."""
    levels = 2 ** fixed_point.magnitude_bits(num_bits, signed)
    nonzero = np.flatnonzero(obs.hist)
    if nonzero.size == 0 or levels > nonzero[-1]:
        return obs.max
    occupied = int(nonzero[-1]) + 1
    hist = obs.hist.astype(np.float64)
    # a cut must keep at least one occupied bin: with nothing below it P is empty (J = 0/0)
    first = max(levels, int(nonzero[0]) + 1)
    best = min(range(first, occupied + 1), key=lambda i: kl_j(hist, i, levels))
    return best * obs.bin_width()


def activation_log2_t(obs: Observations, role: str, num_bits: int, signed: bool, rounding: str,
                      method: str, percentile: float) -> float:
    """log2_t of an activation site from what it observed.

    "max": log2(max|x|). "percentile": log2 of that percentile of |x|. "mse": the
    power-of-two threshold minimizing the quantization MSE of the subsample. "kl": the
    threshold minimizing symmetric KL between the histogram of |x| and its quantized version.
    Softmax probabilities ("probability") lie in [0, 1] by construction: threshold 1, since a
    histogram search sees mostly near-zero probabilities and clips the large ones that matter.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {'|'.join(METHODS)}, got {method!r}")
    if obs.count() == 0:
        raise ValueError("observed no data; cannot calibrate")
    if role == "probability":
        return 0.0
    if method == "max":
        return float(log2_threshold(obs.max))
    if method == "percentile":
        return float(log2_threshold(percentile_threshold(obs, percentile)))
    if method == "mse":
        return mse_log2_t(obs, num_bits, signed, rounding)
    return float(log2_threshold(kl_threshold(obs, num_bits, signed)))


def _over_channels(reduce, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """reduce(w) down to a threshold's shape, over the axes it broadcasts along
    (fixed_point.threshold_axes)."""
    axes = tuple(fixed_point.threshold_axes(w.ndim, shape))
    return np.reshape(reduce(w, axis=axes, keepdims=True), shape)


def weight_log2_t(w, method: str, shape: tuple[int, ...], num_bits: int, signed: bool,
                  rounding: str) -> np.ndarray:
    """log2_t of the threshold's `shape` (() per tensor, (C,) per channel along w's last axis,
    (C, 1) per row along its first): log2(max|w|) ("max"), log2(|mean(w)| + 3 std(w)) ("3sd"),
    or ("mse") the power of two, from max|w|'s down 8 octaves, whose grid (`num_bits`, `signed`,
    `rounding`: read by "mse" only) gives the least sum((Q(w) - w)^2) (ties: the larger one)."""
    w = np.asarray(w, np.float64)
    if method == "3sd":
        spread = 3.0 * _over_channels(np.std, w, shape)
        return log2_threshold(np.abs(_over_channels(np.mean, w, shape)) + spread)
    if method not in ("max", "mse"):
        raise ValueError(f"weight init must be one of {'|'.join(WEIGHT_INITS)}, got {method!r}")
    largest = log2_threshold(_over_channels(np.max, np.abs(w), shape))
    if method == "max":
        return largest
    return least_error_log2_t(w, np.ceil(largest), 9, shape, num_bits, signed, rounding)


def observe(sites) -> dict[str, Observations]:
    """Start observing at every site (each passes its input through unchanged, in float);
    returns the observations by site name. Seeds come from the names: reproducible."""
    observed = {}
    for site in sites:
        obs = Observations(seed=zlib.crc32(site.site_name.encode()))
        site.observer = obs.add
        observed[site.site_name] = obs
    return observed


def calibrate_site(site, obs: Observations, method: str = "max", percentile: float = 99.99) -> None:
    """Set an activation site's log2_t from its observations and stop observing."""
    site.observer = None
    try:
        log2_t = activation_log2_t(obs, site.role, site.num_bits, site.signed, site.rounding, method,
                                   percentile)
    except ValueError as e:
        raise ValueError(f"site {site.site_name!r}: {e}") from None
    site.set_log2_t(log2_t)


def init_weight_site(site, w, method: str = "max") -> None:
    """Set a weight site's log2_t from its weight (per channel or per row when the site is).

    With "max", a maximum in the grid's last step below the threshold (max|w| > p s, e.g. a
    LayerNorm gamma of exactly 1 under threshold 1, whose grid ends at 1 - 2^-(b-1)) would be
    clipped, and a clipped weight gets no gradient: that threshold is doubled instead. "mse"
    weighs that clipping against the rounding error of a coarser grid."""
    shape = tuple(site.log2_t.shape)
    log2_t = weight_log2_t(w, method, shape, site.num_bits, site.signed, site.rounding)
    if method == "max":
        largest = _over_channels(np.max, np.abs(np.asarray(w, np.float64)), shape)
        _, p = fixed_point.integer_range(site.num_bits, site.signed)
        f = fixed_point.frac_bits(log2_t, site.num_bits, site.signed)
        log2_t = np.where(largest > p * np.exp2(-f.astype(np.float64)), np.ceil(log2_t) + 1, log2_t)
    site.set_log2_t(log2_t)


def calibrate(model, batches, method: str = "kl", weight_init: str = "max",
              only: list[str] | None = None) -> None:
    """Initialize the sites of `model` (a model.Transformer built with quant.TQTSites): all of
    them, or the ones named in `only` (those a checkpoint lacked; the others keep their grids).

    Weights: log2_t from max|w| or |mean| + 3 std (`weight_init`). Activations: run the model
    eagerly on the (src, tgt) `batches` with the calibrated sites passing their inputs through
    unchanged while observing (all of them: the float model), then calibrate each activation
    site from what it saw (`method`).
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {'|'.join(METHODS)}, got {method!r}")
    sites = [s for name, s in model.sites.sites.items() if only is None or name in only]
    set_thresholds(model, sites, observe_inputs(model, batches, sites), method, weight_init)


def observe_inputs(model, batches, sites) -> dict[str, Observations]:
    """Run `model` eagerly on the (src, tgt) batches with `sites` passing their inputs through
    unchanged (float) while observing; their observations by site name."""
    observed = observe(sites)
    try:
        for src, tgt in batches:
            model(src, tgt[:, :-1], training=False)
    finally:
        for site in sites:
            site.observer = None
    return observed


def set_thresholds(model, sites, observed: dict[str, Observations], method: str, weight_init: str) -> None:
    """Each weight site's log2_t from its weight, each activation site's from its observations,
    for its current width."""
    for site, weight in model.weight_sites():
        if site in sites:
            init_weight_site(site, weight.numpy(), weight_init)
    for site in sites:
        if site.role != "weight":
            calibrate_site(site, observed[site.site_name], method)
