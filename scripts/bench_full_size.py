"""Full-size model: is the TF fake-quant graph bit-exact against the NumPy integer engine?

    python scripts/bench_full_size.py --logdir runs/full_size/w8a8 --export runs/full_size/w8a8/export \
        --src ../shared/data/iwslt16/raw-xml/IWSLT16.TED.tst2014.de-en.de.xml \
        --ref ../shared/data/iwslt16/raw-xml/IWSLT16.TED.tst2014.de-en.en.xml \
        --n 200 --out bench/engine/full_size_w8a8.json

The TF graph computes each matmul in float32 on q * 2^-f, exact only while every partial sum
stays below 2^24 integer units; the engine accumulates exactly (integer/matmul_engine.py). A
baseline-size FFN's second layer (K = 2048, unsigned 8-bit x signed 8-bit) may reach 66.8M in
the worst case. On the first --n sentences (default: the run's test set) this measures

  * site by site (integer_tf/compare.py's site_differences, teacher-forced over the
    references, --compare_n sentences in batches of --batch): the matmul calls whose actual
    bound max(|x| @ |w|) reaches 2^24, the operands whose integers differ between TF and the
    engine (and by how much), the logits, and per matmul the largest actual bound beside the
    worst case K * max|q_x| * max|q_w|;
  * greedy decoding with both (TF model.greedy, integer.decoding.greedy): the % of sentences with
    identical token ids and the % of tokens (positions where both outputs have the same id,
    over the longer output of each pair).

Works for matmul-only and integer-only (--integer_only) runs alike. Writes JSON with relative
paths only, the command as typed, the CPU (runs.cpu_name) and the wall times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
from integer import accumulation, decoding, export_format, loader, token_ids  # noqa: E402
from integer.matmul_engine import IntTransformer, MatmulRecord  # noqa: E402
from integer_tf.compare import first_test_batch, site_differences  # noqa: E402
from model import Transformer  # noqa: E402

EXACT = accumulation.FLOAT32_EXACT


@contextlib.contextmanager
def captured_traces(engine: IntTransformer) -> Iterator[list[list[MatmulRecord]]]:
    """Keep the matmul trace of every engine.tracing() block entered inside (site_differences
    opens its own and drops it), so the actual bounds can be read without a second forward."""
    original = engine.tracing
    traces: list[list[MatmulRecord]] = []

    @contextlib.contextmanager
    def keeping() -> Iterator[list[MatmulRecord]]:
        with original() as trace:
            yield trace
        traces.append(trace)

    engine.tracing = keeping  # type: ignore[method-assign]
    try:
        yield traces
    finally:
        engine.tracing = original  # type: ignore[method-assign]


def trimmed(src: np.ndarray, tgt_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A slice of padded batches without its all-padding trailing columns."""
    def width(a: np.ndarray) -> int:
        return int((a != token_ids.PAD).any(0).nonzero()[0].max()) + 1
    return src[:, :width(src)], tgt_in[:, :width(tgt_in)]


