"""Translate a test set with a trained model and report sacreBLEU: python eval.py --logdir DIR.

The hparams saved with the checkpoint are restored; flags typed on the command line override
them (with a warning where they differ).
"""

from __future__ import annotations

import argparse
import os
import time

import sacrebleu
import sentencepiece as spm
import tensorflow as tf
from tqdm import tqdm

import data_load
import hparams
import intmodel
import quant
from model import Transformer, load_weights


def translate(model: Transformer, sp: spm.SentencePieceProcessor, lines: list[str],
              hp: argparse.Namespace, progress: bool = False) -> list[str]:
    """Detokenized translations of `lines`, in order (greedy with cache, or beam search)."""
    hyps: list[str] = [""] * len(lines)
    batches = data_load.eval_batches(data_load.encode_source(sp, lines), hp.eval_batch_size)
    for index, src in tqdm(batches, desc="translate", disable=not progress, dynamic_ncols=True):
        src = tf.constant(src)
        out = model.greedy(src) if hp.beam == 1 else model.beam_search(src, hp.beam, hp.alpha)
        for i, row in zip(index, out.numpy()):
            hyps[i] = data_load.decode_ids(sp, row)
    return hyps


def bleu_score(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (cased, detokenized, 13a) and its signature."""
    metric = sacrebleu.metrics.BLEU()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def restore_hparams(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags as typed, completed by the hparams saved with the run (or with the export)."""
    hp = parser.parse_args(argv)
    if hp.logdir:
        saved = hparams.load_hparams(hp.logdir)
    elif getattr(hp, "engine", "tf") == "int" and hp.export:
        saved = intmodel.read_manifest(hp.export)["hparams"]
    else:
        raise ValueError("--logdir is required (or --engine int --export DIR)")
    keys = hparams.MODEL_FLAGS + hparams.DATA_FLAGS + hparams.QUANT_FLAGS + ("decode_margin",)
    hparams.merge_saved(hp, saved, hparams.explicit_flags(parser, argv), keys)
    return hp


def load_model(hp: argparse.Namespace) -> tuple[Transformer, spm.SentencePieceProcessor, str, bool]:
    """The model of <logdir> (quantized per hp), its SentencePiece model, the checkpoint path, and
    whether the checkpoint carried thresholds (False: a float checkpoint that PTQ must calibrate)."""
    spm_path = os.path.join(hp.logdir, "spm.model")
    if not os.path.exists(spm_path):
        raise FileNotFoundError(f"{spm_path} not found: is --logdir a train.py log directory?")
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    path = hp.checkpoint or tf.train.latest_checkpoint(os.path.join(hp.logdir, "ckpt"))
    if not path:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(hp.logdir, 'ckpt')}")
    model = Transformer(hp, sp.get_piece_size(), quant.sites_from_flags(hp))
    return model, sp, path, load_weights(model, path)


def test_pairs(hp: argparse.Namespace, src: str | None, ref: str | None) -> tuple[list[str], list[str], str]:
    if src or ref:
        if not (src and ref):
            raise ValueError("--src and --ref go together")
        return (*data_load.read_parallel(src, ref), src)
    name = hp.test_src or (f"{hp.data}:{hp.test_set}")
    return (*load_corpus(hp)["test"], name)


