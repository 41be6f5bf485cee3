"""Integer-only training and decoding speed against matmul-only QAT, in one process:

    python scripts/bench_intonly_speed.py --json bench/timing/intonly_speed.json

For each corpus (the embedded demo set; Multi30k when its float parent exists) two models start
from the float parent's weights: matmul-only QAT W8A8 and integer-only W8A8 (--integer_only), every
threshold calibrated by max on the first two training batches. Both run in this process, in turn:

- train step: the parent's first --steps + 2 training batches, each batch by one model then the
  other (a slow spell of the machine hits both); the first two batches of each are not timed
  (tracing). Reported: the median step of each and integer-only / W8A8 (the target: <= 1.25).
- greedy decoding (model.greedy, cached, TF): the first --sentences test sentences in the run's
  decoding batches, once untimed (tracing), then --repeats times per model, alternating; the median
  of each, and the speed ratio W8A8 seconds / integer-only seconds (the target: >= 0.8). The tokens
  each model generated are reported beside it: the loop runs to the longest output of a batch.

Prints a table and writes the JSON given by --json (times in seconds, paths relative to the
repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from integer import calibration, token_ids  # noqa: E402
from model import Transformer, load_weights  # noqa: E402

MODELS = {"w8a8": {"quant": "w8a8"}, "intonly_w8a8": {"quant": "w8a8", "integer_only": True}}


def build(hp: argparse.Namespace, vocab_size: int, checkpoint: str, flags: dict, batches: list
          ) -> tuple[Transformer, argparse.Namespace]:
    """The parent's model (its hparams `hp`) with `flags` over them, the parent's weights loaded and
    every site calibrated."""
    hp = argparse.Namespace(**{**vars(hp), **flags})
    model = Transformer(hp, vocab_size, runs.sites_from_flags(hp))
    load_weights(model, checkpoint)
    calibration.calibrate(model, batches[:2], "max", "max")
    return model, hp


def run_step(step, src: np.ndarray, tgt: np.ndarray, n_tokens: tf.Tensor) -> float:
    return float(step(tf.constant(src), tf.constant(tgt), n_tokens)[0])  # float(): waits for the step


def step_times(steps: dict, batches: list) -> dict[str, list[float]]:
    """Seconds of each model's train step on each batch after the first two, alternating."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, (src, tgt) in enumerate(batches):
        n_tokens = tf.constant(float(np.count_nonzero(tgt[:, 1:])))
        for name, step in steps.items():
            seconds = runs.timed(run_step, step, src, tgt, n_tokens)[1]
            if i >= 2:
                times[name].append(seconds)
    return times


def decode_times(models: dict, batches: list, repeats: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each model's greedy decoding of all `batches` (`repeats` alternating passes after
    an untimed one), and the tokens each generated."""
    def decode(model):
        return [model.greedy(tf.constant(src)).numpy() for _, src in batches]

    tokens = {name: sum(int(np.count_nonzero((out != token_ids.PAD) & (out != token_ids.EOS)))
                        for out in decode(model)) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(runs.timed(decode, model)[1])
    return times, tokens


def measure(parent: str, args: argparse.Namespace) -> dict:
    hp = runs.restore_hparams(hparams.train_parser(), ["--logdir", parent])
    hp.batch_tokens = hparams.load_hparams(parent)["batch_tokens"]
    sp = spm.SentencePieceProcessor(model_file=runs.spm_path(parent))
    corpus = runs.load_corpus(hp)
    batches = runs.first_train_batches(hp, sp, corpus["train"], args.steps + 2)
    checkpoint = tf.train.latest_checkpoint(os.path.join(parent, "ckpt"))
    built = {name: build(hp, sp.get_piece_size(), checkpoint, flags, batches)
             for name, flags in MODELS.items()}
    models = {name: model for name, (model, _) in built.items()}
    steps = {name: train.make_train_step(model, tf.distribute.get_strategy(), train.Optimizers(model, hp_q),
                                         train_thresholds=True)
             for name, (model, hp_q) in built.items()}
    lines = corpus["test"][0][: args.sentences]
    eval_batches = data_load.eval_batches(data_load.encode_source(sp, lines), hp.eval_batch_size)
    decode, tokens = decode_times(models, eval_batches, args.repeats)
    train_med = {name: statistics.median(v) for name, v in step_times(steps, batches).items()}
    decode_med = {name: statistics.median(v) for name, v in decode.items()}
    return {
        "parent": runs.repo_relative(parent),
        "model": {k: getattr(hp, k) for k in hparams.MODEL_FLAGS},
        "train": {"steps": args.steps, "batch_tokens": hp.batch_tokens,
                  **{f"{name}_step_s": round(s, 4) for name, s in train_med.items()},
                  "step_time_ratio": round(train_med["intonly_w8a8"] / train_med["w8a8"], 3)},
        "decode": {"sentences": len(lines), "batch_size": hp.eval_batch_size, "repeats": args.repeats,
                   **{f"{name}_s": round(s, 4) for name, s in decode_med.items()},
                   **{f"{name}_tokens": n for name, n in tokens.items()},
                   "speed_ratio": round(decode_med["w8a8"] / decode_med["intonly_w8a8"], 3)},
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs.add_fine_tune_flags(p)
    p.add_argument("--steps", type=hparams.POSITIVE, default=30, help="timed train steps per model")
    p.add_argument("--sentences", type=hparams.POSITIVE, default=500, help="test sentences decoded")
    p.add_argument("--repeats", type=hparams.POSITIVE, default=5, help="timed decoding passes per model")
    p.add_argument("--json", required=True, help="the result file")
    args = p.parse_args(argv)
    parents = runs.fine_tune_parents(args)
    result = {"cpu": runs.cpu_name(), "tensorflow": tf.__version__, "corpora": {}}
    for corpus, parent in parents.items():
        result["corpora"][corpus] = row = measure(parent, args)
        step, dec = row["train"], row["decode"]
        print(f"{corpus}: train step W8A8 {step['w8a8_step_s'] * 1000:.1f} ms, integer-only "
              f"{step['intonly_w8a8_step_s'] * 1000:.1f} ms ({step['step_time_ratio']}x); greedy decoding "
              f"of {dec['sentences']} sentences W8A8 {dec['w8a8_s']:.2f} s, integer-only "
              f"{dec['intonly_w8a8_s']:.2f} s (speed {dec['speed_ratio']}x)")
    hparams.write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    hparams.run_cli(main)
