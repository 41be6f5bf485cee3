"""Decoding with an integer engine (either kind): batched greedy search and beam search over the
engine's cached decoder steps (`start_decoding`, `step`), as model.Transformer decodes in TF."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from integer import float_ops
from integer.token_ids import BOS, EOS, PAD

if TYPE_CHECKING:
    from integer.matmul_engine import IntTransformer


def greedy(engine: IntTransformer, src: np.ndarray) -> np.ndarray:
    """Batched greedy decoding with a key/value cache: token ids [B, T], PAD after EOS.

    Each step takes the first maximum of the logits.  TF's greedy (beam search with one
    beam) ranks score + log_softmax(logits) in float64, which orders the tokens as the
    logits do; the two could part only if two logits were within float64 rounding of
    each other.  beam_search(engine, src, 1) computes it TF's way.  Finished sentences leave the
    batch (cache rows too) once they are an eighth of it: every op works row by row, so the
    others are unchanged."""
    src = np.asarray(src)
    src_bias, limit, cross_kv, cache = engine.start_decoding(src, 1)
    out = np.full((len(src), int(limit.max())), PAD, np.int64)
    rows = np.arange(len(src))  # the sentences in the batch arrays
    going = np.ones(len(src), bool)  # which of them still decode
    token = np.full(len(src), BOS)
    for t in range(out.shape[1]):
        token = np.where(going, np.argmax(engine.step(token, t, cache, cross_kv, src_bias), 1), PAD)
        out[rows[going], t] = token[going]
        going &= (token != EOS) & (t + 1 < limit)
        if not going.any():
            break
        if 8 * np.count_nonzero(~going) >= len(going):  # drop finished rows by eighths
            rows, token, limit, src_bias = rows[going], token[going], limit[going], src_bias[going]
            cache = [(k[going], v[going]) for k, v in cache]
            cross_kv = [(k[going], v[going]) for k, v in cross_kv]
            going = going[going]
    return out


def beam_search(engine: IntTransformer, src: np.ndarray, beam: int, alpha: float = 0.6) -> np.ndarray:
    """model.Transformer.beam_search_impl in NumPy: `beam` hypotheses per sentence ranked
    by summed log-probability; a finished one continues with PAD at cost 0; at most
    (non-pad source tokens + decode_margin) outputs; the winner maximizes
    score / ((5 + len) / 6)^alpha (GNMT). Returns [B, T], PAD after EOS."""
    src = np.asarray(src)
    batch, rows = src.shape[0], src.shape[0] * beam
    src_bias, limit, cross_kv, cache = engine.start_decoding(src, beam)
    length = cache[0][0].shape[2]
    # only beam 0 is live at the start, so the copies do not all pick the same tokens
    scores = np.tile(np.array([0.0] + [-1e30] * (beam - 1), np.float64), (batch, 1))
    pad_only = np.full(engine.vocab, -1e30, np.float64)
    pad_only[PAD] = 0.0
    token = np.full(rows, BOS)
    finished, lengths = np.zeros(rows, bool), np.zeros(rows, np.int64)
    seqs = np.zeros((rows, length), np.int64)
    t = 0
    while t < length and not finished.all():
        logp = float_ops.log_softmax(engine.logit_values(engine.step(token, t, cache, cross_kv, src_bias)))
        logp = np.where(finished[:, None], pad_only[None], logp)
        total = (scores.reshape(rows, 1) + logp).reshape(batch, beam * engine.vocab)
        index = np.argsort(-total, axis=1, kind="stable")[:, :beam]  # as top_k: ties -> lower index
        scores = np.take_along_axis(total, index, axis=1)
        parent = (index // engine.vocab + np.arange(batch)[:, None] * beam).reshape(rows)
        token = (index % engine.vocab).reshape(rows)
        was_finished = finished[parent]
        seqs = seqs[parent]
        cache = [(k[parent], v[parent]) for k, v in cache]
        seqs[:, t] = token
        finished = was_finished | (token == EOS) | (t + 1 >= limit)
        lengths = lengths[parent] + ~was_finished
        t += 1
    penalty = np.power((5.0 + lengths.astype(np.float64)) / 6.0, alpha)
    best = np.argmax(scores / penalty.reshape(batch, beam), axis=1)
    return seqs.reshape(batch, beam, length)[np.arange(batch), best]