def compare_sites(model: Transformer, engine: IntTransformer, src_all: np.ndarray, tgt_all: np.ndarray,
                  batch: int) -> dict:
    """site_differences over the sentences in batches, summed: matmul calls and their exact
    regime, differing operands and integers per site, logits, and per matmul the actual and the
    worst-case accumulator bound."""
    calls = inexact = operands = integers = 0
    inexact_by_matmul: Counter[str] = Counter()
    differing: dict[str, dict] = {}
    first = None
    logit_max_diff, argmax_same, positions = 0.0, 0, 0
    bounds: dict[str, dict] = defaultdict(lambda: {"max_actual_bound": 0.0, "worst_case_bound": 0})
    for start in range(0, len(src_all), batch):
        src, tgt_in = trimmed(src_all[start:start + batch], tgt_all[start:start + batch])
        with captured_traces(engine) as traces:
            rows, tf_logits, int_logits = site_differences(model, engine, src, tgt_in)
        for rec in traces[0]:
            entry = bounds[rec.name]
            entry["max_actual_bound"] = max(entry["max_actual_bound"], rec.abs_bound)
            worst = accumulation.accumulator_bound(rec.x.shape[-1], engine.grids[rec.x_site],
                                                   engine.grids[rec.w_site])
            entry["worst_case_bound"] = max(entry["worst_case_bound"], worst)
        del traces
        seen = {(r["matmul"], r["call"]): r["float32_exact"] for r in rows}
        calls += len(seen)
        for (matmul, _), exact in seen.items():
            if not exact:
                inexact += 1
                inexact_by_matmul[matmul] += 1
        operands += len(rows)
        integers += sum(r["size"] for r in rows)
        for r in rows:
            if not r["n_diff"]:
                continue
            d = differing.setdefault(r["site"], {"operands": 0, "n_diff": 0, "max_diff": 0})
            d["operands"] += 1
            d["n_diff"] += r["n_diff"]
            d["max_diff"] = max(d["max_diff"], r["max_diff"])
            if first is None:
                first = {"sentence_batch_start": start, **{k: r[k] for k in ("site", "call", "matmul",
                                                                              "max_diff", "n_diff")}}
        real = tgt_in != token_ids.PAD
        values = engine.logit_values(int_logits)  # integer-only: integers on the logits' grid
        logit_max_diff = max(logit_max_diff, float(np.abs(tf_logits - values)[real].max()))
        argmax_same += int((tf_logits.argmax(-1) == int_logits.argmax(-1))[real].sum())
        positions += int(real.sum())
    over = {name: b for name, b in bounds.items() if b["worst_case_bound"] >= EXACT}
    return {
        "sentences": len(src_all), "batch": batch, "matmul_calls": calls,
        "calls_outside_float32_exact": inexact, "calls_outside_by_matmul": dict(inexact_by_matmul),
        "operands_compared": operands, "integers_compared": integers,
        "operands_differing": sum(d["operands"] for d in differing.values()),
        "integers_differing": sum(d["n_diff"] for d in differing.values()),
        "sites_differing": differing, "first_difference": first,
        "max_diff_integer_units": max((d["max_diff"] for d in differing.values()), default=0),
        "logits_max_abs_diff": logit_max_diff,
        "logits_argmax_agreement_pct": round(100 * argmax_same / max(positions, 1), 4),
        "matmuls_worst_case_over_2_24": sorted(over),
        "largest_actual_bound_of_those": max((b["max_actual_bound"] for b in over.values()), default=0.0),
        "largest_actual_bound_of_those_over_2_24": round(
            max((b["max_actual_bound"] for b in over.values()), default=0.0) / EXACT, 4),
        "bounds_by_matmul": {name: {"max_actual_bound": int(b["max_actual_bound"]),
                                    "worst_case_bound": int(b["worst_case_bound"]),
                                    "actual_over_2_24": round(b["max_actual_bound"] / EXACT, 4)}
                             for name, b in sorted(bounds.items())},
    }


