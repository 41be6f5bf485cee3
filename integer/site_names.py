"""Site and matmul names: one builder per family, used by the TF model, the exporter and the
engines, so the three always agree on what a quantization site is called."""

from __future__ import annotations

from typing import NamedTuple

EMBEDDING = "embedding/weight"  # the shared table: embedding lookup and output projection
OUTPUT_INPUT = "decoder/output_input"  # the decoder output before the projection
EMBEDDING_SUM = "embedding_sum"  # integer-only: E[ids] sqrt(d) + PE, both sides (residual grid)
OUTPUT_PROJECTION = "decoder/output_projection"  # the matmul Q(y) Q(E)^T
LOGITS = "decoder/logits"  # integer-only, per-row table grids: the logits aligned onto one grid


def block(side: str, index: int) -> str:
    """`encoder/block_1` for side "encoder", index 0 (blocks count from 1 in names)."""
    return f"{side}/block_{index + 1}"


class DenseNames(NamedTuple):
    """A dense layer `<prefix>`: its input and weight sites, its bias key in model.npz."""

    input: str
    weight: str
    bias: str


def dense(prefix: str) -> DenseNames:
    return DenseNames(f"{prefix}/input", f"{prefix}/weight", f"{prefix}/bias")


class AttentionNames(NamedTuple):
    """Attention `<prefix>`: dense layers W^Q, W^K, W^V, W^O; the sites Q and K before Q K^T,
    P (softmax output) and V before P V; the two matmuls."""

    wq: str
    wk: str
    wv: str
    wo: str
    query: str
    key: str
    probs: str
    value: str
    scores: str
    context: str


# site leaf -> the attention matmul it feeds
_ATTENTION_MATMUL = {"query_input": "scores", "key_input": "scores",
                     "softmax_output": "context", "value_input": "context"}


def attention(prefix: str) -> AttentionNames:
    layers = [f"{prefix}/{leaf}" for leaf in ("wq", "wk", "wv", "wo")]
    sites = [f"{prefix}/{leaf}" for leaf in _ATTENTION_MATMUL]
    return AttentionNames(*layers, *sites, f"{prefix}/scores", f"{prefix}/context")


class FeedForwardNames(NamedTuple):
    dense1: str
    dense2: str


def feed_forward(prefix: str) -> FeedForwardNames:
    return FeedForwardNames(f"{prefix}/dense1", f"{prefix}/dense2")


class BlockNames(NamedTuple):
    """The sublayers of block `<prefix>`: encoder blocks have no cross-attention and two
    LayerNorms (after self-attention, after the FFN); decoder blocks have three."""

    self_attention: str
    cross_attention: str | None
    ffn: str
    norms: tuple[str, ...]


def block_names(side: str, index: int) -> BlockNames:
    prefix = block(side, index)
    decoder = side == "decoder"
    return BlockNames(f"{prefix}/self_attention", f"{prefix}/cross_attention" if decoder else None,
                      f"{prefix}/ffn", tuple(f"{prefix}/ln{k}" for k in range(1, 4 if decoder else 3)))


class LayerNormNames(NamedTuple):
    """LayerNorm `<prefix>` in integer-only mode: the sites of its input (the residual sum), its
    gamma and its output; beta's key in model.npz (on the product grid of gamma and the
    normalized value, like a bias)."""

    input: str
    gamma: str
    beta: str
    output: str


def layer_norm(prefix: str) -> LayerNormNames:
    return LayerNormNames(f"{prefix}/input", f"{prefix}/gamma", f"{prefix}/beta", f"{prefix}/output")


def matmul_of(site: str) -> str | None:
    """The matmul a site feeds: `<dense>/input|weight` -> `<dense>`; Q, K -> `<attn>/scores`;
    P, V -> `<attn>/context`; the decoder output and the embedding table -> OUTPUT_PROJECTION
    (the table also feeds the embedding lookup). None for the integer-only sites of the embedding
    sum and the LayerNorms, which feed no matmul."""
    if site in (EMBEDDING, OUTPUT_INPUT):
        return OUTPUT_PROJECTION
    if site == EMBEDDING_SUM:
        return None
    prefix, leaf = site.rsplit("/", 1)
    if prefix.rsplit("/", 1)[-1].startswith("ln"):
        return None
    return f"{prefix}/{_ATTENTION_MATMUL[leaf]}" if leaf in _ATTENTION_MATMUL else prefix
