"""Quantization benchmark: train-step cost of fake quantization, and BLEU of float / PTQ / QAT.

    python scripts/bench_quant.py --out bench/quant.json

In one process and one run:
  * step_time_ratio: median train-step time of the w8a8 model over the float model, the
    models alternating on the same batches (same machine state for all); also the float model
    with --mixed_precision bf16 and with --fused_adam (`--timing_only` measures just these);
  * BLEU (sacreBLEU, greedy) of the float parent, PTQ w8a8 (calibration only), and QAT
    w8a8 / w6a6 / w4a8 fine-tuned from the parent, on the embedded demo test set and on
    Multi30k test_2016_flickr (parent: scripts/bench_float.py's model; skipped when absent).
Prints a table and writes the JSON given by --out.  A re-run measures again: the QAT logdirs
of an earlier run (<workdir>/<corpus>/qat_*) are deleted and trained fresh, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

import calibration  # noqa: E402
import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from eval import main as eval_main  # noqa: E402
from model import Transformer  # noqa: E402

QAT_CONFIGS = ("w8a8", "w6a6", "w4a8")


# the timed train steps: flags over the parent's
TIMED = {"float": {"quant": "none"}, "w8a8": {"quant": "w8a8"},
         "bf16": {"quant": "none", "mixed_precision": "bf16"},
         "fused_adam": {"quant": "none", "fused_adam": True}}


def step_time_ratio(parent: str, n_steps: int) -> dict:
    """Median time of a float, a w8a8 and a bf16 float train step, alternating on the parent's
    batches."""
    hp = runs.restore_hparams(hparams.train_parser(), ["--logdir", parent])
    hp.batch_tokens = hparams.load_hparams(parent)["batch_tokens"]
    sp = spm.SentencePieceProcessor(model_file=runs.spm_path(parent))
    de, en = runs.load_corpus(hp)["train"]
    src, tgt, _ = data_load.encode_training_pairs(sp, de, en, hp.maxlen1, hp.maxlen2)
    batches = data_load.train_batches(src, tgt, hp.batch_tokens, hp.seed, 0)[: n_steps + 2]
    steps = {}
    for name, flags in TIMED.items():
        hp_q = argparse.Namespace(**{**vars(hp), **flags})
        model = Transformer(hp_q, sp.get_piece_size(), runs.sites_from_flags(hp_q))
        opt = train.Optimizers(model, hp_q)
        if opt.sites:
            calibration.calibrate(model, batches[:2], "max", "max")
        steps[name] = train.make_train_step(model, tf.distribute.get_strategy(), opt, bool(opt.sites))
    times = {name: [] for name in steps}
    for i, (s, t) in enumerate(batches):
        n_tokens = tf.constant(float(np.count_nonzero(t[:, 1:])))
        for name, step in steps.items():
            start = time.perf_counter()
            loss, _ = step(tf.constant(s), tf.constant(t), n_tokens)
            float(loss)  # wait for the step to finish
            if i >= 2:  # the first two include tracing
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    timing = {f"{name}_step_s": round(seconds, 4) for name, seconds in med.items()}
    ratios = {f"{name}_step_time_ratio": round(med[name] / med["float"], 3)
              for name in ("bf16", "fused_adam")}
    return {**timing, **ratios, "step_time_ratio": round(med["w8a8"] / med["float"], 3),
            "steps": len(times["float"]), "batch_tokens": hp.batch_tokens,
            "model": {k: getattr(hp, k) for k in hparams.MODEL_FLAGS}}


def bleu_of(logdir: str, extra: list[str], out: str) -> float:
    eval_main(["--logdir", logdir, "--json", out, "--hyp_out", out.replace(".json", ".txt"),
                      *extra])
    with open(out) as f:
        return json.load(f)["bleu"]


def qat_and_ptq(parent: str, workdir: str, qat_flags: list[str]) -> dict:
    """BLEU of the float parent, its PTQ w8a8, and QAT runs fine-tuned from it."""
    os.makedirs(workdir, exist_ok=True)
    bleu = {"float": bleu_of(parent, [], os.path.join(workdir, "float.json"))}
    bleu["ptq_w8a8"] = bleu_of(parent, ["--quant", "w8a8"], os.path.join(workdir, "ptq_w8a8.json"))
    for config in QAT_CONFIGS:
        logdir = os.path.join(workdir, f"qat_{config}")
        train.main(["--logdir", logdir, "--init_from", parent, "--quant", config, *qat_flags,
                    "--keep_best", "0"])  # every row scored after exactly its steps
        bleu[f"qat_{config}"] = bleu_of(logdir, [], os.path.join(workdir, f"qat_{config}.json"))
    for key in list(bleu):
        if key != "float":
            bleu[f"{key}_pct_of_float"] = round(100 * bleu[key] / bleu["float"], 2)
    return bleu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_parent_flags(p)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench", "quant"))
    p.add_argument("--qat_steps", type=int, default=150, help="fine-tuning steps of each QAT run")
    p.add_argument("--timing_steps", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "quant.json"))
    p.add_argument("--timing_only", action="store_true",
                   help="measure the train-step times only (the JSON keeps its BLEU part)")
    args = p.parse_args()
    parents = {"demo": args.demo_float, "multi30k": args.m30k_float}
    for name, parent in parents.items():
        if not tf.train.latest_checkpoint(os.path.join(parent, "ckpt")):
            print(f"note: no float checkpoint in {parent}: skipping {name}", file=sys.stderr)
    parents = {n: p for n, p in parents.items() if tf.train.latest_checkpoint(os.path.join(p, "ckpt"))}
    if not parents:
        raise SystemExit("error: no float parent found (run make demo or scripts/bench_float.py)")
    for name in [] if args.timing_only else parents:  # a refusal must not come after the timing
        for config in QAT_CONFIGS:
            runs.fresh_logdir(os.path.join(args.workdir, name, f"qat_{config}"))
    timing_parent = parents.get("multi30k", parents.get("demo"))
    result = {"timing": step_time_ratio(timing_parent, args.timing_steps), "bleu": {}}
    if args.timing_only:
        earlier = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                earlier = json.load(f)
        hparams.write_json(args.out, {**earlier, "timing": result["timing"]})
        t = result["timing"]
        print(f"train step: float {t['float_step_s']} s, w8a8 {t['w8a8_step_s']} s "
              f"({t['step_time_ratio']}x), bf16 {t['bf16_step_s']} s ({t['bf16_step_time_ratio']}x), "
              f"float --fused_adam {t['fused_adam_step_s']} s ({t['fused_adam_step_time_ratio']}x), "
              f"median of {t['steps']} alternating steps; written {args.out}")
        return
    qat_flags = ["--max_steps", str(args.qat_steps), "--num_epochs", "100", "--lr", "2e-4",
                 "--warmup_steps", "100", "--dev_max_sentences", "200"]
    for name, parent in parents.items():
        result["bleu"][name] = qat_and_ptq(parent, os.path.join(args.workdir, name), qat_flags)
    hparams.write_json(args.out, result)
    t = result["timing"]
    print(f"\ntrain step: float {t['float_step_s']} s, w8a8 {t['w8a8_step_s']} s, "
          f"ratio {t['step_time_ratio']} (median of {t['steps']} alternating steps)")
    columns = ["float", "ptq_w8a8", *[f"qat_{c}" for c in QAT_CONFIGS]]
    print("| corpus | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, bleu in result["bleu"].items():
        cells = [f"{bleu['float']:.2f}"] + [
            f"{bleu[c]:.2f} ({bleu[c + '_pct_of_float']:.1f}%)" for c in columns[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
