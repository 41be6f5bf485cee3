"""The Transformer ("Attention Is All You Need", post-LN) with a hook at every matmul input.

    encode:  x_0 = E[src] * sqrt(d) + PE;  x_l = LN(x + FFN(LN(x + SelfAttn(x))))
    decode:  y_l = LN(y + FFN(LN(y + CrossAttn(LN(y + MaskedSelfAttn(y)), memory))))
    logits = Q(y_L) Q(E)^T            (one table E for both embeddings and the output)

Decoding: batched greedy with a key/value cache, the same without it (for tests), and batched
beam search with a GNMT length penalty.  Outputs end at EOS and are padded with PAD after it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import tensorflow as tf

from integer import site_names
from integer.token_ids import BOS, EOS, PAD
from modules import (
    NEG_INF,
    Dense,
    FeedForward,
    FloatSites,
    LayerNorm,
    MultiHeadAttention,
    Site,
    SiteFactory,
    causal_bias,
    label_smoothed_xent,
    padding_bias,
    positional_encoding,
    set_untracked,
)

# Grappler's arithmetic optimizer and constant folding rewrite float32 expressions (reordered
# products in LayerNorm, folded positional-encoding constants), so a tf.function graph would no
# longer compute bit for bit what the eager model and the integer engine compute: one ULP can move
# a value across a rounding boundary of the next quantizer.
tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False,
                                              "constant_folding": False})


class Dropout:
    """Inverted dropout drawing its masks from the model's checkpointed random generator, so a
    resumed run continues the same random stream as an uninterrupted one."""

    def __init__(self, rate: float, rng: tf.random.Generator):
        self.rate, self.rng = rate, rng

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        if not training or self.rate == 0:
            return x
        keep = tf.cast(self.rng.uniform(tf.shape(x)) >= self.rate, x.dtype)
        return x * keep * (1.0 / (1.0 - self.rate))


class Block(tf.Module):
    """The sublayers of one encoder or decoder block, named by site_names.block_names: attention(s),
    FFN, LayerNorms `ln1`, `ln2` (, `ln3`), created in that order. Each LayerNorm normalizes
    x + branch(x), x on the grid of `skip` (the block's input site, then the previous norm's
    output; integer-only), branch W^O or dense2; `output_site` is the last norm's."""

    def __init__(self, side: str, index: int, hp: Any, sites: SiteFactory, drop: Dropout,
                 input_site: Site | None):
        names = site_names.block_names(side, index)
        super().__init__(name=site_names.block(side, index).rsplit("/", 1)[-1])
        self.self_attention = MultiHeadAttention(names.self_attention, hp.d_model, hp.num_heads, sites)
        if names.cross_attention:
            self.cross_attention = MultiHeadAttention(names.cross_attention, hp.d_model, hp.num_heads, sites)
        self.ffn = FeedForward(names.ffn, hp.d_model, hp.d_ff, sites)
        attentions = [self.self_attention] + ([self.cross_attention] if names.cross_attention else [])
        skip = input_site
        for name, branch in zip(names.norms, [a.wo for a in attentions] + [self.ffn.dense2]):
            norm = sites.layer_norm(name, hp.d_model, skip, branch)
            setattr(self, name.rsplit("/", 1)[-1], norm)
            skip = norm.output_site
        self.output_site = skip
        self.dropout = drop


class EncoderBlock(Block):
    def __init__(self, index: int, hp: Any, sites: SiteFactory, drop: Dropout, input_site: Site | None):
        super().__init__("encoder", index, hp, sites, drop, input_site)

    def __call__(self, x: tf.Tensor, bias: tf.Tensor, training: bool) -> tf.Tensor:
        x = self.ln1.add_norm(x, self.dropout(self.self_attention(x, x, bias, training), training), training)
        return self.ln2.add_norm(x, self.dropout(self.ffn(x), training), training)


