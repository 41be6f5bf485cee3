"""Translate a test set with a trained model and report sacreBLEU: python eval.py --logdir DIR.

The hparams saved with the checkpoint are restored; flags typed on the command line override
them (with a warning where they differ).
"""

from __future__ import annotations

import argparse
import os
import time

import sentencepiece as spm

import data_load
import hparams
import runs
from integer import calibration, export_format, golden_vectors, loader
from integer_tf import export
from model import Transformer


def post_training_quantize(model: Transformer, sp: spm.SentencePieceProcessor,
                           hp: argparse.Namespace, names: list[str]) -> None:
    """PTQ: calibrate the thresholds the checkpoint lacks (all of a float one's) on training
    batches, no training."""
    batches = runs.first_train_batches(hp, sp, runs.load_corpus(hp)["train"], hp.calib_batches)
    calibration.calibrate(model, batches, hp.calib, hp.weight_init, names)
    print(f"post-training quantization: {hp.quant}, {len(names)} sites calibrated by {hp.calib} on "
          f"{len(batches)} batches")


def translate_int(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str]:
    """Translations by the NumPy integer engine of the export in --export."""
    engine = loader.load_engine(hp.export)
    engine.observe = True  # the accumulator widths printed below
    sp = spm.SentencePieceProcessor(model_file=os.path.join(hp.export, export_format.SPM))
    hyps = data_load.translate_lines(engine, sp, lines, hp.eval_batch_size, hp.beam, hp.alpha)
    stats = engine.accumulator_stats()
    if stats:
        widest = max(stats.items(), key=lambda kv: kv[1]["bits"])
        print(f"widest accumulator: {widest[1]['bits']} bits at {widest[0]} "
              f"({len(stats)} matmuls and reductions)")
    if hp.dump_vectors:
        if not hp.out:
            raise ValueError("--dump_vectors needs --out DIR")
        src_ids = data_load.encode_source(sp, lines[: hp.dump_vectors])
        index = golden_vectors.dump_vectors(engine, src_ids, hp.out)
        print(f"golden vectors of {len(index)} calls (matmuls; integer-only: also LayerNorms and "
              f"softmaxes) for {hp.dump_vectors} sentences in {hp.out}")
    return hyps, hp.export


def translate_tf(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str]:
    """Translations by the TF model of --logdir (PTQ-calibrated first for --quant on a float
    checkpoint); with --export_to, its integers are exported afterwards."""
    if hp.export:
        raise ValueError("--export names an export to evaluate with --engine int; to write the "
                         "integers of --logdir use --export_to DIR")
    model, sp, ckpt_path, missing = runs.load_model(hp)
    if missing:
        post_training_quantize(model, sp, hp, missing)
    if hp.dump_vectors:
        raise ValueError("--dump_vectors runs on the integer engine: add --engine int --export DIR")
    hyps = runs.translate(model, sp, lines, hp, progress=True)
    if hp.export_to:
        spm_file = runs.spm_path(hp.logdir)
        export.export_model(model, hp, spm_file, hp.export_to, export.observed_sources(model, hp, spm_file))
    return hyps, ckpt_path


def agreement(hyps: list[str], path: str) -> float:
    """% of sentences whose output equals the hypotheses in `path` (same order)."""
    others = data_load.read_lines(path)[: len(hyps)]
    if len(others) != len(hyps):
        raise ValueError(f"--agree_with {path} has {len(others)} lines, not {len(hyps)}")
    return 100.0 * sum(a == b for a, b in zip(hyps, others)) / len(hyps)


def main(argv: list[str]) -> None:
    hp = runs.restore_hparams(hparams.eval_parser(), argv)
    if hp.engine == "int" and not hp.export:
        raise ValueError("--engine int needs --export DIR (an export directory: eval.py --export_to)")
    if hp.engine == "int" and hp.export_to:
        raise ValueError("--export_to writes the integers of a TF model (--engine tf --logdir DIR)")
    if hp.engine == "tf":
        print(runs.setup_devices(hp.require_gpu))
    de, en, test_name = runs.test_pairs(hp, hp.src, hp.ref)
    start = time.time()
    hyps, source = (translate_int if hp.engine == "int" else translate_tf)(hp, de)
    seconds = time.time() - start
    score, signature = runs.bleu_score(hyps, en)
    hyp_path = hp.hyp_out or os.path.join(hp.logdir or hp.export, f"test_hyp_{hp.engine}.txt")
    with open(hyp_path, "w") as f:
        f.write("\n".join(hyps) + "\n")
    print(f"BLEU = {score:.2f}  {signature}")
    print(f"{len(de)} sentences from {test_name} in {seconds:.1f} s ({len(de) / seconds:.1f} "
          f"sentences/s, {hp.engine} engine); hypotheses in {hyp_path}")
    result = {"bleu": round(score, 2), "signature": signature, "n_sentences": len(de),
              "decode_seconds": round(seconds, 3), "test_set": test_name, "checkpoint": source,
              "engine": hp.engine, "beam": hp.beam}
    if hp.export or hp.export_to:
        result["export"] = hp.export or hp.export_to
        print(f"BLEU = {score:.2f} with the integers in {result['export']}")
    if hp.agree_with:
        result["token_agreement"] = round(agreement(hyps, hp.agree_with), 2)
        print(f"identical output on {result['token_agreement']:.2f}% of sentences vs {hp.agree_with}")
    if hp.json:
        hparams.write_json(hp.json, result)
    if hp.summary:
        entry = {k: result[k] for k in ("bleu", "signature", "export", "token_agreement") if k in result}
        hparams.update_json(hp.summary, hp.summary_key, {**entry, "logdir": hp.logdir})


if __name__ == "__main__":
    hparams.run_cli(main)
