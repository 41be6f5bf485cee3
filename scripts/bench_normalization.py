"""The reciprocal normalization against the exact one at the same budget: integer-only W8A8 fine-tuned
with --normalization exact and with --normalization reciprocal from the same float parent (same steps,
schedule and seed), each scored in TF and by the NumPy engine; and, to isolate the kernel from the
training, the exact run's export decoded with the reciprocal kernels (its manifest switched: the same
weights and grids).

    python scripts/bench_normalization.py --corpus both --steps 200 --out bench/hw/normalization.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from integer import export_format, kernels, loader  # noqa: E402
from integer_tf import export  # noqa: E402


def switched_export(export_dir: str, out_dir: str, normalization: str) -> str:
    """A copy of an integer-only export whose manifest names another normalization."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(export_dir, out_dir)
    path = os.path.join(out_dir, export_format.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest["model"].update(kernels.intonly_constants(manifest["model"]["softmax_m"], normalization))
    hparams.write_json(path, manifest)
    return out_dir


def bench_corpus(parent: str, workdir: str, flags: list[str]) -> dict:
    result: dict = {"parent": runs.repo_relative(parent), "runs": {}}
    hyps: dict[str, list[str]] = {}
    for normalization in kernels.NORMALIZATIONS:
        logdir = os.path.join(workdir, normalization)
        runs.fresh_logdir(logdir)
        train.main(["--logdir", logdir, "--init_from", parent, "--quant", "w8a8", "--integer_only",
                    "--normalization", normalization, *flags, "--keep_best", "0"])
        model, hp, spm_path = runs.load_quantized(logdir)
        de, en, test_name = runs.test_pairs(hp)
        sp = spm.SentencePieceProcessor(model_file=spm_path)
        tf_hyps = runs.translate(model, sp, de, hp)
        export_dir = os.path.join(workdir, f"export_{normalization}")
        export.export_model(model, hp, spm_path, export_dir, data_load.encode_source(sp, de)[:50])
        hyps[normalization] = data_load.translate_lines(loader.load_engine(export_dir), sp, de,
                                                        hp.eval_batch_size)
        same = np.mean([a == b for a, b in zip(hyps[normalization], tf_hyps)])
        result["runs"][normalization] = {"tf_bleu": round(runs.bleu_score(tf_hyps, en)[0], 2),
                                         "engine_bleu": round(runs.bleu_score(hyps[normalization], en)[0], 2),
                                         "engine_tf_identical_pct": round(100 * float(same), 2),
                                         "export": runs.repo_relative(export_dir)}
        result["test_set"] = runs.repo_relative(test_name) if hp.test_src else test_name
        result["sentences"] = len(de)
        tf.keras.backend.clear_session()
    swapped = switched_export(os.path.join(workdir, "export_exact"), os.path.join(workdir,
                                                                                  "export_exact_swapped"),
                              "reciprocal")
    swapped_hyps = data_load.translate_lines(loader.load_engine(swapped), sp, de, hp.eval_batch_size)
    same = np.mean([a == b for a, b in zip(swapped_hyps, hyps["exact"])])
    result["exact_weights_reciprocal_kernels"] = {
        "engine_bleu": round(runs.bleu_score(swapped_hyps, en)[0], 2),
        "identical_to_exact_engine_pct": round(100 * float(same), 2)}
    bleu = {name: row["engine_bleu"] for name, row in result["runs"].items()}
    result["reciprocal_minus_exact_bleu"] = round(bleu["reciprocal"] - bleu["exact"], 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_fine_tune_flags(p)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench", "normalization"))
    p.add_argument("--steps", type=hparams.POSITIVE, default=200, help="fine-tuning steps of every run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "hw", "normalization.json"),
                   help="JSON result; an existing one keeps the corpora this run does not measure")
    args = p.parse_args()
    parents = runs.fine_tune_parents(args)
    flags = ["--max_steps", str(args.steps), "--num_epochs", "100", "--lr", "2e-4", "--warmup_steps", "100",
             "--dev_max_sentences", "200"]
    result = {"steps": args.steps, "schedule": " ".join(flags), "corpora": {}}
    result["corpora"] = runs.earlier_corpora(args.out, result["schedule"])
    for name, parent in parents.items():
        result["corpora"][name] = bench_corpus(parent, os.path.join(args.workdir, name), flags)
        hparams.write_json(args.out, result)  # after each corpus: a partial result survives
        print(json.dumps(result["corpora"][name], indent=1))


if __name__ == "__main__":
    main()
