"""The TF fake-quant graph against the NumPy integer engine, site by site: the integers each
produces at every matmul operand, in the engine's execution order (scripts/compare_engines.py and
scripts/bench_full_size.py report them). TF's integers are what its fake-quant ops produced
(QuantSite.recorded: y * 2^f), so a quantizer that differs between the engines shows; the engine's
come from its matmul trace."""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import sentencepiece as spm
import tensorflow as tf

import data_load
import runs
from integer import accumulation, matmul_engine, token_ids
from model import Transformer


def tf_site_integers(model: Transformer, src: np.ndarray, tgt_in: np.ndarray
                     ) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """Each site's output integers in call order during one eager forward, and the logits."""
    sites = model.sites.sites
    for site in sites.values():
        site.recorded = []
    try:
        logits = model(tf.constant(src, tf.int32), tf.constant(tgt_in, tf.int32)).numpy()
        return {name: [q for _, q in site.recorded] for name, site in sites.items()}, logits
    finally:
        for site in sites.values():
            site.recorded = None


def site_differences(model: Transformer, engine: matmul_engine.IntTransformer, src: np.ndarray,
                     tgt_in: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """One row per matmul operand in the engine's execution order: site, call (n-th use of
    the site), matmul, max_diff and n_diff (integer units), float32_exact (every partial sum
    of that matmul below 2^24, so the TF graph computes it exactly). Also both logits."""
    recorded, tf_logits = tf_site_integers(model, src, tgt_in)
    with engine.tracing() as trace:
        int_logits = engine.forward(src, tgt_in)
    calls: Counter[str] = Counter()
    rows = []
    for rec in trace:
        for site, q in ((rec.x_site, rec.x), (rec.w_site, rec.w)):
            diff = np.abs(recorded[site][calls[site]] - q)
            rows.append({"site": site, "call": calls[site], "matmul": rec.name,
                         "max_diff": int(diff.max(initial=0)), "n_diff": int(np.count_nonzero(diff)),
                         "size": int(q.size), "float32_exact": rec.abs_bound < accumulation.FLOAT32_EXACT})
            calls[site] += 1
    return rows, tf_logits, int_logits


def report(rows: list[dict], tf_logits: np.ndarray, int_logits: np.ndarray) -> str:
    differing = [r for r in rows if r["max_diff"]]
    inexact = {(r["matmul"], r["call"]) for r in rows if not r["float32_exact"]}
    lines = [f"{len(rows)} matmul operands compared; {len(differing)} differ "
             f"({sum(r['n_diff'] for r in differing)} of {sum(r['size'] for r in rows)} integers)",
             f"matmul calls outside the float32-exact regime (a partial sum may reach 2^24): "
             f"{len(inexact)}"]
    if differing:
        first = differing[0]
        lines.append(f"first difference: {first['site']} (call {first['call']}, feeding "
                     f"{first['matmul']}): max |diff| {first['max_diff']} integer units at "
                     f"{first['n_diff']} of {first['size']} values")
    else:
        lines.append("no site differs: the engines agree bit for bit at every matmul input")
    agree = np.mean(tf_logits.argmax(-1) == int_logits.argmax(-1))
    lines.append(f"logits: max |diff| {np.abs(tf_logits - int_logits).max():.3g}, "
                 f"argmax agreement {agree:.4f}")
    return "\n".join(lines)


def first_test_batch(hp: argparse.Namespace, sp: spm.SentencePieceProcessor, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(sources, decoder inputs BOS + pieces) of the first n test pairs."""
    de, en, _ = runs.test_pairs(hp)
    src = token_ids.pad_batch(data_load.encode_source(sp, de[:n]))
    tgt_in = token_ids.pad_batch([ids[:-1] for ids in data_load.encode_target(sp, en[:n])])
    return src, tgt_in
