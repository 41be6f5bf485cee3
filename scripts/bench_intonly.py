"""Integer-only benchmark: what does computing LayerNorm, softmax and the residual stream in
integers cost in BLEU, and does the NumPy engine reproduce the TF graph token for token?

    python scripts/bench_intonly.py --out bench/engine/intonly.json

For each corpus (the embedded demo set; Multi30k test_2016_flickr when its float parent exists)
four runs are fine-tuned from the float parent with the same steps and schedule: a float control
(--quant none), matmul-only QAT W8A8, integer-only QAT W8A8 and W4A8 (--integer_only). Reported:
test BLEU (sacreBLEU, greedy) and training tokens/s of each; for the integer-only runs the
BLEU of the NumPy integer engine, the % of test sentences with identical output (engine vs TF),
the engine's greedy speed over the TF float control's (same process; each the median of
--speed_repeats timings of the whole test set), and a per-op error table: max
and mean |integer - float64| of every LayerNorm and softmax output (in units of the output grid)
on the real activations of teacher-forced test sentences, with the widest accumulator of each
(observed and proven). Prints a table and writes the JSON given by --out.
"""

from __future__ import annotations

import argparse
import json
import os
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
from integer import (  # noqa: E402
    decoding,  # noqa: E402
    float_ops,
    intonly_engine,
    loader,
    site_names,
    token_ids,
)
from integer_tf import export  # noqa: E402

RUNS = {"float_control": ["--quant", "none"], "qat_w8a8": ["--quant", "w8a8"],
        "intonly_w8a8": ["--quant", "w8a8", "--integer_only"],
        "intonly_w4a8": ["--quant", "w4a8", "--integer_only"]}


def train_speed(logdir: str) -> float:
    """Training tokens/s of a run (train.py's train_summary.json)."""
    with open(os.path.join(logdir, "train_summary.json")) as f:
        return json.load(f)["tokens_per_s"]


def layer_norm_errors(engine: intonly_engine.IntOnlyTransformer, op: intonly_engine.OpRecord) -> np.ndarray:
    """|out - LN(x) 2^f_out| for one traced LayerNorm, the float64 LayerNorm of its integer input
    with gamma, beta and eps the exported values."""
    prefix = op.name.rsplit("/", 1)[0]
    names = site_names.layer_norm(prefix)
    x = op.inputs["input"].astype(np.float64) * 2.0 ** -float(engine.f(names.input))
    f_gamma = float(engine.f(names.gamma))
    gamma = engine.int64[names.gamma] * 2.0 ** -f_gamma
    beta = engine.int64[names.beta] * 2.0 ** -(f_gamma + engine.config["layer_norm_F"])
    y = float_ops.layer_norm(x, gamma, beta, engine.config["layer_norm_eps"], dtype=np.float64)
    return np.abs(op.output - y * 2.0 ** float(engine.f(names.output)))


def softmax_errors(engine: intonly_engine.IntOnlyTransformer, op: intonly_engine.OpRecord) -> np.ndarray:
    """|P - softmax(s / sqrt(d_k)) 2^b| over the visible keys of one traced softmax."""
    prefix = op.name.rsplit("/", 1)[0]
    names = site_names.attention(prefix)
    f_s = float(engine.f(names.query) + engine.f(names.key))
    x = op.inputs["scores"].astype(np.float64) * 2.0 ** -f_s / np.sqrt(engine.d_k)
    x = np.where(op.inputs["visible"], x, -np.inf)
    ref = float_ops.softmax(x, dtype=np.float64) * 2.0 ** engine.grids[names.probs].bits
    return np.abs(op.output - ref)[op.inputs["visible"]]


