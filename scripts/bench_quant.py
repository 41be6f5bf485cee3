"""Quantization benchmark: what each bit width costs in BLEU, budget-matched and over seeds, and
what a QAT train step costs in time.

    python scripts/bench_quant.py --out bench/frontier/quant.json
    python scripts/bench_quant.py --timing_only

BLEU, per corpus (the embedded demo, Multi30k test_2016_flickr), every row from the same float
parent (scripts/bench_float.py's, make demo's):
  * control: the float model fine-tuned with exactly the flags of the QAT rows (--qat_steps
    steps, the same learning-rate schedule, the same batches: --seed sets the batch order and
    dropout) — every percentage is of this row's mean, so extra training is not counted as
    quantization's merit;
  * qat_<config> (and qat_<config>_pc, per-channel weights): QAT with the preset;
  * ptq_<config> (_pc): calibration only — deterministic, one run;
  * qat_mixed_<name>: QAT of a bit allocation from scripts/sensitivity.py (--allocation FILE);
  * qat_<name> (and ptq_<name>, unless name starts with mixed): a recipe, train.py flags
    beside the preset (--recipe 'w4a8_3sd=--quant w4a8 --weight_init 3sd'; refused when train.py
    would refuse its flags or another row has its name);
each with bleu_mean, bleu_std (sample deviation over seeds), seeds, runs (every run kept),
pct_of_control_mean and the weight memory (bits per weight, total bits).  Runs are done seed by
seed, the JSON written after each, so a partial result is readable (seeds can also run as
parallel processes with their own --out, joined by --merge); --reuse_runs keeps the runs
an earlier invocation finished, and the rows an invocation does not select (--configs,
--granularities, ...) keep their values from --out, so seeds can be added to some rows only.

Timing (the Multi30k parent's model, one process): the median train-step time of the w8a8 model
over the float model, alternating on the same batches (step_time_ratio); also the w8a8 step
with frozen thresholds (no threshold gradient), the w8a8 step on TF's gradient kernels instead
of csrc/quant_grad.cc's (grad_kernel: whether that kernel was loaded), bf16 and --fused_adam float
steps, the w8a8 step with the FFN's ReLU kept, and the float training loop fed by
train.input_pipeline against one that converts and waits for every batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

import hparams  # noqa: E402
import quant  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from eval import main as eval_main  # noqa: E402
from integer import bitbudget, calibration, fixed_point  # noqa: E402
from model import Transformer  # noqa: E402

CONFIGS = tuple(name for name, bits in fixed_point.PRESETS.items() if bits is not None)
# weight granularity -> (row-name suffix, flags)
GRANULARITIES = {"tensor": ("", []), "channel": ("_pc", ["--per_channel"])}


# the timed train steps: flags over the parent's; w8a8_frozen trains no threshold (what the
# threshold gradient costs is the difference to w8a8); w8a8_tf_grad is traced without
# quant.GRAD_KERNEL (the backward on TF's kernels: what the one-pass kernel saves); w8a8_relu
# keeps the FFN's ReLU before its unsigned site (quant.TQTSites.relu: what skipping it saves)
TIMED = {"float": {"quant": "none"}, "w8a8": {"quant": "w8a8"}, "w8a8_frozen": {"quant": "w8a8"},
         "w8a8_tf_grad": {"quant": "w8a8"}, "w8a8_relu": {"quant": "w8a8"},
         "bf16": {"quant": "none", "mixed_precision": "bf16"},
         "fused_adam": {"quant": "none", "fused_adam": True}}


class ReluKeptSites(quant.TQTSites):
    """w8a8_relu's sites: the FFN's ReLU stays before its unsigned site (what TQTSites.relu saves)."""

    def relu(self, x: tf.Tensor, into: quant.QuantSite) -> tf.Tensor:
        return tf.nn.relu(x)


def step_time_ratio(parent: str, n_steps: int) -> dict:
    """Median time of each TIMED train step, alternating on the parent's batches."""
    hp = runs.restore_hparams(hparams.train_parser(), ["--logdir", parent])
    hp.batch_tokens = hparams.load_hparams(parent)["batch_tokens"]
    sp = spm.SentencePieceProcessor(model_file=runs.spm_path(parent))
    batches = runs.first_train_batches(hp, sp, runs.load_corpus(hp)["train"], n_steps + 2)
    steps = {}
    for name, flags in TIMED.items():
        hp_q = argparse.Namespace(**{**vars(hp), **flags})
        sites = runs.sites_from_flags(hp_q)
        if name == "w8a8_relu":
            sites = ReluKeptSites(sites.config)
        model = Transformer(hp_q, sp.get_piece_size(), sites)
        opt = train.Optimizers(model, hp_q)
        if opt.sites:
            calibration.calibrate(model, batches[:2], "max", "max")
        trains_thresholds = bool(opt.sites) and name != "w8a8_frozen"
        steps[name] = train.make_train_step(model, tf.distribute.get_strategy(), opt, trains_thresholds)
        if name == "w8a8_tf_grad":  # one trace serves every batch shape: trace it now, kernel-less
            with quant.without_grad_kernel():
                steps[name].get_concrete_function()
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
              for name in TIMED if name not in ("float", "w8a8")}
    loops = loop_step_seconds(steps["float"], batches[2: n_steps // 3 + 2])
    return {**timing, **ratios, "step_time_ratio": round(med["w8a8"] / med["float"], 3),
            "grad_kernel": quant.GRAD_KERNEL is not None, **loops,
            "steps": len(times["float"]), "batch_tokens": hp.batch_tokens, "cpu": runs.cpu_name(),
            "model": {k: getattr(hp, k) for k in hparams.MODEL_FLAGS}}


def loop_step_seconds(step, batches: list, blocks: int = 7) -> dict:
    """Per-step wall time of the float training loop fed two ways, in alternating blocks of the
    same batches: `sync` converts each batch with tf.constant and waits for every step (the loop
    before train.input_pipeline), `pipeline` takes the pipeline's tensors and waits only at the
    end of the block."""
    def synced():
        for s, t in batches:
            loss, _ = step(tf.constant(s), tf.constant(t), tf.constant(float(np.count_nonzero(t[:, 1:]))))
            float(loss)

    def pipelined():
        for s, t, n_tokens, _ in train.input_pipeline(batches):
            loss, _ = step(s, t, n_tokens)
        float(loss)

    times = {"sync": [], "pipeline": []}
    for _ in range(blocks):
        for name, loop in (("sync", synced), ("pipeline", pipelined)):
            start = time.perf_counter()
            loop()
            times[name].append((time.perf_counter() - start) / len(batches))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"loop_sync_step_s": round(med["sync"], 4), "loop_pipeline_step_s": round(med["pipeline"], 4),
            "pipeline_loop_ratio": round(med["pipeline"] / med["sync"], 3), "loop_blocks": blocks,
            "loop_block_steps": len(batches),
            "loop_blocks_step_s": {name: [round(x, 4) for x in v] for name, v in times.items()}}


def bleu_of(logdir: str, extra: list[str], out: str, reuse: bool = False) -> float:
    """eval.py's test BLEU (greedy) of the run with `extra` flags, scored into `out` (or read from
    it with `reuse`: evaluation is deterministic)."""
    if not (reuse and os.path.exists(out)):
        eval_main(["--logdir", logdir, "--json", out, "--hyp_out", out.replace(".json", ".txt"), *extra])
    with open(out) as f:
        return json.load(f)["bleu"]


def row_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """Row name -> the flags that make it from the parent (control first)."""
    rows = {"control": ["--quant", "none"]}
    for config in args.configs:
        for granularity in args.granularities:
            suffix, extra = GRANULARITIES[granularity]
            rows[f"qat_{config}{suffix}"] = ["--quant", config, *extra]
    if args.integer_only:
        rows["qat_w8a8_intonly"] = ["--quant", "w8a8", "--integer_only"]
    for path in args.allocation:
        with open(path) as f:
            allocation = json.load(f)
        rows[f"qat_mixed_{allocation['name']}"] = allocation["flags"]
    for name, flags in args.recipe:
        if f"qat_{name}" in rows:  # would silently replace a preset's, an allocation's or a recipe's row
            raise ValueError(f"--recipe {name}: the row qat_{name} is already made by other flags; "
                             f"name the recipe otherwise")
        rows[f"qat_{name}"] = flags
    return rows


def recipe(text: str) -> tuple[str, list[str]]:
    """--recipe NAME=FLAGS: a row name and the train.py flags that make it from the parent."""
    name, _, flags = text.partition("=")
    split = shlex.split(flags)
    if not re.fullmatch(r"[\w.-]+", name) or "--quant" not in split:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=FLAGS, NAME of letters, digits, _ . -, FLAGS with --quant")
    said = io.StringIO()
    try:  # flags train.py would refuse fail here, not after the rows before them have trained
        with contextlib.redirect_stderr(said):
            train.check_flags(hparams.train_parser().parse_args(["--logdir", "x", *split]))
    except SystemExit:
        why = said.getvalue().strip().splitlines()[-1].split("error: ")[-1]
        raise argparse.ArgumentTypeError(f"{text!r}: train.py says {why}") from None
    except ValueError as e:  # a combination train.py refuses
        raise argparse.ArgumentTypeError(f"{text!r}: train.py says {e}") from None
    return name, split


def weight_memory(parent: str, flags: list[str]) -> dict:
    """Bits per weight (mean) and in all of a row's weights (a float row: 32 per weight)."""
    vocab = spm.SentencePieceProcessor(model_file=runs.spm_path(parent)).get_piece_size()
    hp = hparams.train_parser().parse_args(["--logdir", parent, *flags])
    vars(hp).update({k: v for k, v in hparams.load_hparams(parent).items() if k in hparams.MODEL_FLAGS})
    float_row = hp.quant == "none"
    if float_row:  # the same model's weight sites, only to count its weights
        hp.quant = "w8a8"
    model = Transformer(hp, vocab, runs.sites_from_flags(hp))
    sizes = bitbudget.weight_sizes(model)
    bits = {site.site_name: 32 if float_row else site.num_bits for site, _ in model.weight_sites()}
    return {"weight_bits_mean": round(bitbudget.mean_bits(sizes, bits), 3),
            "weight_memory_bits": bitbudget.memory_bits(sizes, bits)}


def summarize(bleus: list[dict]) -> dict:
    values = [r["bleu"] for r in bleus]
    return {"bleu_mean": round(statistics.mean(values), 2),
            "bleu_std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "seeds": [r["seed"] for r in bleus], "runs": bleus}


def fine_tune(parent: str, logdir: str, flags: list[str], seed: int, args: argparse.Namespace) -> dict:
    """Train one row's run (or reuse a finished one) and return its test BLEU (greedy)."""
    summary = os.path.join(logdir, "train_summary.json")
    if not (args.reuse_runs and os.path.exists(summary)):
        runs.fresh_logdir(logdir)
        train.main(["--logdir", logdir, "--init_from", parent, *flags, "--seed", str(seed),
                    "--max_steps", str(args.qat_steps), "--num_epochs", "1000", "--lr", str(args.lr),
                    "--warmup_steps", "100", "--dev_max_sentences", "200",
                    "--threshold_log_every", "10", "--keep_best", "0"])  # scored after exactly its steps
    with open(summary) as f:
        done = json.load(f)
    if done["steps"] != args.qat_steps:
        raise SystemExit(f"error: {logdir} stopped at step {done['steps']}, not {args.qat_steps}: "
                         f"run without --reuse_runs")
    return {"seed": seed, "bleu": done["test"]["greedy_bleu"], "logdir": runs.repo_relative(logdir)}


def corpus_rows(parent: str, workdir: str, flags_by_row: dict[str, list[str]], args: argparse.Namespace,
                write, kept: dict) -> dict:
    """Every row of `flags_by_row` (from row_flags) on one corpus; `write(rows)` after each run.
    The rows of `kept` (an earlier result) that this invocation does not measure stay as they are."""
    os.makedirs(workdir, exist_ok=True)
    memory = {name: weight_memory(parent, flags) for name, flags in flags_by_row.items()}
    rows: dict = {**kept, "parent": {
        "bleu_mean": bleu_of(parent, [], os.path.join(workdir, "parent.json"), args.reuse_runs),
        **memory["control"]}}
    for name, flags in flags_by_row.items():
        if name.startswith("qat_") and not name.startswith("qat_mixed"):
            ptq = name.replace("qat_", "ptq_", 1)
            bleu = bleu_of(parent, flags, os.path.join(workdir, f"{ptq}.json"), args.reuse_runs)
            rows[ptq] = {**summarize([{"seed": None, "bleu": bleu}]), **memory[name]}
    results: dict[str, list[dict]] = {name: [] for name in flags_by_row}
    for seed in args.seeds:
        for name, flags in flags_by_row.items():
            logdir = os.path.join(workdir, f"{name}_s{seed}")
            results[name].append(fine_tune(parent, logdir, flags, seed, args))
            rows[name] = {**summarize(results[name]), **memory[name]}
            set_percentages(rows)
            write(rows)
    return rows


def set_percentages(rows: dict) -> None:
    control = rows["control"]["bleu_mean"]
    for row in rows.values():
        row["pct_of_control_mean"] = round(100 * row["bleu_mean"] / control, 2)


def merge(results: list[dict]) -> dict:
    """Results of the same rows made by several invocations (e.g. one process per seed, each with
    its own --out) as one: each row's runs united by seed, means and percentages computed again."""
    merged: dict = {"timing": {}, "bleu": {}}
    for result in results:
        merged["timing"] = result.get("timing") or merged["timing"]
        for corpus, entry in result.get("bleu", {}).items():
            if corpus not in merged["bleu"]:  # the first result of a corpus: the rest join it
                merged["bleu"][corpus] = copy.deepcopy(entry)
                continue
            into = merged["bleu"][corpus]
            if {**entry, "rows": None} != {**into, "rows": None}:
                raise ValueError(f"{corpus}: the results differ in parent or fine-tuning settings")
            for name, row in entry["rows"].items():
                if name not in into["rows"]:  # a copy: merging must leave its inputs as they were
                    into["rows"][name] = copy.deepcopy(row)
                    continue
                if "runs" not in row or row["seeds"] == [None]:  # parent/PTQ: one deterministic run
                    continue
                by_seed = {r["seed"]: r for r in into["rows"][name]["runs"] + row["runs"]}
                into["rows"][name].update(summarize([by_seed[seed] for seed in sorted(by_seed)]))
    for entry in merged["bleu"].values():
        set_percentages(entry["rows"])
    return merged


def kept_rows(earlier: dict, header: dict) -> dict:
    """The rows of an earlier result on a corpus, if it was measured with the same parent and
    fine-tuning settings (else none: they would not be comparable)."""
    return earlier.get("rows", {}) if header.items() <= earlier.items() else {}


def print_table(bleu: dict) -> None:
    print("| corpus | row | weight bits | BLEU mean ± std (seeds) | % of float control |")
    print("|---|---|---|---|---|")
    for corpus, rows in bleu.items():
        for name, row in rows.items():
            spread = f" ± {row['bleu_std']:.2f} ({len(row['seeds'])})" if "seeds" in row else ""
            pct = f"{row['pct_of_control_mean']:.1f}%" if "pct_of_control_mean" in row else ""
            print(f"| {corpus} | {name} | {row['weight_bits_mean']:g} | {row['bleu_mean']:.2f}{spread} "
                  f"| {pct} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_parent_flags(p)
    p.add_argument("--corpora", nargs="+", default=["demo", "multi30k"], choices=["demo", "multi30k"])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS),
                   choices=[c for c in fixed_point.PRESETS if c != "none"],
                   help="preset rows; none named: the control and the --allocation/--recipe rows only")
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=list(GRANULARITIES),
                   help="weight thresholds per tensor and/or per output channel (rows *_pc)")
    p.add_argument("--integer_only", action="store_true", help="add a QAT row of --quant w8a8 --integer_only")
    p.add_argument("--allocation", action="append", default=[], metavar="FILE",
                   help="a bit allocation from scripts/sensitivity.py: adds its QAT row")
    p.add_argument("--recipe", action="append", default=[], type=recipe, metavar="NAME=FLAGS",
                   help="add the rows qat_NAME and ptq_NAME: train.py flags (with --quant) "
                        "beside the presets, e.g. 'w4a8_3sd=--quant w4a8 --weight_init 3sd'")
    p.add_argument("--seeds", nargs="+", type=hparams.COUNT, default=[1, 2, 3])
    p.add_argument("--qat_steps", type=hparams.POSITIVE, default=300,
                   help="fine-tuning steps of every row, the float control's included")
    p.add_argument("--lr", type=hparams.RATE, default=2e-4, help="peak learning rate of every row")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench", "quant"))
    p.add_argument("--reuse_runs", action="store_true",
                   help="keep the runs (and PTQ scores) in --workdir that an earlier invocation finished")
    p.add_argument("--timing_steps", type=hparams.POSITIVE, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "frontier", "quant.json"),
                   help="JSON result; an existing one keeps the parts this run does not measure")
    p.add_argument("--timing_only", action="store_true", help="measure the train-step times only")
    p.add_argument("--no_timing", action="store_true", help="measure BLEU only")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="write the union of these results (e.g. one per seed) to --out; trains nothing")
    args = p.parse_args()
    if args.merge:
        try:
            results = []
            for path in args.merge:
                with open(path) as f:
                    results.append(json.load(f))
            merged = merge(results)
        except (OSError, ValueError) as e:
            p.error(f"--merge: {e}")
        hparams.write_json(args.out, merged)
        print_table({name: entry["rows"] for name, entry in merged["bleu"].items()})
        print(f"written {args.out}")
        return
    try:  # rows that collide, or an allocation that cannot be read, fail before anything trains
        flags_by_row = row_flags(args)
    except (ValueError, OSError) as e:
        p.error(str(e))
    parents = {"demo": args.demo_float, "multi30k": args.m30k_float}
    parents = {name: parents[name] for name in args.corpora}
    for name, parent in parents.items():
        if not tf.train.latest_checkpoint(os.path.join(parent, "ckpt")):
            print(f"note: no float checkpoint in {parent}: skipping {name}", file=sys.stderr)
    parents = {n: p for n, p in parents.items() if tf.train.latest_checkpoint(os.path.join(p, "ckpt"))}
    if not parents:
        raise SystemExit("error: no float parent found (run make demo or scripts/bench_float.py)")
    result = {"timing": {}, "bleu": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result.update(json.load(f))
    if not args.no_timing:
        result["timing"] = step_time_ratio(parents.get("multi30k", parents.get("demo")), args.timing_steps)
        hparams.write_json(args.out, result)
        t = result["timing"]
        print(f"train step: float {t['float_step_s']} s, w8a8 {t['w8a8_step_s']} s "
              f"({t['step_time_ratio']}x), w8a8 with frozen thresholds {t['w8a8_frozen_step_s']} s "
              f"({t['w8a8_frozen_step_time_ratio']}x), "
              f"w8a8 on TF's gradient kernels {t['w8a8_tf_grad_step_s']} s "
              f"({t['w8a8_tf_grad_step_time_ratio']}x; grad kernel loaded: {t['grad_kernel']}), "
              f"bf16 {t['bf16_step_s']} s "
              f"({t['bf16_step_time_ratio']}x), "
              f"float --fused_adam {t['fused_adam_step_s']} s ({t['fused_adam_step_time_ratio']}x), "
              f"median of {t['steps']} alternating steps; float loop per step: synced batches "
              f"{t['loop_sync_step_s']} s, input pipeline {t['loop_pipeline_step_s']} s "
              f"({t['pipeline_loop_ratio']}x), median of {t['loop_blocks']} blocks of "
              f"{t['loop_block_steps']}")
    if args.timing_only:
        return
    settings = {"qat_steps": args.qat_steps, "lr": args.lr, "warmup_steps": 100}
    for name, parent in parents.items():
        header = {"parent": runs.repo_relative(parent), **settings}
        kept = kept_rows(result["bleu"].get(name, {}), header)

        def write(rows, name=name, header=header):
            result["bleu"][name] = {**header, "rows": rows}
            hparams.write_json(args.out, result)
        corpus_rows(parent, os.path.join(args.workdir, name), flags_by_row, args, write, kept)
    print_table({name: entry["rows"] for name, entry in result["bleu"].items()})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