def load_corpus(hp: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """The train/dev/test splits named by the data flags."""
    return data_load.load_splits(
        hp.data, hp.dev_set, hp.test_set, train_src=hp.train_src, train_tgt=hp.train_tgt,
        dev_src=hp.dev_src, dev_tgt=hp.dev_tgt, test_src=hp.test_src, test_tgt=hp.test_tgt,
        demo_dir=hp.demo_dir)


def post_training_quantize(model: Transformer, sp: spm.SentencePieceProcessor,
                           hp: argparse.Namespace) -> None:
    """PTQ: calibrate every threshold of a float checkpoint on training batches, no training."""
    splits = load_corpus(hp)
    src, tgt, _ = data_load.encode_training_pairs(sp, *splits["train"], hp.maxlen1, hp.maxlen2)
    batches = data_load.train_batches(src, tgt, hp.batch_tokens, hp.seed, 0)[: hp.calib_batches]
    quant.calibrate(model, batches, hp.calib, hp.weight_init)
    print(f"post-training quantization: {hp.quant}, calibrated by {hp.calib} on {len(batches)} batches")


def translate_int(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str]:
    """Translations by the NumPy integer engine of the export in --export."""
    engine = intmodel.IntTransformer.load(hp.export)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(hp.export, "spm.model"))
    hyps = intmodel.translate_lines(engine, sp, lines, hp.eval_batch_size, hp.beam, hp.alpha)
    stats = engine.accumulator_stats()
    if stats:
        widest = max(stats.items(), key=lambda kv: kv[1]["bits"])
        print(f"widest accumulator: {widest[1]['bits']} bits at {widest[0]} "
              f"({len(stats)} matmuls)")
    if hp.dump_vectors:
        if not hp.out:
            raise ValueError("--dump_vectors needs --out DIR")
        src_ids = [ids + [data_load.EOS_ID] for ids in sp.encode(lines[: hp.dump_vectors])]
        index = intmodel.dump_vectors(engine, src_ids, hp.out)
        print(f"golden vectors of {len(index)} matmul calls for {hp.dump_vectors} sentences in {hp.out}")
    return hyps, hp.export


def translate_tf(hp: argparse.Namespace, lines: list[str]) -> tuple[list[str], str]:
    """Translations by the TF model of --logdir (PTQ-calibrated first for --quant on a float
    checkpoint); with --export, its integers are exported afterwards."""
    model, sp, ckpt_path, has_thresholds = load_model(hp)
    if hp.quant != "none" and not has_thresholds:
        post_training_quantize(model, sp, hp)
    if hp.dump_vectors:
        raise ValueError("--dump_vectors runs on the integer engine: add --engine int --export DIR")
    hyps = translate(model, sp, lines, hp, progress=True)
    if hp.export:
        import export  # here, not at the top: export.py itself imports this module

        export.export_model(model, hp, os.path.join(hp.logdir, "spm.model"), hp.export)
    return hyps, ckpt_path


def agreement(hyps: list[str], path: str) -> float:
    """% of sentences whose output equals the hypotheses in `path` (same order)."""
    others = data_load.read_lines(path)[: len(hyps)]
    if len(others) != len(hyps):
        raise ValueError(f"--agree_with {path} has {len(others)} lines, not {len(hyps)}")
    return 100.0 * sum(a == b for a, b in zip(hyps, others)) / len(hyps)


def main(argv: list[str]) -> None:
    hp = restore_hparams(hparams.eval_parser(), argv)
    de, en, test_name = test_pairs(hp, hp.src, hp.ref)
    start = time.time()
    hyps, source = (translate_int if hp.engine == "int" else translate_tf)(hp, de)
    seconds = time.time() - start
    score, signature = bleu_score(hyps, en)
    hyp_path = hp.hyp_out or os.path.join(hp.logdir or hp.export, f"test_hyp_{hp.engine}.txt")
    with open(hyp_path, "w") as f:
        f.write("\n".join(hyps) + "\n")
    print(f"BLEU = {score:.2f}  {signature}")
    print(f"{len(de)} sentences from {test_name} in {seconds:.1f} s ({len(de) / seconds:.1f} "
          f"sentences/s, {hp.engine} engine); hypotheses in {hyp_path}")
    result = {"bleu": round(score, 2), "signature": signature, "n_sentences": len(de),
              "decode_seconds": round(seconds, 3), "test_set": test_name, "checkpoint": source,
              "engine": hp.engine, "beam": hp.beam}
    if hp.export:
        result["export"] = hp.export
        print(f"BLEU = {score:.2f} with the integers in {hp.export}")
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
