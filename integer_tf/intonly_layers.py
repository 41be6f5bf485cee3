"""The integer-only layers for training (--integer_only): the TF graph computes the integers the
accelerator will (`kernels_tf`, twins of `integer/kernels.py`), with float surrogate gradients.

Between the matmuls, every tensor is an integer on a power-of-two grid (docs/integer_only.md):

    embedding sum   x_0 = clip(L[ids] + P[pos])          L = R(Q(E) sqrt(d)), P = R(PE) on its grid
    residual add    r   = clip(R((x << .) + (a << .)))   exact on the finer grid, one shift down
    LayerNorm       y   = kernels.layer_norm(r, gamma_q, beta_q, eps_q)   onto the output site
    softmax         P   = kernels.softmax(scores, mask)   1/sqrt(d_k) folded into exp's constants

Each layer's value is its integers q on grid f, q 2^-f. In training (`training=True`) it also
computes the float op through the same TQT sites, for the gradient only: `exact_forward` joins the
two, so training sees exactly the integer model and its gradients are the float model's
("surrogate" straight-through):

    y = stop_gradient(integers * 2^-f) + (y_float - stop_gradient(y_float))

Without `training` (decoding, dev scoring) no gradient is taken, and the layers skip the float op:
the value is the same q 2^-f. While sites observe (calibration) the layers run the float op only,
as the float model does.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.control_flow_v2_func_graphs import ControlFlowFuncGraph

import quant
from integer import fixed_point, kernels, site_names, token_ids
from integer_tf import kernels_tf
from modules import Dense, EmbeddingSum, LayerNorm, Site, Softmax, set_untracked

# --------------------------------------------------------------------------------------------
# Integers <-> grid values
# --------------------------------------------------------------------------------------------


def _pow2(f: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    return tf.pow(tf.constant(2.0, dtype), tf.cast(f, dtype))


def to_int(v: tf.Tensor, f: tf.Tensor, dtype: tf.DType = tf.int64) -> tf.Tensor:
    """q = v * 2^f as int64: exact for a value on grid f (v = q 2^-f); values off the grid (only
    while training, after dropout) are rounded to it, half to even. In v's own dtype: the product
    by a power of two is exact there (no value here comes near the float32 range's ends).
    dtype=tf.float64: the same integers held in float64 (every float32 integer is one there)."""
    return tf.cast(tf.round(v * kernels_tf.in_home_graph(lambda f: _pow2(f, v.dtype), f)), dtype)


def from_int(q: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    """q 2^-f as float32: exact for |q| < 2^24 (every integer-only tensor: at most 16 bits)."""
    return tf.cast(q, tf.float32) * kernels_tf.in_home_graph(lambda f: _pow2(-tf.cast(f, tf.float32)), f)


def exact_forward(y_float: tf.Tensor, q: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    """The value q 2^-f with the gradient of y_float (dL/dy_float = dL/dvalue). Not y_float +
    stop_gradient(q 2^-f - y_float): that float sum need not round back to q 2^-f."""
    return _straight_through(y_float, tf.stop_gradient(from_int(q, f)))


@tf.custom_gradient
def _straight_through(y_float: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    return tf.identity(value), lambda dy: (dy, None)


# _residual_float64 is exact while the residual's shift down, g - f_r, is at most this
RESIDUAL_FLOAT64_MAX_DOWN = 37

# graph -> {key: tensor}: what graph_constant computed in each traced graph
_GRAPH_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_constant(key: Hashable, compute: Callable[[], tf.Tensor]):
    """compute(): a value that depends on variables only (a grid f, gamma_q, beta_q, eps_q), once
    per traced graph and key. Eagerly every call computes it (a variable may have changed since).
    In a tf.function the first call's tensor serves the whole trace, and inside a while loop or a
    cond branch (cached decoding) it is computed in the graph around them: once per decoded batch,
    not once per token and use. No gradient flows through such a value."""
    if tf.executing_eagerly():
        return compute()
    graph = tf.compat.v1.get_default_graph()
    while isinstance(graph, ControlFlowFuncGraph):
        graph = graph.outer_graph
    values = _GRAPH_CONSTANTS.setdefault(graph, {})
    if key not in values:
        with graph.as_default():
            values[key] = compute()
    return values[key]


def site_f(site: quant.QuantSite) -> tf.Tensor:
    """The site's fractional bits f as an int64 tensor (follows its trainable log2_t)."""
    return graph_constant((site, "f"), lambda: tf.cast(site.frac_bits_tensor(), tf.int64))


def site_integers(site: quant.QuantSite, x: tf.Tensor) -> tf.Tensor:
    """clip(R(x 2^f)) on the site's grid, int64: the integers of the site's op (quant.tqt_fake_quant's
    x / s is x 2^f exactly), without observing or recording (for constants folded onto a site's
    grid), from the grid built once per graph."""
    scale = kernels_tf.in_home_graph(lambda f: _pow2(f, x.dtype), site_f(site))
    n, p = fixed_point.integer_range(site.num_bits, site.signed)
    return tf.cast(tf.clip_by_value(quant.round_integer(x * scale, site.rounding), n, p), tf.int64)


def clip_to(q: tf.Tensor, site: quant.QuantSite) -> tf.Tensor:
    n, p = fixed_point.integer_range(site.num_bits, site.signed)
    return tf.clip_by_value(q, tf.constant(n, tf.int64), tf.constant(p, tf.int64))


def _observing(*sites: quant.QuantSite) -> bool:
    return any(s.observer is not None for s in sites)


def _float_too(training: bool, *sites: quant.QuantSite) -> bool:
    """Whether a layer computes the float op beside its integers: for the gradient (training), or
    for sites recording their inputs (QuantSite.recorded: train.threshold_report's clip fractions)."""
    return training or any(s.recorded is not None for s in sites)


class FixedSite(quant.QuantSite):
    """A site with a constant threshold: the softmax probabilities, threshold 1 (log2_t = 0), the
    grid 2^-b that the integer softmax writes. Nothing to train, calibrate or restore."""

    def __init__(self, name: str, role: str, num_bits: int, rounding: str):
        super().__init__(name, role, num_bits, rounding)
        self.log2_t = tf.constant(0.0, tf.float32)

    def set_log2_t(self, log2_t) -> None:
        if np.any(np.asarray(log2_t) != 0.0):
            raise ValueError(f"site {self.site_name!r}: the threshold is fixed at 1 (log2_t = 0)")


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------


class IntEmbeddingSum(tf.Module):
    """x_0 = clip(L[ids] + P[pos]) on the `embedding_sum` site: L = R(Q(E) sqrt(d)) is the lookup
    table with sqrt(d_model) folded in, P = R(PE) the position table, both on the site's grid;
    their sum is an integer add and a clip (no shift: one grid)."""

    _TF_MODULE_IGNORED_PROPERTIES = tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"recorder"}

    def __init__(self, d_model: int, sites: quant.TQTSites):
        super().__init__(name="embedding_sum")
        self.d_model = d_model
        self.float_sum = EmbeddingSum(d_model)  # the float op: calibration and the gradient
        self.site = sites.site(site_names.EMBEDDING_SUM, "residual")
        set_untracked(self, "recorder", sites)

    def lookup_integers(self, rows: tf.Tensor) -> tf.Tensor:
        """L for rows of Q(E) (the whole table at export)."""
        return site_integers(self.site, rows * math.sqrt(self.d_model))

    def position_integers(self, pe: tf.Tensor) -> tf.Tensor:
        """P for rows of the sinusoidal table (modules.positional_encoding)."""
        return site_integers(self.site, pe)

    def __call__(self, rows: tf.Tensor, pe: tf.Tensor, training: bool = False) -> tf.Tensor:
        if _observing(self.site):
            return self.site(self.float_sum(rows, pe))
        q = clip_to(self.lookup_integers(rows) + self.position_integers(pe), self.site)
        self.recorder.record(self.site.site_name, q)
        if not _float_too(training, self.site):
            return from_int(q, site_f(self.site))
        return exact_forward(self.site(self.float_sum(rows, pe)), q, site_f(self.site))