class DecoderBlock(Block):
    def __init__(self, index: int, hp: Any, sites: SiteFactory, drop: Dropout, input_site: Site | None):
        super().__init__("decoder", index, hp, sites, drop, input_site)

    def __call__(self, y: tf.Tensor, self_kv: tuple[tf.Tensor, tf.Tensor], self_bias: tf.Tensor,
                 cross_kv: tuple[tf.Tensor, tf.Tensor], src_bias: tf.Tensor, training: bool) -> tf.Tensor:
        """One block, given the projected self-attention keys/values (whole prefix or cache)."""
        a = self.self_attention.attend(y, *self_kv, self_bias, training)
        y = self.ln1.add_norm(y, self.dropout(a, training), training)
        a = self.cross_attention.attend(y, *cross_kv, src_bias, training)
        y = self.ln2.add_norm(y, self.dropout(a, training), training)
        return self.ln3.add_norm(y, self.dropout(self.ffn(y), training), training)


class Transformer(tf.Module):
    """Encoder-decoder Transformer; `sites` decides what happens at every matmul input."""

    def __init__(self, hp: Any, vocab_size: int, sites: SiteFactory | None = None):
        super().__init__(name="transformer")
        if hp.d_model % hp.num_heads:
            raise ValueError(f"--d_model {hp.d_model} is not divisible by --num_heads {hp.num_heads}")
        sites = sites or FloatSites()
        self.sites = sites
        self.d_model, self.vocab_size = hp.d_model, vocab_size
        self.num_heads, self.d_k = hp.num_heads, hp.d_model // hp.num_heads
        self.smoothing, self.margin = hp.smoothing, hp.decode_margin
        self.rng = tf.random.Generator.from_seed(getattr(hp, "seed", 1234))
        self.dropout = Dropout(hp.dropout_rate, self.rng)
        self.embedding = tf.Variable(
            tf.random.normal([vocab_size, hp.d_model], stddev=hp.d_model**-0.5), name="embedding")
        self.embedding_site = sites.site(site_names.EMBEDDING, "weight", rows=vocab_size)
        self.embedding_sum = sites.embedding_sum(hp.d_model)
        self.encoder, self.decoder = [], []
        for blocks, block_class in ((self.encoder, EncoderBlock), (self.decoder, DecoderBlock)):
            skip = self.embedding_sum.site
            for i in range(hp.num_blocks):
                blocks.append(block_class(i, hp, sites, self.dropout, skip))
                skip = blocks[-1].output_site
        self.output_site = sites.site(site_names.OUTPUT_INPUT, "activation")
        set_untracked(self, "beam_fns", {})  # compiled beam searches, not checkpoint content

    def weight_sites(self) -> list[tuple[Site, tf.Variable]]:
        """(site, weight) for every quantized weight: each dense W, the embedding table and (integer-
        only) each LayerNorm's gamma."""
        pairs = [(self.embedding_site, self.embedding)]
        pairs += [(m.w_site, m.w) for m in self.submodules if isinstance(m, Dense)]
        pairs += [(m.gamma_site, m.gamma) for m in self.submodules
                  if isinstance(m, LayerNorm) and m.gamma_site is not None]
        return pairs

    # ----------------------------------------------------------------------------- forward
    def embed(self, ids: tf.Tensor, table: tf.Tensor, offset: tf.Tensor | int = 0,
              training: bool = False) -> tf.Tensor:
        """x = Q(E)[ids] * sqrt(d) + PE[offset : offset + L] (modules.EmbeddingSum)."""
        length = tf.shape(ids)[1]
        pe = positional_encoding(offset + length, self.d_model)[offset:]
        return self.embedding_sum(tf.gather(table, ids), pe, training)

    def logits(self, y: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
        """logits = Q(y) Q(E)^T."""
        return self.sites.matmul(self.output_site(y), table, transpose_b=True)

    def table(self) -> tf.Tensor:
        """The (quantized) shared embedding table Q(E), computed once per forward pass."""
        return self.embedding_site(self.embedding)

    def encode(self, src: tf.Tensor, training: bool = False,
               table: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns the memory [B, Ls, d] and the source padding bias [B, 1, 1, Ls]."""
        bias = padding_bias(src)
        table = self.table() if table is None else table
        x = self.dropout(self.embed(src, table, training=training), training)
        for block in self.encoder:
            x = block(x, bias, training)
        return x, bias

    def decode(self, tgt_in: tf.Tensor, memory: tf.Tensor, src_bias: tf.Tensor,
               training: bool = False, table: tf.Tensor | None = None) -> tf.Tensor:
        """Teacher-forced decoder over a whole target prefix: logits [B, Lt, V]."""
        table = self.table() if table is None else table
        y = self.dropout(self.embed(tgt_in, table, training=training), training)
        # [B, 1, L, L]: future and padding keys.  Not the broadcast [1, 1, L, L]: oneDNN's fused
        # BatchMatMul+Mul+Add takes a much slower path when the added tensor broadcasts over the
        # batch (docs/results.md).  Real queries never see padding keys anyway.
        self_bias = causal_bias(tf.shape(tgt_in)[1]) + padding_bias(tgt_in)
        for block in self.decoder:
            self_kv = block.self_attention.project_kv(y)
            cross_kv = block.cross_attention.project_kv(memory)
            y = block(y, self_kv, self_bias, cross_kv, src_bias, training)
        return self.logits(y, table)

    def __call__(self, src: tf.Tensor, tgt_in: tf.Tensor, training: bool = False) -> tf.Tensor:
        table = self.table()
        memory, src_bias = self.encode(src, training, table)
        return self.decode(tgt_in, memory, src_bias, training, table)

    def loss(self, src: tf.Tensor, tgt: tf.Tensor, training: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """(sum of label-smoothed cross-entropy over target tokens, number of target tokens).

        `tgt` is BOS + pieces + EOS; the decoder reads tgt[:, :-1] and predicts tgt[:, 1:].
        """
        labels = tgt[:, 1:]
        xent = label_smoothed_xent(self(src, tgt[:, :-1], training), labels, self.smoothing)
        return tf.reduce_sum(xent), tf.reduce_sum(tf.cast(tf.not_equal(labels, PAD), tf.float32))

    # ----------------------------------------------------------------------------- decoding
    def _start(self, src: tf.Tensor, beam: int, table: tf.Tensor):
        """Encoder pass and per-row decoding state, each source row repeated `beam` times."""
        memory, src_bias = self.encode(src, table=table)
        memory = tf.repeat(memory, beam, axis=0)
        src_bias = tf.repeat(src_bias, beam, axis=0)
        # maximum output length = source length + margin, per sentence
        limit = tf.reduce_sum(tf.cast(tf.not_equal(src, PAD), tf.int32), axis=1) + self.margin
        limit = tf.repeat(limit, beam, axis=0)
        cross_kv = [block.cross_attention.project_kv(memory) for block in self.decoder]
        return memory, src_bias, limit, cross_kv

    def _empty_cache(self, rows: tf.Tensor, length: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor]]:
        zeros = tf.zeros([rows, self.num_heads, length, self.d_k])
        return [(zeros, zeros) for _ in self.decoder]

    def _step(self, token: tf.Tensor, t: tf.Tensor, cache: list, cross_kv: list, src_bias: tf.Tensor,
              table: tf.Tensor) -> tuple[tf.Tensor, list]:
        """One cached decoder step: the token at position t -> logits [N, V] and the new cache.

        The cache holds every block's projected self-attention keys and values for positions
        0..T-1 (zeros ahead of t); the new ones are written at t and later keys are masked.
        """
        length = tf.shape(cache[0][0])[2]
        at_t = tf.one_hot(t, length)[None, None, :, None]
        visible = tf.cast(tf.range(length) <= t, tf.float32)
        self_bias = ((1.0 - visible) * NEG_INF)[None, None, None, :]
        y = self.embed(token[:, None], table, offset=t)
        new_cache = []
        for block, (k, v), kv in zip(self.decoder, cache, cross_kv):
            k_t, v_t = block.self_attention.project_kv(y)
            k, v = k + at_t * k_t, v + at_t * v_t
            new_cache.append((k, v))
            y = block(y, (k, v), self_bias, kv, src_bias, training=False)
        return self.logits(y, table)[:, 0], new_cache

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def greedy(self, src: tf.Tensor) -> tf.Tensor:
        """Batched greedy decoding with a key/value cache: token ids [B, T]."""
        return self.beam_search_impl(src, beam=1, alpha=0.0)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def greedy_uncached(self, src: tf.Tensor) -> tf.Tensor:
        """Greedy decoding that re-runs the decoder over the whole prefix at every step."""
        table = self.table()
        memory, src_bias, limit, _ = self._start(src, 1, table)
        rows, length = tf.shape(src)[0], tf.reduce_max(limit)
        tokens = tf.fill([rows, length + 1], BOS)  # column 0 is BOS; column t+1 the t-th output
        finished = tf.zeros([rows], tf.bool)

        def body(t, tokens, finished):
            logits = self.decode(tokens[:, : t + 1], memory, src_bias, table=table)[:, -1]
            out = tf.where(finished, PAD, tf.argmax(logits, -1, output_type=tf.int32))
            tokens = tf.concat([tokens[:, : t + 1], out[:, None], tokens[:, t + 2:]], axis=1)
            finished = finished | tf.equal(out, EOS) | (t + 1 >= limit)
            return t + 1, tokens, finished

        def cond(t, tokens, finished):
            return (t < length) & ~tf.reduce_all(finished)

        t, tokens, _ = tf.while_loop(cond, body, [0, tokens, finished])
        return tf.where(tf.range(length)[None] < t, tokens[:, 1:], PAD)

    def beam_search(self, src: tf.Tensor, beam: int, alpha: float = 0.6) -> tf.Tensor:
        """Batched beam search; the best hypothesis per sentence [B, T] (one graph per beam, alpha)."""
        key = (int(beam), float(alpha))
        if key not in self.beam_fns:
            self.beam_fns[key] = tf.function(
                functools.partial(self.beam_search_impl, beam=key[0], alpha=key[1]),
                input_signature=[tf.TensorSpec([None, None], tf.int32)])
        return self.beam_fns[key](src)

    def beam_search_impl(self, src: tf.Tensor, beam: int, alpha: float) -> tf.Tensor:
        """Beam search over `beam` hypotheses per sentence with a key/value cache.

        Hypotheses are ranked by their summed log-probability while decoding; a finished one
        keeps its score (it may only continue with PAD at cost 0).  The winner is chosen by
        score / lp(len), lp = ((5 + len) / 6)^alpha (GNMT).  beam=1 is exactly greedy decoding.
        The layers pick their route once for the whole decoding (sites.decoding).
        """
        return self.sites.decoding(lambda: self._beam_search(src, beam, alpha))

    def _beam_search(self, src: tf.Tensor, beam: int, alpha: float) -> tf.Tensor:
        table = self.table()
        _, src_bias, limit, cross_kv = self._start(src, beam, table)
        batch = tf.shape(src)[0]
        rows, length = batch * beam, tf.reduce_max(limit)
        vocab = self.vocab_size
        # only beam 0 is live at the start, so the K copies do not all pick the same tokens
        # scores in float64, so that both engines rank hypotheses alike (see in_float64)
        scores = tf.tile(tf.concat([[0.0], tf.fill([beam - 1], -1e30)], 0)[None], [batch, 1])
        scores = tf.cast(scores, tf.float64)
        pad_only = tf.constant([0.0] + [-1e30] * (vocab - 1), tf.float64)  # PAD is id 0
        state = dict(
            t=tf.constant(0), token=tf.fill([rows], BOS), scores=scores,
            finished=tf.zeros([rows], tf.bool), lengths=tf.zeros([rows], tf.int32),
            seqs=tf.zeros([rows, length], tf.int32), cache=self._empty_cache(rows, length))

        def body(s):
            logits, cache = self._step(s["token"], s["t"], s["cache"], cross_kv, src_bias, table)
            logp = tf.nn.log_softmax(tf.cast(logits, tf.float64))
            logp = tf.where(s["finished"][:, None], pad_only[None], logp)
            total = tf.reshape(s["scores"], [rows, 1]) + logp
            top, index = tf.math.top_k(tf.reshape(total, [batch, beam * vocab]), k=beam)
            parent = tf.reshape(index // vocab + tf.range(batch)[:, None] * beam, [rows])
            token = tf.reshape(index % vocab, [rows])
            finished = tf.gather(s["finished"], parent)
            seqs = tf.gather(s["seqs"], parent) + token[:, None] * tf.one_hot(
                s["t"], length, dtype=tf.int32)[None]
            return [dict(
                t=s["t"] + 1, token=token, scores=top,
                finished=finished | tf.equal(token, EOS) | (s["t"] + 1 >= limit),
                lengths=tf.gather(s["lengths"], parent) + tf.cast(~finished, tf.int32),
                seqs=seqs,
                cache=[(tf.gather(k, parent), tf.gather(v, parent)) for k, v in cache])]

        def cond(s):
            return (s["t"] < length) & ~tf.reduce_all(s["finished"])

        (state,) = tf.while_loop(cond, body, [state])
        penalty = tf.pow((5.0 + tf.cast(state["lengths"], tf.float64)) / 6.0, alpha)
        best = tf.argmax(state["scores"] / tf.reshape(penalty, [batch, beam]), axis=1, output_type=tf.int32)
        seqs = tf.reshape(state["seqs"], [batch, beam, length])
        return tf.gather(seqs, best, batch_dims=1)


def weights_by_path(model: Transformer) -> dict[str, tf.Variable]:
    """Every weight (not threshold) variable keyed as in a tf.train.Checkpoint(model=...) file."""
    flat = model._flatten(predicate=lambda v: isinstance(v, tf.Variable), with_path=True)
    keys = {"model/" + "/".join(map(str, path)) + "/.ATTRIBUTES/VARIABLE_VALUE": v for path, v in flat}
    return {k: v for k, v in keys.items() if "log2_t" not in k}


THRESHOLD_KEY_SUFFIX = "/log2_t/.ATTRIBUTES/VARIABLE_VALUE"


def object_at(model: Transformer, key: str):
    """The object a tf.train.Checkpoint(model=...) key's path leads to from `model`
    ("model/sites/sites/encoder.Sblock_1.Sq" -> model.sites.sites["encoder/block_1/q"]; TF writes
    '/' in a name as '.S' and '.' as '..'), or None where this model has no such object."""
    obj = model
    for part in key.split("/")[1:]:
        name = re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S" else m.group(1), part)
        try:
            obj = obj[int(name)] if isinstance(obj, (list, tuple)) else (
                obj[name] if hasattr(obj, "keys") else getattr(obj, name))
        except (AttributeError, KeyError, IndexError, ValueError):
            return None
    return obj


def load_weights(model: Transformer, path: str) -> list[str]:
    """Restore `model` from checkpoint `path`, quantized or not.

    Every weight must be there with its shape (ValueError otherwise). Thresholds (log2_t) are
    restored where the checkpoint has them with their shape; returns the names of the sites whose
    thresholds it lacks (all of them for a float checkpoint, the new ones for a matmul-only parent
    of an integer-only model) or holds in another shape (per tensor there, per channel or per row
    here): those still need calibration.
    """
    try:
        shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint {path} ({str(e).splitlines()[0][:160]})") from None
    for key, var in weights_by_path(model).items():
        if key not in shapes:
            raise ValueError(f"checkpoint {path} has no {key}: built with other hparams?")
        if list(shapes[key]) != var.shape.as_list():
            raise ValueError(f"checkpoint {path}: {key} has shape {shapes[key]}, the model "
                             f"{var.shape.as_list()}: built with other hparams?")
    sites = [(name, site) for name, site in model.sites.sites.items()
             if getattr(site, "trains_threshold", False)]
    for _, site in sites:  # NaN marks a threshold the checkpoint does not overwrite
        site.log2_t.assign(tf.fill(site.log2_t.shape, float("nan")))
    reshaped = {}  # a threshold of another shape is read into a stand-in and dropped
    by_object = {id(site): name for name, site in sites}
    for key, saved in shapes.items():
        if not key.endswith(THRESHOLD_KEY_SUFFIX):
            continue
        site = object_at(model, key.removesuffix(THRESHOLD_KEY_SUFFIX))
        if id(site) in by_object and list(saved) != site.log2_t.shape.as_list():
            reshaped[by_object[id(site)]] = site.log2_t
            site.log2_t = tf.Variable(tf.zeros(saved), name="log2_t")
    try:  # matched through the object graph, so each site is found whichever path saved it
        tf.train.Checkpoint(model=model).read(path).expect_partial()
    except (ValueError, tf.errors.OpError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:160]})"
                         ) from None
    finally:  # the thresholds still marked go back to 0, also when the read failed
        for name, site in sites:
            if name in reshaped:
                site.log2_t = reshaped[name]
        missing = [name for name, site in sites if np.isnan(site.log2_t.numpy()).any()]
        for name, site in sites:
            if name in missing:
                site.log2_t.assign(tf.zeros_like(site.log2_t))
    return missing
