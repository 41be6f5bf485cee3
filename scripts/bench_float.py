"""Float baseline benchmark: train for a fixed wall-clock budget, report BLEU and decoding speed.

    python scripts/bench_float.py --corpus multi30k --minutes 30 --out bench/float/float_multi30k.json
    python scripts/bench_float.py --corpus iwslt16 --minutes 30 --out bench/float/float_iwslt16.json

Model: d_model 256, d_ff 1024, 3+3 blocks, 4 heads, 8k joint BPE.  Reads ../shared/data (the
corpora are never copied into the repository).  Writes the JSON given by --out and prints a table:
dev-BLEU curve, test BLEU greedy and beam 4 (sacreBLEU, cased, detokenized), steps, minutes,
tokens/s, and greedy decoding with vs without the key/value cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from eval import main as eval_main  # noqa: E402
from integer import token_ids  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
MODEL = ["--d_model", "256", "--d_ff", "1024", "--num_blocks", "3", "--num_heads", "4",
         "--vocab_size", "8000", "--dropout_rate", "0.1", "--lr", "1e-3", "--warmup_steps", "400",
         "--batch_tokens", "2048", "--num_epochs", "1000", "--dev_max_sentences", "200",
         "--ckpt_every", "500", "--keep_best", "0"]  # scored: the weights at the time budget


def corpus_flags(corpus: str) -> tuple[list[str], str]:
    """Data flags for a corpus in ../shared/data, and the test set's name."""
    if corpus == "multi30k":
        m = os.path.join(SHARED, "multi30k")
        return ["--train_src", f"{m}/train.de.gz", "--train_tgt", f"{m}/train.en.gz",
                "--dev_src", f"{m}/val.de.gz", "--dev_tgt", f"{m}/val.en.gz",
                "--test_src", f"{m}/test_2016_flickr.de.gz", "--test_tgt", f"{m}/test_2016_flickr.en.gz"
                ], "multi30k test_2016_flickr"
    i = os.path.join(SHARED, "iwslt16")
    xml = f"{i}/raw-xml/IWSLT16.TED"
    return ["--train_src", f"{i}/train-sample/train.de.gz", "--train_tgt", f"{i}/train-sample/train.en.gz",
            "--dev_src", f"{xml}.tst2013.de-en.de.xml", "--dev_tgt", f"{xml}.tst2013.de-en.en.xml",
            "--test_src", f"{xml}.tst2014.de-en.de.xml", "--test_tgt", f"{xml}.tst2014.de-en.en.xml"
            ], "IWSLT16 TED tst2014"


def decode_speed(logdir: str, max_sentences: int) -> dict:
    """Greedy sentences/s with and without the key/value cache on the same test sentences."""
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", logdir])
    model, sp, _, _ = runs.load_model(hp)
    de = runs.load_corpus(hp)["test"][0][:max_sentences]
    batches = data_load.eval_batches(data_load.encode_source(sp, de), hp.eval_batch_size)
    result = {}
    for name, fn in (("cached", model.greedy), ("uncached", model.greedy_uncached)):
        fn(tf.constant(batches[0][1]))  # trace once, outside the timing
        start = time.time()
        outputs = [fn(tf.constant(src)).numpy() for _, src in batches]
        result[name] = len(de) / (time.time() - start)
        result[f"{name}_tokens"] = [token_ids.strip_ids(r) for out in outputs for r in out]
    same = sum(a == b for a, b in zip(result.pop("cached_tokens"), result.pop("uncached_tokens")))
    return {"sentences": len(de), "cached_sent_per_s": round(result["cached"], 2),
            "uncached_sent_per_s": round(result["uncached"], 2),
            "speedup": round(result["cached"] / result["uncached"], 2), "same_tokens": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=["multi30k", "iwslt16"], default="multi30k")
    p.add_argument("--minutes", type=hparams.number(0, low_open=True), default=30.0,
                   help="training wall-clock budget")
    p.add_argument("--logdir", default=None, help="default runs/bench/float_<corpus>")
    p.add_argument("--out", default=None, help="JSON result (default bench/float/float_<corpus>.json)")
    p.add_argument("--speed_sentences", type=hparams.POSITIVE, default=300,
                   help="test sentences for decode speed")
    p.add_argument("--eval_only", action="store_true",
                   help="do not train: evaluate the run already in --logdir (its train_summary.json)")
    args = p.parse_args()
    if not os.path.isdir(SHARED):
        raise SystemExit(f"error: {SHARED} not found: this benchmark reads the shared corpora")
    logdir = args.logdir or os.path.join(ROOT, "runs", "bench", f"float_{args.corpus}")
    out = args.out or os.path.join(ROOT, "bench", "float", f"float_{args.corpus}.json")
    flags, test_name = corpus_flags(args.corpus)

    if not args.eval_only:
        train.main(["--logdir", logdir, *MODEL, *flags, "--max_minutes", str(args.minutes)])
    with open(os.path.join(logdir, "train_summary.json")) as f:
        trained = json.load(f)  # steps, minutes and tokens/s of the training run
    with open(os.path.join(logdir, "dev_bleu.json")) as f:
        curve = json.load(f)
    step = curve[-1]["step"] if curve else 0
    tests = {}
    for beam in (1, 4):
        path = os.path.join(logdir, f"test_beam{beam}.json")
        eval_main(["--logdir", logdir, "--beam", str(beam), "--json", path,
                          "--hyp_out", os.path.join(logdir, f"test_beam{beam}.txt")])
        with open(path) as f:
            tests[f"beam{beam}"] = json.load(f)
    speed = decode_speed(logdir, args.speed_sentences)
    result = {"corpus": args.corpus, "test_set": test_name, "model": " ".join(MODEL),
              "train_minutes": trained["minutes"], "steps": trained["steps"],
              "steps_at_last_dev": step, "dev_curve": curve,
              "test_bleu_greedy": tests["beam1"]["bleu"], "test_bleu_beam4": tests["beam4"]["bleu"],
              "signature": tests["beam1"]["signature"], "decode": speed,
              "tokens_per_s": trained["tokens_per_s"], "logdir": runs.repo_relative(logdir)}
    hparams.write_json(out, result)
    print(f"\n| {args.corpus} | value |\n|---|---|")
    for key in ("train_minutes", "steps", "tokens_per_s", "test_bleu_greedy", "test_bleu_beam4"):
        print(f"| {key} | {result[key]} |")
    print("| dev curve (step: BLEU) | " + ", ".join(f"{c['step']}: {c['dev_bleu']}" for c in curve) + " |")
    print(f"| greedy sent/s cached vs uncached | {speed['cached_sent_per_s']} vs "
          f"{speed['uncached_sent_per_s']} ({speed['speedup']}x, same tokens "
          f"{speed['same_tokens']}/{speed['sentences']}) |")
    print(f"| signature | {result['signature']} |\nwritten {out}")


if __name__ == "__main__":
    main()
