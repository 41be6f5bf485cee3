"""Integer-engine benchmark: does the exported integer model translate exactly like the TF model?

    python scripts/bench_int.py --out bench/engine/int.json

For each corpus (the embedded demo set and Multi30k test_2016_flickr) it takes the QAT W8A8 run
of scripts/bench_quant.py, exports it, and translates the whole test set (greedy) with
  * the TF fake-quant model, * the NumPy integer engine, * the TF float parent,
reporting BLEU of each, the % of sentences with identical output (integer vs fake-quant), and
sentences/s of each engine, measured one after the other in this one process.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sentencepiece as spm  # noqa: E402

import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
from integer import loader  # noqa: E402
from integer_tf import export  # noqa: E402


def bench_corpus(qat_logdir: str, float_logdir: str, export_dir: str) -> dict:
    model, hp, spm_path = runs.load_quantized(qat_logdir)
    export.export_model(model, hp, spm_path, export_dir)
    de, en, test_name = runs.test_pairs(hp)
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    engine = loader.load_engine(export_dir)
    float_hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", float_logdir])
    float_model = runs.load_model(float_hp)[0]

    runs.translate(model, sp, de[:8], hp)  # trace the TF graphs outside the timings
    runs.translate(float_model, sp, de[:8], float_hp)
    engines = {
        "tf_fake_quant": runs.timed(runs.translate, model, sp, de, hp),
        "int_engine": runs.timed(data_load.translate_lines, engine, sp, de, hp.eval_batch_size),
        "tf_float": runs.timed(runs.translate, float_model, sp, de, float_hp),
    }
    if hp.test_src:  # a file: named relative to the repository
        test_name = runs.repo_relative(test_name)
    result = {"test_set": test_name, "n_sentences": len(de), "export": runs.repo_relative(export_dir)}
    for name, (hyps, seconds) in engines.items():
        result[name] = {"bleu": round(runs.bleu_score(hyps, en)[0], 2),
                        "sent_per_s": round(len(de) / seconds, 1)}
    int_hyps, tf_hyps = engines["int_engine"][0], engines["tf_fake_quant"][0]
    result["identical_output_pct"] = round(100 * sum(a == b for a, b in zip(int_hyps, tf_hyps)) / len(de), 2)
    result["differing_sentences"] = [i for i, (a, b) in enumerate(zip(int_hyps, tf_hyps)) if a != b]
    result["int_vs_tf_float_speed"] = round(result["int_engine"]["sent_per_s"]
                                            / result["tf_float"]["sent_per_s"], 2)
    result["widest_accumulator_bits"] = max(s["bits"] for s in engine.accumulator_stats().values())
    result["signature"] = runs.bleu_score(int_hyps, en)[1]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant_dir", default=os.path.join(ROOT, "runs", "bench", "quant"),
                   help="scripts/bench_quant.py --workdir (holds <corpus>/qat_w8a8)")
    p.add_argument("--demo_float", default=os.path.join(ROOT, "runs", "demo", "float"))
    p.add_argument("--m30k_float", default=os.path.join(ROOT, "runs", "bench", "float_multi30k"))
    p.add_argument("--corpus", choices=["demo", "multi30k", "both"], default="both")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "engine", "int.json"))
    args = p.parse_args()
    parents = {"demo": args.demo_float, "multi30k": args.m30k_float}
    if args.corpus != "both":
        parents = {args.corpus: parents[args.corpus]}
    result = {}
    for corpus, parent in parents.items():
        qat = os.path.join(args.quant_dir, corpus, "qat_w8a8")
        if not os.path.isdir(qat):
            print(f"note: {qat} not found (run scripts/bench_quant.py): skipping {corpus}", file=sys.stderr)
            continue
        result[corpus] = bench_corpus(qat, parent, os.path.join(args.quant_dir, corpus, "export_w8a8"))
    if not result:
        raise SystemExit("error: no QAT W8A8 run found; run scripts/bench_quant.py first")
    hparams.write_json(args.out, result)
    print("\n| corpus | BLEU fake-quant | BLEU integer | identical output | sent/s TF float | "
          "sent/s TF fake-quant | sent/s integer | widest acc |\n" + "|---" * 8 + "|")
    for corpus, r in result.items():
        print(f"| {corpus} | {r['tf_fake_quant']['bleu']:.2f} | {r['int_engine']['bleu']:.2f} | "
              f"{r['identical_output_pct']:.2f}% | {r['tf_float']['sent_per_s']} | "
              f"{r['tf_fake_quant']['sent_per_s']} | {r['int_engine']['sent_per_s']} | "
              f"{r['widest_accumulator_bits']} bits |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