def op_error_table(engine: intonly_engine.IntOnlyTransformer, sources: list[list[int]]) -> dict:
    """Per-op errors on teacher-forced test sentences and the widest accumulator of each op."""
    errors: dict[str, list[np.ndarray]] = {"layer_norm": [], "softmax": []}
    engine.observe = True
    for start in range(0, len(sources), 32):
        src = token_ids.pad_batch(sources[start:start + 32])
        out = decoding.greedy(engine, src)
        tgt_in = np.concatenate([np.full((len(src), 1), token_ids.BOS), out[:, :-1]], axis=1)
        with engine.tracing_ops() as ops:
            engine.forward(src, tgt_in)
        for op in ops:
            if op.kind == "layer_norm":
                errors["layer_norm"].append(layer_norm_errors(engine, op).ravel())
            elif op.kind == "softmax":
                errors["softmax"].append(softmax_errors(engine, op).ravel())
    stats = engine.accumulator_stats()
    table = {}
    for kind, suffix in (("layer_norm", "/variance"), ("softmax", "/softmax_sum")):
        e = np.concatenate(errors[kind])
        acc = [s for name, s in stats.items() if name.endswith(suffix)]
        table[kind] = {"max_abs_error_units": round(float(e.max()), 4),
                       "mean_abs_error_units": round(float(e.mean()), 4), "values": int(e.size),
                       "widest_accumulator_bits": max(s["bits"] for s in acc),
                       "proven_accumulator_bits": max(s["proven_bits"] for s in acc)}
    return table