class IntLayerNorm(LayerNorm):
    """LN(x + a) in integers. The residual add: x on the grid of `skip` (the previous LayerNorm's
    output or the embedding sum), a = the `branch` Dense's accumulator on f_x + f_w (W^O or
    dense2, bias included); both shifted exactly onto the finer grid g, added, and requantized
    onto the `input` site: r = clip(R((x << (g - f_x)) + (a << (g - f_a)) >> (g - f_r))). Then
    kernels.layer_norm with gamma on its own site (weight, --residual_bits), beta on the product
    grid f_gamma + F, eps_q = R(eps 2^(2 f_r)), the result on the `output` site."""

    # other modules' sites and layer: neither checkpointed nor walked (tf.Module._flatten) here
    _TF_MODULE_IGNORED_PROPERTIES = LayerNorm._TF_MODULE_IGNORED_PROPERTIES | {"skip", "branch", "recorder"}

    def __init__(self, name: str, d: int, sites: quant.TQTSites, skip: Site, branch: Dense,
                 eps: float = 1e-6):
        super().__init__(name, d, eps)
        names = site_names.layer_norm(name)
        bits = sites.config.residual_bits
        self.input_site = sites.site(names.input, "residual")
        self.gamma_site = sites.site(names.gamma, "weight", bits=bits)
        self.output_site = sites.site(names.output, "residual")
        set_untracked(self, "skip", skip)
        set_untracked(self, "branch", branch)
        set_untracked(self, "recorder", sites)

    # the layer's integer constants, each once per traced graph (graph_constant)
    def branch_f(self) -> tf.Tensor:
        """The grid of the branch accumulator: f_x + f_w (a vector for per-channel weights)."""
        x_site, w_site = self.branch.x_site, self.branch.w_site
        return graph_constant((self, "branch_f"), lambda: site_f(x_site) + site_f(w_site))

    def gamma_integers(self) -> tf.Tensor:
        return graph_constant((self, "gamma_q"), lambda: site_integers(self.gamma_site, self.gamma))

    def beta_integers(self) -> tf.Tensor:
        """beta_q = clip(round_half_even(beta 2^(f_gamma + F)), |.| < 2^48): like a bias on the
        accumulator grid of gamma_q n (every float32 beta scales exactly)."""
        def beta_q():
            q = to_int(self.beta, site_f(self.gamma_site) + kernels.LN_F)
            top = tf.constant(kernels.LN_MAX_ABS_BETA - 1, tf.int64)
            return tf.clip_by_value(q, -top, top)
        return graph_constant((self, "beta_q"), beta_q)

    def eps_integer(self) -> tf.Tensor:
        """eps_q = round_half_even(eps 2^(2 f_r)) (kernels.layer_norm_eps_q)."""
        return graph_constant((self, "eps_q"),
                              lambda: to_int(tf.constant(self.eps, tf.float64), 2 * site_f(self.input_site)))

    def residual_shifts(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """g - f_x, g - f_a and g - f_r for g = max(f_x, f_a, f_r) (residual_integers)."""
        def shifts():
            f_x, f_a, f_r = site_f(self.skip), self.branch_f(), site_f(self.input_site)
            g = tf.maximum(tf.maximum(f_x, f_a), f_r)
            return g - f_x, g - f_a, g - f_r
        return graph_constant((self, "residual_shifts"), shifts)

    def residual_integers(self, x: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
        """(x << (g - f_x)) + (a << (g - f_a)), exact, then R(. 2^-(g - f_r)), with g = max(f_x, f_a,
        f_r): the integers of the spec's g = max(f_x, f_a), for g at least f_r makes the
        requantization a right shift (or none), and a finer f_r than both grids shifts the sum up
        exactly either way. As an integral float64 tensor: in float64 where that is exact
        (_residual_float64), else in int64; the sites' `float64_routes` when a decoding has decided
        the route, else by a tf.cond."""
        def float64_route():
            return self._residual_float64(x, a)

        def int64_route():
            return tf.cast(self._residual_int64(x, a), tf.float64)

        if self.recorder.float64_routes is None:
            return tf.cond(self.float64_route_fits(), float64_route, int64_route)
        return float64_route() if self.recorder.float64_routes else int64_route()

    def float64_route_fits(self) -> tf.Tensor:
        """Whether the residual's shift down, g - f_r, is at most 37 (_residual_float64's condition)."""
        return graph_constant((self, "float64_route_fits"),
                              lambda: tf.reduce_all(self.residual_shifts()[2] <= RESIDUAL_FLOAT64_MAX_DOWN))

    def _residual_int64(self, x: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
        up_x, up_a, down = self.residual_shifts()
        total = (tf.bitwise.left_shift(to_int(x, site_f(self.skip)), up_x)
                 + tf.bitwise.left_shift(to_int(a, self.branch_f()), up_a))
        return clip_to(kernels_tf.shift_right_round(total, down, self.input_site.rounding), self.input_site)

    def _residual_float64(self, x: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
        """The same integers from u + v, u = to_int(x, f_x) 2^(f_r - f_x) and v = to_int(a, f_a)
        2^(f_r - f_a), float64 (TF's int64 ops are several times slower): u and v are float32
        integers scaled by powers of two, exact; their sum is total 2^-down, exact while |total| <
        2^53. A larger total gives |total 2^-down| >= 2^(53 - down) >= 2^16 for down <= 37, clipped
        either way (the rounding is monotonic). Then R and the clip, exact on that value."""
        def scales():
            f_x, f_a, f_r = site_f(self.skip), self.branch_f(), site_f(self.input_site)
            to_r = kernels_tf.power_of_two
            return _pow2(f_x), to_r(f_r - f_x), _pow2(f_a), to_r(f_r - f_a)
        to_x, x_to_r, to_a, a_to_r = graph_constant((self, "residual_scales"), scales)
        total = (tf.cast(tf.round(x * to_x), tf.float64) * x_to_r
                 + tf.cast(tf.round(a * to_a), tf.float64) * a_to_r)
        n, p = fixed_point.integer_range(self.input_site.num_bits, self.input_site.signed)
        return tf.clip_by_value(kernels_tf.round_float64(total, self.input_site.rounding), float(n), float(p))

    def float_add_norm(self, r: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
        """The float LayerNorm of the residual sum r onto the output site (the gradient's path)."""
        mean, var = tf.nn.moments(r, axes=[-1], keepdims=True)
        return self.output_site(gamma * (r - mean) * tf.math.rsqrt(var + self.eps) + beta)

    def add_norm(self, x: tf.Tensor, a: tf.Tensor, training: bool = False) -> tf.Tensor:
        if _observing(self.input_site, self.gamma_site, self.output_site):
            return self.float_add_norm(self.input_site(x + a), self.gamma_site(self.gamma), self.beta)
        r_q, beta_q = self.residual_integers(x, a), self.beta_integers()
        out = kernels_tf.layer_norm(
            r_q, self.gamma_integers(), beta_q, self.eps_integer(),
            site_f(self.gamma_site), site_f(self.output_site), self.output_site.num_bits,
            self.output_site.rounding, normalization=self.recorder.config.normalization)
        self.recorder.record(self.input_site.site_name, r_q)
        self.recorder.record(self.output_site.site_name, out)
        if not _float_too(training, self.input_site, self.gamma_site, self.output_site):
            return from_int(out, site_f(self.output_site))
        r = exact_forward(self.input_site(x + a), r_q, site_f(self.input_site))
        beta = from_int(beta_q, tf.cast(site_f(self.gamma_site) + kernels.LN_F, tf.float32))
        beta = self.beta + tf.stop_gradient(beta - self.beta)  # straight-through to beta
        y = self.float_add_norm(r, self.gamma_site(self.gamma), beta)
        return exact_forward(y, out, site_f(self.output_site))


class IntSoftmax(tf.Module):
    """softmax(Q K^T / sqrt(d_k) + mask) in integers: the scores are the Q K^T accumulator on
    f_q + f_k; kernels.softmax with m = d_k (1/sqrt(d_k) folded into exp's constants), masked
    keys by selection (the additive bias only marks them), probabilities on the fixed 2^-b grid
    of the `probs` site."""

    _TF_MODULE_IGNORED_PROPERTIES = tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"sites", "recorder"}

    def __init__(self, d_k: int, q_site: Site, k_site: Site, p_site: FixedSite, recorder: IntegerOnlySites):
        super().__init__(name="softmax")
        self.d_k = d_k
        self.float_softmax = Softmax(d_k, float64=False)  # the float op: calibration and the gradient
        set_untracked(self, "sites", (q_site, k_site, p_site))
        set_untracked(self, "recorder", recorder)

    def scores_grid(self) -> tf.Tensor:
        """f_q + f_k, the grid of the Q K^T accumulator."""
        q_site, k_site, _ = self.sites
        return graph_constant((self, "f"), lambda: site_f(q_site) + site_f(k_site))

    def float64_route_fits(self) -> tf.Tensor:
        """Whether kernels_tf.softmax's float64 route takes these scores (True where it never does:
        nothing to decide)."""
        p_site = self.sites[2]
        if not kernels_tf.softmax_fits_float64(p_site.num_bits, kernels.EXP_F, self.d_k,
                                               self.recorder.config.normalization):
            return tf.constant(True)
        return graph_constant((self, "float64_route_fits"),
                              lambda: kernels_tf.softmax_grid_fits_float64(self.scores_grid(), self.d_k))

    def __call__(self, logits: tf.Tensor, bias: tf.Tensor, training: bool = False) -> tf.Tensor:
        q_site, k_site, p_site = self.sites
        if _observing(q_site, k_site):
            return self.float_softmax(logits, bias)
        f = self.scores_grid()
        visible = kernels_tf.in_home_graph(lambda bias: bias > token_ids.NEG_INF / 2, bias)
        scores = to_int(logits, f, tf.float64)  # kernels_tf.softmax's float64 route
        probs = kernels_tf.softmax(scores, f, visible, p_site.num_bits, p_site.rounding, m=self.d_k,
                                  normalization=self.recorder.config.normalization,
                                  grid_fits_float64=self.recorder.float64_routes)
        self.recorder.record(p_site.site_name, probs)
        if not training:
            return from_int(probs, site_f(p_site))
        return exact_forward(self.float_softmax(logits, bias), probs, site_f(p_site))


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


class IntegerOnlySites(quant.TQTSites):
    """TQT sites at every matmul input (quant.TQTSites) and the integer-only layers between them.

    `recorded`: None, or a dict that (eagerly) collects every integer-only layer's output by site
    name, as int64 arrays (TF vs the NumPy engine, site by site)."""

    # the layers it made: neither checkpointed nor walked (tf.Module._flatten) here
    _TF_MODULE_IGNORED_PROPERTIES = quant.TQTSites._TF_MODULE_IGNORED_PROPERTIES | {"routed_layers"}

    def __init__(self, config: quant.QuantConfig):
        super().__init__(config)
        self.recorded: dict[str, list[np.ndarray]] | None = None
        # the route of the layers' float64-or-int64 choices while a graph is traced: None, a tf.cond
        # at each call (training); True or False inside decoding()
        self.float64_routes: bool | None = None
        set_untracked(self, "routed_layers", [])  # the layers with such a choice

    def site(self, name: str, role: str, channels: int | None = None, bits: int | None = None,
             rows: int | None = None):
        if role != "probability":
            return super().site(name, role, channels, bits, rows)
        if name in self.sites:
            raise ValueError(f"quant site {name!r} created twice")
        self.sites[name] = FixedSite(name, role, self.config.bits_for(name, role), self.config.rounding)
        return self.sites[name]

    def record(self, name: str, q: tf.Tensor) -> None:
        if self.recorded is not None and tf.executing_eagerly():
            self.recorded.setdefault(name, []).append(q.numpy().astype(np.int64))  # float64 integers too

    def embedding_sum(self, d_model: int) -> IntEmbeddingSum:
        return IntEmbeddingSum(d_model, self)

    def layer_norm(self, name: str, d: int, skip: Site, branch: Dense) -> IntLayerNorm:
        self.routed_layers.append(IntLayerNorm(name, d, self, skip, branch))
        return self.routed_layers[-1]

    def softmax(self, d_k: int, q_site: Site, k_site: Site, p_site: Site) -> IntSoftmax:
        self.routed_layers.append(IntSoftmax(d_k, q_site, k_site, p_site, self))
        return self.routed_layers[-1]

    def decoding(self, decode: Callable[[], tf.Tensor]) -> tf.Tensor:
        """decode() with every layer on one route: one tf.cond on all their float64 conditions picks
        a graph whose layers take the float64 routes, or one whose layers take the int64 routes,
        instead of a tf.cond at each layer call, which in a decoding loop runs per token (with a
        switch per tensor it captures)."""
        def on_route(float64: bool) -> Callable[[], tf.Tensor]:
            def traced():
                self.float64_routes = float64
                try:
                    return decode()
                finally:
                    self.float64_routes = None
            return traced

        fits = tf.reduce_all(tf.stack([layer.float64_route_fits() for layer in self.routed_layers]))
        return tf.cond(fits, on_route(True), on_route(False))
