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
from model import Transformer

DATA_FLAGS = ("data", "demo_dir", "dev_set", "test_set", "train_src", "train_tgt", "dev_src",
              "dev_tgt", "test_src", "test_tgt")
DECODE_FLAGS = ("decode_margin",)


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
    hp = parser.parse_args(argv)
    saved = hparams.load_hparams(hp.logdir)
    keys = hparams.MODEL_FLAGS + DATA_FLAGS + DECODE_FLAGS + (
        "quant", "wbits", "abits", "quant_override", "rounding", "per_channel")
    hparams.merge_saved(hp, saved, hparams.explicit_flags(parser, argv), keys)
    return hp


def load_model(hp: argparse.Namespace, sites=None) -> tuple[Transformer, spm.SentencePieceProcessor, str]:
    """The model of <logdir> with its checkpoint restored, its SentencePiece model, the path."""
    spm_path = os.path.join(hp.logdir, "spm.model")
    if not os.path.exists(spm_path):
        raise FileNotFoundError(f"{spm_path} not found: is --logdir a train.py log directory?")
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    path = hp.checkpoint or tf.train.latest_checkpoint(os.path.join(hp.logdir, "ckpt"))
    if not path:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(hp.logdir, 'ckpt')}")
    model = Transformer(hp, sp.get_piece_size(), sites)
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"checkpoint {path} does not fit these hparams ({first})") from None
    return model, sp, path


def test_pairs(hp: argparse.Namespace, src: str | None, ref: str | None) -> tuple[list[str], list[str], str]:
    if src or ref:
        if not (src and ref):
            raise ValueError("--src and --ref go together")
        return (*data_load.read_parallel(src, ref), src)
    splits = data_load.load_splits(
        hp.data, hp.dev_set, hp.test_set, train_src=hp.train_src, train_tgt=hp.train_tgt,
        dev_src=hp.dev_src, dev_tgt=hp.dev_tgt, test_src=hp.test_src, test_tgt=hp.test_tgt,
        demo_dir=hp.demo_dir)
    name = hp.test_src or (f"{hp.data}:{hp.test_set}")
    return (*splits["test"], name)


def main(argv: list[str]) -> None:
    hp = restore_hparams(hparams.eval_parser(), argv)
    model, sp, ckpt_path = load_model(hp)
    de, en, test_name = test_pairs(hp, hp.src, hp.ref)
    start = time.time()
    hyps = translate(model, sp, de, hp, progress=True)
    seconds = time.time() - start
    score, signature = bleu_score(hyps, en)
    hyp_path = hp.hyp_out or os.path.join(hp.logdir, "test_hyp.txt")
    with open(hyp_path, "w") as f:
        f.write("\n".join(hyps) + "\n")
    print(f"BLEU = {score:.2f}  {signature}")
    print(f"{len(de)} sentences from {test_name} in {seconds:.1f} s "
          f"({len(de) / seconds:.1f} sentences/s); hypotheses in {hyp_path}")
    if hp.json:
        hparams.write_json(hp.json, {
            "bleu": round(score, 2), "signature": signature, "n_sentences": len(de),
            "decode_seconds": round(seconds, 3), "test_set": test_name, "checkpoint": ckpt_path,
            "beam": hp.beam})
    if hp.summary:
        hparams.update_json(hp.summary, hp.summary_key,
                            {"bleu": round(score, 2), "signature": signature, "logdir": hp.logdir})


if __name__ == "__main__":
    hparams.run_cli(main)