def agree_tokens(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions where both outputs hold the same id, the longer output's length)."""
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


def greedy_agreement(model: Transformer, engine: IntTransformer, sp: spm.SentencePieceProcessor,
                     lines: list[str], refs: list[str] | None, batch_size: int) -> dict:
    """Greedy-decode `lines` with the TF graph and the engine (the same batches as eval.py):
    sentences with identical ids, token agreement, BLEU of each, seconds of each."""
    batches = data_load.eval_batches(data_load.encode_source(sp, lines), batch_size)
    out: dict[str, list[list[int]]] = {"tf": [[] for _ in lines], "int": [[] for _ in lines]}
    seconds = {"tf": 0.0, "int": 0.0}
    model.greedy(tf.constant(batches[0][1]))  # trace once, outside the timing
    for index, src in batches:
        for name, decode in (("tf", lambda s: model.greedy(tf.constant(s)).numpy()),
                             ("int", lambda s: decoding.greedy(engine, s))):
            t0 = time.time()
            ids = decode(src)
            seconds[name] += time.time() - t0
            for i, row in zip(index, ids):
                out[name][i] = token_ids.strip_ids(row)
    same = [a == b for a, b in zip(out["tf"], out["int"])]
    matched, total = map(sum, zip(*(agree_tokens(a, b) for a, b in zip(out["tf"], out["int"]))))
    result = {
        "sentences": len(lines), "identical_sentences": sum(same),
        "identical_sentences_pct": round(100 * sum(same) / len(lines), 2),
        "differing_sentences": [i for i, s in enumerate(same) if not s],
        "tokens_tf": sum(map(len, out["tf"])), "tokens_int": sum(map(len, out["int"])),
        "token_agreement_pct": round(100 * matched / max(total, 1), 2),
        "seconds_tf": round(seconds["tf"], 1), "seconds_int": round(seconds["int"], 1),
        "distinct_outputs_tf": len({tuple(o) for o in out["tf"]}),
    }
    if refs is not None:
        for name in ("tf", "int"):
            hyps = [sp.decode(ids) for ids in out[name]]
            result[f"bleu_{name}"] = round(runs.bleu_score(hyps, refs)[0], 2)
        result["signature"] = runs.bleu_score(hyps, refs)[1]
    result["first_hypotheses_tf"] = [sp.decode(ids) for ids in out["tf"][:3]]
    return result


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def training_record(logdir: str, hp: argparse.Namespace) -> dict:
    """Steps of the run and of its --init_from parents (each run's train_summary.json)."""
    record, run = [], logdir
    while run:
        saved = hparams.load_hparams(run)
        summary = read_json(os.path.join(run, "train_summary.json"))
        record.append({"logdir": runs.repo_relative(run), "quant": saved.get("quant"),
                       "integer_only": saved.get("integer_only", False), "steps": summary.get("steps"),
                       "minutes": summary.get("minutes"), "test": summary.get("test")})
        parent = saved.get("init_from")
        run = os.path.join(ROOT, parent) if parent and not os.path.isabs(parent) else parent
    return {"runs": record, "steps_total": sum(r["steps"] or 0 for r in record)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", required=True, help="the quantized train.py run")
    p.add_argument("--export", required=True, help="its export directory")
    p.add_argument("--src", default=None, help="German sentences (default: the run's test set)")
    p.add_argument("--ref", default=None, help="their English references (needed with --src)")
    p.add_argument("--n", type=hparams.POSITIVE, default=200, help="first n sentences decoded")
    p.add_argument("--compare_n", type=hparams.POSITIVE, default=None,
                   help="first sentences of the site-by-site comparison (default --n)")
    p.add_argument("--batch", type=hparams.POSITIVE, default=16,
                   help="sentences per teacher-forced comparison batch (TF records every site's integers)")
    p.add_argument("--out", default=os.path.join("bench", "engine", "full_size_w8a8.json"))
    p.add_argument("--machine_note", default="", help="recorded beside the CPU (e.g. other jobs running)")
    args = p.parse_args(argv)
    if bool(args.src) != bool(args.ref):
        raise ValueError("--src and --ref go together")
    start = time.time()
    command = "python scripts/bench_full_size.py " + " ".join(shlex.quote(a) for a in argv)

    model, hp, spm_path = runs.load_quantized(args.logdir)
    engine = loader.load_engine(args.export)
    engine.observe = True  # the widest accumulator, recorded below
    if export_format.sha256_file(spm_path) != engine.manifest["spm"]["sha256"]:
        raise ValueError(f"{spm_path}: spm model mismatch: {args.export} was exported with another")
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    if args.src:  # first_test_batch reads the run's test set: point it at these files
        hp.test_src, hp.test_tgt = args.src, args.ref
    de, en, test_name = runs.test_pairs(hp)
    n = min(args.n, len(de))
    compare_n = min(args.compare_n or n, n)

    t0 = time.time()
    src, tgt_in = first_test_batch(hp, sp, compare_n)
    sites = compare_sites(model, engine, src, tgt_in, args.batch)
    sites["seconds"] = round(time.time() - t0, 1)
    print(f"site by site ({compare_n} sentences, {sites['seconds']} s): "
          f"{sites['matmul_calls']} matmul calls, "
          f"{sites['calls_outside_float32_exact']} outside the float32-exact regime; "
          f"{sites['integers_differing']} of {sites['integers_compared']} integers differ at "
          f"{len(sites['sites_differing'])} sites (max {sites['max_diff_integer_units']} units); "
          f"largest actual bound of the worst-case > 2^24 matmuls: "
          f"{sites['largest_actual_bound_of_those_over_2_24']} x 2^24", flush=True)

    agreement = greedy_agreement(model, engine, sp, de[:n], en[:n] if en is not None else None,
                                 hp.eval_batch_size)
    print(f"greedy ({n} sentences): identical {agreement['identical_sentences_pct']}% of sentences, "
          f"{agreement['token_agreement_pct']}% of tokens; BLEU TF {agreement.get('bleu_tf')} "
          f"int {agreement.get('bleu_int')}", flush=True)

    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables if "log2_t" not in v.name)
    widest = max(engine.accumulator_stats().items(), key=lambda kv: kv[1]["bits"])
    result = {
        "command": command,
        "machine": {"cpu": runs.cpu_name(), "cores": os.cpu_count(),
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                    **({"note": args.machine_note} if args.machine_note else {})},
        "model": {"d_model": hp.d_model, "d_ff": hp.d_ff, "num_blocks": hp.num_blocks,
                  "num_heads": hp.num_heads, "vocab": sp.get_piece_size(), "parameters": params,
                  "quant": hp.quant, "integer_only": bool(hp.integer_only),
                  "rounding": hp.rounding},
        "logdir": runs.repo_relative(args.logdir), "export": runs.repo_relative(args.export),
        "training": training_record(args.logdir, hp),
        "test_set": runs.repo_relative(test_name) if os.path.exists(test_name) else test_name,
        "n_sentences": n, "float32_exact_limit": EXACT,
        "site_comparison": sites, "greedy_agreement": agreement,
        "widest_accumulator": {"matmul": widest[0], **widest[1]},
        "wall_seconds": round(time.time() - start, 1),
    }
    hparams.write_json(args.out, result)
    print(f"written {args.out} ({result['wall_seconds']} s)")


if __name__ == "__main__":
    hparams.run_cli(main)
