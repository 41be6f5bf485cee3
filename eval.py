"""Translate with a trained model and score sacreBLEU: python eval.py --logdir DIR.

The hparams saved with the checkpoint are restored; flags typed on the command line override
them (with a warning where they differ). `--src FILE` translates a file of your own (`-`: standard
input); with `--ref FILE` it is scored, without it only translated (to `--hyp_out`, or standard
output, with every other message on standard error).
"""

from __future__ import annotations

import hparams

if __name__ == "__main__":  # --help and a mistyped flag are answered before TensorFlow loads
    hparams.check_command_line(hparams.eval_parser())

import argparse
import contextlib
import os
import sys
import time

import sentencepiece as spm

import data_load
import runs
from integer import atomic_files, calibration, export_format, golden_vectors, loader
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


def translate_int(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str, str]:
    """Translations by the NumPy integer engine of the export in --export, the export and "export"."""
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
        src_ids = data_load.encode_source(sp, lines[: hp.dump_vectors])
        index = golden_vectors.dump_vectors(engine, src_ids, hp.out)
        print(f"golden vectors of {golden_vectors.calls(index)} ops ({index['engine']}: "
              f"{'every integer op' if index['engine'] == 'integer_only' else 'the matmuls'}) for "
              f"{len(src_ids)} sentences in {hp.out}")
    return hyps, hp.export, "export"


def translate_tf(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str, str]:
    """Translations by the TF model of --logdir (PTQ-calibrated first for --quant on a float
    checkpoint), the checkpoint and which it is (runs.checkpoint_kind); with --export_to, its
    integers are exported afterwards."""
    model, sp, ckpt_path, missing = runs.load_model(hp)
    if missing:
        post_training_quantize(model, sp, hp, missing)
    hyps = runs.translate(model, sp, lines, hp, progress=True)
    if hp.export_to:
        spm_file = runs.spm_path(hp.logdir)
        export.export_model(model, hp, spm_file, hp.export_to, export.observed_sources(model, hp, spm_file))
    return hyps, ckpt_path, f"{runs.checkpoint_kind(hp.logdir, hp.checkpoint)} checkpoint"


def check_request(hp: argparse.Namespace) -> None:
    """Every flag combination and input path, before any model loads or sentence is decoded."""
    if hp.engine == "int":
        if not hp.export:
            raise ValueError("--engine int needs --export DIR (an export directory: eval.py --export_to)")
        if hp.export_to:
            raise ValueError("--export_to writes the integers of a TF model (--engine tf --logdir DIR)")
    else:
        if hp.export:
            raise ValueError("--export names an export to evaluate with --engine int; to write the "
                             "integers of --logdir use --export_to DIR")
        if hp.dump_vectors:
            raise ValueError("--dump_vectors runs on the integer engine: add --engine int --export DIR")
        if hp.export_to and hp.quant == "none":
            raise ValueError(f"--export_to writes a quantized model's integers, and --logdir {hp.logdir} "
                             f"is a float run: add --quant w8a8 (post-training quantization) or export "
                             f"a QAT run")
        runs.resolve_checkpoint(hp.logdir, hp.checkpoint)
    if hp.dump_vectors and not hp.out:
        raise ValueError("--dump_vectors needs --out DIR")
    if hp.dump_vectors:
        atomic_files.check_replaceable(hp.out, golden_vectors.INDEX, "--out")
    if hp.export_to:
        atomic_files.check_replaceable(hp.export_to, export_format.MANIFEST, "--export_to")
    if hp.ref and not hp.src:
        raise ValueError("--ref needs --src (the German side of the references)")
    for flag in ("src", "ref", "agree_with"):
        path = getattr(hp, flag)
        if path and path != "-" and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag} {path}: file not found")
    if hp.src == "-" and hp.ref == "-":
        raise ValueError("--src and --ref cannot both read standard input")


def hypotheses_path(hp: argparse.Namespace) -> str | None:
    """--hyp_out; unset: <logdir>/test_hyp_<engine>.txt for a run, standard output ('-') when
    --src is only translated, else None (an export is never written into)."""
    if hp.hyp_out:
        return hp.hyp_out
    if hp.src and not hp.ref:
        return "-"
    return os.path.join(hp.logdir, f"test_hyp_{hp.engine}.txt") if hp.logdir else None


def agreement(hyps: list[str], path: str) -> float:
    """% of sentences whose output equals the hypotheses in `path` (same order)."""
    others = data_load.read_lines(path)[: len(hyps)]
    if len(others) != len(hyps):
        raise ValueError(f"--agree_with {path} has {len(others)} lines, not {len(hyps)}")
    return 100.0 * sum(a == b for a, b in zip(hyps, others)) / len(hyps)


def main(argv: list[str]) -> None:
    hp = runs.restore_hparams(hparams.eval_parser(), argv)
    check_request(hp)
    hyp_path = hypotheses_path(hp)
    to_stdout = hyp_path == "-"
    # translations on standard output: every message goes to standard error
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        hyps, result = evaluate(hp, hyp_path)
    if to_stdout:
        sys.stdout.write("".join(h + "\n" for h in hyps))
    if hp.json:
        hparams.write_json(hp.json, result)
    if hp.summary:
        entry = {k: result[k] for k in ("bleu", "signature", "export", "token_agreement") if k in result}
        hparams.update_json(hp.summary, hp.summary_key, {**entry, "logdir": hp.logdir})


def evaluate(hp: argparse.Namespace, hyp_path: str | None) -> tuple[list[str], dict]:
    """Translate (and score, with references); print what was done. Returns the hypotheses and
    the result --json records."""
    if hp.engine == "tf":
        print(runs.setup_devices(hp.require_gpu))
    de, en, test_name = runs.test_pairs(hp, hp.src, hp.ref)
    start = time.time()
    hyps, checkpoint, kind = (translate_int if hp.engine == "int" else translate_tf)(hp, de)
    seconds = time.time() - start
    source = f"{kind} {checkpoint}"
    if hyp_path and hyp_path != "-":
        atomic_files.write_atomic(hyp_path, "".join(h + "\n" for h in hyps))
    where = {"-": "; translations on standard output", None: ""}.get(hyp_path, f"; hypotheses in {hyp_path}")
    result = {"n_sentences": len(de), "decode_seconds": round(seconds, 3), "test_set": test_name,
              "checkpoint": checkpoint, "engine": hp.engine, "beam": hp.beam}
    if en is not None:
        score, signature = runs.bleu_score(hyps, en)
        print(f"BLEU = {score:.2f}  {signature}  ({source})")
        result.update(bleu=round(score, 2), signature=signature)
    print(f"{len(de)} sentences from {test_name} in {seconds:.1f} s ({len(de) / seconds:.1f} "
          f"sentences/s, {hp.engine} engine, {source}){where}")
    if hp.export or hp.export_to:
        result["export"] = hp.export or hp.export_to
        if en is not None:
            print(f"BLEU = {result['bleu']:.2f} with the integers in {result['export']}")
    if hp.agree_with:
        result["token_agreement"] = round(agreement(hyps, hp.agree_with), 2)
        print(f"identical output on {result['token_agreement']:.2f}% of sentences vs {hp.agree_with}")
    return hyps, result


if __name__ == "__main__":
    hparams.run_cli(main)