def bench_corpus(parent: str, workdir: str, flags: list[str], op_sentences: int,
                 residual_sweep: list[int], repeats: int, reuse_runs: bool) -> dict:
    """The four runs (and integer-only W8A8 at each width of `residual_sweep`) on one corpus;
    `reuse_runs`: a run that already finished in `workdir` is measured again, not retrained."""
    result: dict = {"runs": {}}
    sweep = {f"intonly_w8a8_r{bits}": RUNS["intonly_w8a8"] + ["--residual_bits", str(bits)]
             for bits in residual_sweep}
    for name, extra in {**RUNS, **sweep}.items():
        logdir = os.path.join(workdir, name)
        if reuse_runs and os.path.exists(os.path.join(logdir, "train_summary.json")):
            print(f"reusing the finished run {logdir}")
            continue
        runs.fresh_logdir(logdir)
        train.main(["--logdir", logdir, "--init_from", parent, *extra, *flags,
                    "--keep_best", "0"])  # every row scored after exactly its steps
    control_dir = os.path.join(workdir, "float_control")
    control_hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", control_dir])
    control = runs.load_model(control_hp)[0]
    de, en, test_name = runs.test_pairs(control_hp)
    sp = spm.SentencePieceProcessor(model_file=runs.spm_path(control_dir))
    runs.translate(control, sp, de[:8], control_hp)  # trace outside the timing
    float_hyps, float_s = runs.timed(runs.translate, control, sp, de, control_hp, repeats=repeats)
    result["test_set"] = runs.repo_relative(test_name) if control_hp.test_src else test_name
    result["sentences"] = len(de)
    result["runs"]["float_control"] = {"bleu": round(runs.bleu_score(float_hyps, en)[0], 2),
                                       "train_tokens_per_s": train_speed(control_dir),
                                       "tf_greedy_sent_per_s": round(len(de) / float_s, 1)}
    for name in list(RUNS)[1:] + list(sweep):
        logdir = os.path.join(workdir, name)
        model, hp, spm_path = runs.load_quantized(logdir)
        tf_hyps = runs.translate(model, sp, de, hp)
        row = {"bleu": round(runs.bleu_score(tf_hyps, en)[0], 2),
               "train_tokens_per_s": train_speed(logdir)}
        if hp.integer_only:
            sources = data_load.encode_source(sp, de)
            export_dir = os.path.join(workdir, f"export_{name}")
            export.export_model(model, hp, spm_path, export_dir, sources[:50])
            engine = loader.load_engine(export_dir)
            int_hyps, int_s = runs.timed(data_load.translate_lines, engine, sp, de, hp.eval_batch_size,
                                    repeats=repeats)
            same = np.mean([a == b for a, b in zip(int_hyps, tf_hyps)])
            row.update(engine_bleu=round(runs.bleu_score(int_hyps, en)[0], 2),
                       identical_output_pct=round(100 * float(same), 2),
                       engine_sent_per_s=round(len(de) / int_s, 1),
                       engine_vs_tf_float_speed=round(float_s / int_s, 2),
                       op_errors=op_error_table(engine, sources[:op_sentences]),
                       export=runs.repo_relative(export_dir))
        result["runs"][name] = row
        tf.keras.backend.clear_session()
    q, i8 = result["runs"]["qat_w8a8"]["bleu"], result["runs"]["intonly_w8a8"]["bleu"]
    result["intonly_w8a8_minus_qat_w8a8"] = round(i8 - q, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_fine_tune_flags(p)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench", "intonly"))
    p.add_argument("--steps", type=hparams.POSITIVE, default=300, help="fine-tuning steps of every run")
    p.add_argument("--op_sentences", type=hparams.POSITIVE, default=100,
                   help="test sentences of the per-op errors")
    p.add_argument("--residual_sweep", default="8,12",
                   help="demo corpus only: also integer-only W8A8 with these --residual_bits")
    p.add_argument("--speed_repeats", type=hparams.POSITIVE, default=3,
                   help="greedy speeds are the median of this many timings of the test set")
    p.add_argument("--reuse_runs", action="store_true",
                   help="measure finished runs in --workdir again instead of retraining them")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "engine", "intonly.json"),
                   help="JSON result; an existing one keeps the corpora this run does not measure")
    args = p.parse_args()
    sweep = [int(b) for b in args.residual_sweep.split(",") if b]
    parents = runs.fine_tune_parents(args)
    flags = ["--max_steps", str(args.steps), "--num_epochs", "100", "--lr", "2e-4",
             "--warmup_steps", "100", "--dev_max_sentences", "200"]
    result = {"steps": args.steps, "schedule": " ".join(flags), "corpora": {}}
    result["corpora"] = runs.earlier_corpora(args.out, result["schedule"])
    for name, parent in parents.items():
        result["corpora"][name] = bench_corpus(parent, os.path.join(args.workdir, name), flags,
                                               args.op_sentences, sweep if name == "demo" else [],
                                               args.speed_repeats, args.reuse_runs)
        result["corpora"][name]["speed_repeats"] = args.speed_repeats
        result["corpora"][name]["parent"] = runs.repo_relative(parent)
        hparams.write_json(args.out, result)  # after each corpus: a partial result survives
    print("| corpus | float control | QAT W8A8 | int-only W8A8 (engine, identical) | int-only W4A8 "
          "(engine, identical) | engine / TF float speed |")
    print("|---|---|---|---|---|---|")
    for name, r in result["corpora"].items():
        rr = r["runs"]
        cells = [f"{rr['float_control']['bleu']:.2f}", f"{rr['qat_w8a8']['bleu']:.2f}"]
        for key in ("intonly_w8a8", "intonly_w4a8"):
            cells.append(f"{rr[key]['bleu']:.2f} ({rr[key]['engine_bleu']:.2f}, "
                         f"{rr[key]['identical_output_pct']:.1f}%)")
        cells.append(f"{rr['intonly_w8a8']['engine_vs_tf_float_speed']:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in result["corpora"].items():
        for key, row in r["runs"].items():
            if key.startswith("intonly_w8a8_r"):
                print(f"{name} integer-only W8A8, --residual_bits {key.rsplit('_r', 1)[1]}: BLEU "
                      f"{row['bleu']:.2f} (engine {row['engine_bleu']:.2f}, "
                      f"{row['identical_output_pct']:.1f}% identical)")
    print("\nper-op error (units of the output grid) and widest accumulator, int-only W8A8:")
    for name, r in result["corpora"].items():
        for kind, e in r["runs"]["intonly_w8a8"]["op_errors"].items():
            print(f"  {name} {kind}: max {e['max_abs_error_units']}, mean {e['mean_abs_error_units']}, "
                  f"accumulator {e['widest_accumulator_bits']} bits observed / "
                  f"{e['proven_accumulator_bits']} proven")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
