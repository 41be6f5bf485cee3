"""Transformer building blocks: dense layers, attention, feed-forward, norms, positions, schedule.

Every matrix multiplication takes its inputs through a *matmul-input hook* ("site").  The model
asks a site factory for one hook per input when it is built:

    sites.site(name, role, channels=None, rows=None) -> callable x -> x'
    sites.bias(b, x_site, w_site)        -> the bias as the accumulator will see it

`FloatSites` (below) returns the identity, so the float model pays nothing: the hook is a
Python call that adds no op to the graph.  `quant.TQTSites` returns TQT fake-quantizers.
Roles: fixed_point.SIGNED_BY_ROLE; site names: integer/site_names.py's builders
(`site_names.dense(name)` ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import tensorflow as tf

from integer import site_names
from integer.token_ids import NEG_INF, PAD


class Site(Protocol):
    def __call__(self, x: tf.Tensor) -> tf.Tensor: ...


class SiteFactory(Protocol):
    def site(self, name: str, role: str, channels: int | None = None, rows: int | None = None) -> Site: ...

    def bias(self, b: tf.Tensor, x_site: Site, w_site: Site) -> tf.Tensor: ...

    # the layers between matmuls: float (FloatLayers) or integer-only (intonly_layers.IntegerOnlySites)
    def embedding_sum(self, d_model: int): ...

    def layer_norm(self, name: str, d: int, skip: Site | None, branch: Dense): ...

    def softmax(self, d_k: int, q_site: Site, k_site: Site, p_site: Site): ...

    def matmul(self, a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor: ...

    def relu(self, x: tf.Tensor, into: Site) -> tf.Tensor: ...

    def decoding(self, decode: Callable[[], tf.Tensor]) -> tf.Tensor: ...


class FloatLayers:
    """The float layers between the matmuls (the float model and matmul-only quantization): `skip`
    (the site whose grid the residual input is on) and `branch` (the Dense whose output is added)
    matter to the integer-only LayerNorm only. LayerNorm and softmax compute in float64
    (in_float64) unless `float64_layers` is off (mixed precision: no integer engine to match)."""

    float64_layers = True

    def embedding_sum(self, d_model: int) -> EmbeddingSum:
        return EmbeddingSum(d_model)

    def layer_norm(self, name: str, d: int, skip: Site | None, branch: Dense) -> LayerNorm:
        return LayerNorm(name, d, float64=self.float64_layers)

    def softmax(self, d_k: int, q_site: Site, k_site: Site, p_site: Site) -> Softmax:
        return Softmax(d_k, float64=self.float64_layers)

    def matmul(self, a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
        """a @ b (b^T): one 2-D GEMM for a 2-D b (matmul_2d), else a batched matmul."""
        if b.shape.rank == 2:
            return matmul_2d(a, b, transpose_w=transpose_b)
        return tf.matmul(a, b, transpose_b=transpose_b)

    def relu(self, x: tf.Tensor, into: Site) -> tf.Tensor:
        """max(0, x): the FFN's activation, the input of the site `into`."""
        return tf.nn.relu(x)

    def decoding(self, decode: Callable[[], tf.Tensor]) -> tf.Tensor:
        """decode(), a whole decoding graph (model.beam_search_impl): the float layers have one route."""
        return decode()


class Identity:
    """The float model's matmul-input hook: returns its input unchanged (no graph op)."""

    def __init__(self, name: str, role: str):
        self.site_name = name
        self.role = role

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return x


class FloatSites(FloatLayers):
    """Site factory of the float model: identity hooks, float bias, float layers."""

    def __init__(self) -> None:
        self.sites: dict[str, Identity] = {}

    def site(self, name: str, role: str, channels: int | None = None, rows: int | None = None) -> Identity:
        if name in self.sites:
            raise ValueError(f"duplicate matmul-input site name {name!r}")
        self.sites[name] = Identity(name, role)
        return self.sites[name]

    def bias(self, b: tf.Tensor, x_site: Site, w_site: Site) -> tf.Tensor:
        return b


class MixedPrecisionSites(FloatSites):
    """The float model with its matmuls in bfloat16 or float16 (--mixed_precision): both operands
    cast to `compute_dtype`, the product cast back to float32; variables, LayerNorm, softmax (in
    float32) and the loss stay float32."""

    float64_layers = False

    def __init__(self, compute_dtype: tf.DType):
        super().__init__()
        self.compute_dtype = compute_dtype

    def matmul(self, a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
        a, b = tf.cast(a, self.compute_dtype), tf.cast(b, self.compute_dtype)
        return tf.cast(super().matmul(a, b, transpose_b), tf.float32)


def glorot(shape: tuple[int, int], seed: int | None = None) -> tf.Tensor:
    """Glorot-uniform initial values: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return tf.random.uniform(shape, -limit, limit, seed=seed)


def matmul_2d(x: tf.Tensor, w: tf.Tensor, transpose_w: bool = False) -> tf.Tensor:
    """x[..., k] @ w[k, n] (or w[n, k]^T) as one 2-D GEMM over all leading positions.

    Not tf.matmul on the 3-D x: that is a BatchMatMul broadcasting w, whose gradient for w is a
    batch of per-sentence products summed afterwards, several times slower (docs/results.md).
    """
    n = tf.shape(w)[0] if transpose_w else tf.shape(w)[1]
    y = tf.matmul(tf.reshape(x, [-1, tf.shape(x)[-1]]), w, transpose_b=transpose_w)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [n]], axis=0))


class Dense(tf.Module):
    """y = Q_x(x) @ Q_w(W) + Q_b(b), with Q_* the matmul-input hooks of `sites`."""

    def __init__(self, name: str, d_in: int, d_out: int, sites: SiteFactory,
                 input_role: str = "activation", use_bias: bool = True):
        super().__init__(name=name.rsplit("/", 1)[-1])
        self.names = site_names.dense(name)
        self.w = tf.Variable(glorot((d_in, d_out)), name="w")
        self.b = tf.Variable(tf.zeros([d_out]), name="b") if use_bias else None
        self.x_site = sites.site(self.names.input, input_role)
        self.w_site = sites.site(self.names.weight, "weight", channels=d_out)
        self._bias = sites.bias
        self._matmul = sites.matmul

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = self._matmul(self.x_site(x), self.w_site(self.w))
        if self.b is not None:
            y = y + self._bias(self.b, self.x_site, self.w_site)
        return y


def in_float64(fn, x: tf.Tensor) -> tf.Tensor:
    """fn computed in float64 and rounded once to x's dtype.

    The float parts between integer matmuls (LayerNorm, softmax, positions) feed quantizers. The
    integer engine (NumPy) reduces in another order than TF's kernels; in float32 the two can
    differ by one ULP, enough to move a value across a rounding boundary of the next quantizer.
    In float64 both round to the same float32 (unless within ~2^-29 of a float32 boundary).
    """
    return tf.cast(fn(tf.cast(x, tf.float64)), x.dtype)


class LayerNorm(tf.Module):
    """LN(x) = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis (float, computed in
    float64 and rounded to float32: see in_float64)."""

    gamma_site: Site | None = None  # the integer-only LayerNorm's sites (intonly_layers.IntLayerNorm)
    output_site: Site | None = None

    def __init__(self, name: str, d: int, eps: float = 1e-6, float64: bool = True):
        super().__init__(name=name.rsplit("/", 1)[-1])
        self.path = name  # the full name, `encoder/block_1/ln1` (site_names.block_names)
        self.gamma = tf.Variable(tf.ones([d]), name="gamma")
        self.beta = tf.Variable(tf.zeros([d]), name="beta")
        self.eps = eps
        self.float64 = float64

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        def norm(x):
            mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
            gamma, beta = tf.cast(self.gamma, x.dtype), tf.cast(self.beta, x.dtype)
            return gamma * (x - mean) * tf.math.rsqrt(var + self.eps) + beta

        return in_float64(norm, x) if self.float64 else norm(x)

    def add_norm(self, x: tf.Tensor, a: tf.Tensor, training: bool = False) -> tf.Tensor:
        """LN(x + a): the residual add and the norm after it. `training` matters to the integer-only
        layers only (they build their gradient surrogates then)."""
        return self(x + a)


class EmbeddingSum:
    """x_0 = Q(E)[ids] * sqrt(d) + PE (float); `site` is the integer-only model's grid of x_0."""

    site: Site | None = None

    def __init__(self, d_model: int):
        self.d_model = d_model

    def __call__(self, rows: tf.Tensor, pe: tf.Tensor, training: bool = False) -> tf.Tensor:
        return rows * math.sqrt(self.d_model) + pe


class Softmax:
    """softmax(logits / sqrt(d_k) + bias) over the last axis (float64, rounded: in_float64; or
    in the logits' dtype without `float64`)."""

    def __init__(self, d_k: int, float64: bool = True):
        self.d_k, self.float64 = d_k, float64

    def __call__(self, logits: tf.Tensor, bias: tf.Tensor, training: bool = False) -> tf.Tensor:
        scaled = logits * (1.0 / math.sqrt(self.d_k)) + bias
        return in_float64(tf.nn.softmax, scaled) if self.float64 else tf.nn.softmax(scaled)


def positional_encoding(length: tf.Tensor | int, d_model: int) -> tf.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...), for any length.

    Computed for whatever length arrives, so a test sentence longer than maxlen is fine.
    """
    pos = tf.cast(tf.range(length), tf.float64)[:, None]
    i = tf.range(d_model // 2, dtype=tf.float64)[None, :]
    angle = pos / tf.pow(tf.constant(10000.0, tf.float64), 2.0 * i / d_model)
    # interleave sin (even columns) and cos (odd columns); float64, rounded once (in_float64)
    pe = tf.reshape(tf.stack([tf.sin(angle), tf.cos(angle)], axis=-1), [-1, d_model])
    return tf.cast(pe, tf.float32)


def padding_bias(ids: tf.Tensor) -> tf.Tensor:
    """Additive attention bias [B, 1, 1, L]: NEG_INF at padding (PAD) keys, 0 elsewhere."""
    return tf.cast(tf.equal(ids, PAD), tf.float32)[:, None, None, :] * NEG_INF


def causal_bias(length: tf.Tensor | int) -> tf.Tensor:
    """Additive bias [1, 1, L, L]: query i may attend to keys j <= i only."""
    future = 1.0 - tf.linalg.band_part(tf.ones([length, length]), -1, 0)
    return future[None, None] * NEG_INF


class MultiHeadAttention(tf.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O,
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + bias) V_i, with Q = x W^Q, K = m W^K, V = m W^V.

    Sites: the four dense layers' inputs and weights, Q and K before QK^T, the softmax
    probabilities (unsigned) and V before PV.
    """

    def __init__(self, name: str, d_model: int, num_heads: int, sites: SiteFactory):
        super().__init__(name=name.rsplit("/", 1)[-1])
        self.h, self.d_k = num_heads, d_model // num_heads
        names = site_names.attention(name)
        self.wq = Dense(names.wq, d_model, d_model, sites)
        self.wk = Dense(names.wk, d_model, d_model, sites)
        self.wv = Dense(names.wv, d_model, d_model, sites)
        self.wo = Dense(names.wo, d_model, d_model, sites)
        self.q_site = sites.site(names.query, "activation")
        self.k_site = sites.site(names.key, "activation")
        self.p_site = sites.site(names.probs, "probability")
        self.v_site = sites.site(names.value, "activation")
        self.softmax = sites.softmax(self.d_k, self.q_site, self.k_site, self.p_site)
        self._matmul = sites.matmul

    def split_heads(self, x: tf.Tensor) -> tf.Tensor:
        """[B, L, d_model] -> [B, h, L, d_k]."""
        b, length = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, [b, length, self.h, self.d_k]), [0, 2, 1, 3])

    def project_kv(self, memory: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """K = m W^K, V = m W^V split into heads (cacheable: cross-attention computes it once)."""
        return self.split_heads(self.wk(memory)), self.split_heads(self.wv(memory))

    def attend(self, x: tf.Tensor, k: tf.Tensor, v: tf.Tensor, bias: tf.Tensor,
               training: bool = False) -> tf.Tensor:
        """Attention of queries from x over already-projected heads k, v."""
        q = self.split_heads(self.wq(x))
        logits = self._matmul(self.q_site(q), self.k_site(k), transpose_b=True)
        probs = self.softmax(logits, bias, training)
        heads = self._matmul(self.p_site(probs), self.v_site(v))  # [B, h, Lq, d_k]
        b, lq = tf.shape(heads)[0], tf.shape(heads)[2]
        concat = tf.reshape(tf.transpose(heads, [0, 2, 1, 3]), [b, lq, self.h * self.d_k])
        return self.wo(concat)

    def __call__(self, x: tf.Tensor, memory: tf.Tensor, bias: tf.Tensor, training: bool = False) -> tf.Tensor:
        k, v = self.project_kv(memory)
        return self.attend(x, k, v, bias, training)


class FeedForward(tf.Module):
    """FFN(x) = Q(max(0, x W_1 + b_1)) W_2 + b_2; the ReLU output site is unsigned."""

    def __init__(self, name: str, d_model: int, d_ff: int, sites: SiteFactory):
        super().__init__(name=name.rsplit("/", 1)[-1])
        names = site_names.feed_forward(name)
        self.dense1 = Dense(names.dense1, d_model, d_ff, sites)
        self.dense2 = Dense(names.dense2, d_ff, d_model, sites, input_role="unsigned")
        self._relu = sites.relu

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return self.dense2(self._relu(self.dense1(x), self.dense2.x_site))


def label_smoothed_xent(logits: tf.Tensor, labels: tf.Tensor, smoothing: float) -> tf.Tensor:
    """Cross-entropy against (1 - eps) * onehot(y) + eps / V, per position; 0 at padding."""
    vocab = tf.shape(logits)[-1]
    target = tf.one_hot(labels, vocab) * (1.0 - smoothing) + smoothing / tf.cast(vocab, tf.float32)
    xent = tf.nn.softmax_cross_entropy_with_logits(target, logits)
    return xent * tf.cast(tf.not_equal(labels, PAD), xent.dtype)


def noam_lr(step: tf.Tensor, peak_lr: float, warmup_steps: int) -> tf.Tensor:
    """lr(step) = peak_lr * warmup^0.5 * min(step * warmup^-1.5, step^-0.5); peaks at warmup."""
    step = tf.maximum(tf.cast(step, tf.float32), 1.0)
    w = float(warmup_steps)
    return peak_lr * w**0.5 * tf.minimum(step * w**-1.5, tf.math.rsqrt(step))


def set_untracked(obj: tf.Module, name: str, value) -> None:
    """Keep a reference without making it a checkpoint dependency, so that each variable is
    saved under its one path in the model (a checkpoint names a variable by its shortest path)."""
    object.__setattr__(obj, name, value)


class Adam(tf.Module):
    """Adam (Kingma & Ba) with bias correction, written out so its state is checkpointed.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, variables: list[tf.Variable], name: str, beta1: float = 0.9,
                 beta2: float = 0.98, eps: float = 1e-9, fused: bool = False):
        super().__init__(name=name)
        set_untracked(self, "params", list(variables))
        # the strategy whose scope built it: under MirroredStrategy each device updates its own
        # copy of a variable (strategy.extended.update), with no round trip through the host
        set_untracked(self, "strategy", tf.distribute.get_strategy())
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name="m") for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name="v") for v in variables]
        self.t = tf.Variable(0, dtype=tf.int64, trainable=False, name="t")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.fused = fused  # one ResourceApplyAdam kernel per variable (the same equations)

    def apply(self, grads: list[tf.Tensor], lr: tf.Tensor) -> None:
        self.t.assign_add(1)
        t = tf.cast(self.t, tf.float32)
        b1, b2 = self.beta1, self.beta2
        step = lr * tf.sqrt(1.0 - b2**t) / (1.0 - b1**t)  # bias correction folded into the step
        powers = (b1**t, b2**t, lr) if self.fused else ()  # the fused kernel's inputs
        for var, g, m, v in zip(self.params, grads, self.m, self.v):
            self.strategy.extended.update(var, self._update, args=(g, m, v, step, powers))

    def _update(self, var: tf.Variable, g: tf.Tensor, m: tf.Variable, v: tf.Variable,
                step: tf.Tensor, powers: tuple) -> None:
        """One variable's update, on one device (the local copies of var, g, m and v)."""
        b1, b2 = self.beta1, self.beta2
        if self.fused:
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=powers[0],
                                         beta2_power=powers[1], lr=powers[2], beta1=b1, beta2=b2,
                                         epsilon=self.eps, grad=g)
            return
        m.assign(b1 * m + (1.0 - b1) * g)
        v.assign(b2 * v + (1.0 - b2) * tf.square(g))
        var.assign_sub(step * m / (tf.sqrt(v) + self.eps))
