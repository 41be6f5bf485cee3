"""Plots of the quantization (PNG, matplotlib):

    python scripts/plot_quant.py thresholds --logdir runs/demo/w8a8 --out docs/thresholds.png
    python scripts/plot_quant.py pareto --bench bench/frontier/quant_multi30k_parent1952.json \\
        --out docs/pareto.png
    python scripts/plot_quant.py histogram --logdir runs/demo/w8a8 --site decoder/block_0/ffn/dense1/input \\
        --out docs/histogram.png

thresholds: every site's log2_t over the training steps (train.py writes them to the summaries,
--threshold_log_every), the sites whose power of two 2^ceil(log2_t) changed drawn in colour.
pareto: test BLEU against bits per weight for every row of a bench_quant.py JSON, mean with one
standard deviation over seeds, the Pareto front (no row with fewer bits scores higher) joined;
below, the same zoomed on the rows within 5% of the float control.
histogram: the values one site sees on a few training batches, with the calibrated threshold
(the first one logged) and the trained one (the checkpoint's).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.util import event_pb2  # noqa: E402

import hparams  # noqa: E402
import runs  # noqa: E402
from integer import atomic_files  # noqa: E402
from model import Transformer, load_weights  # noqa: E402

TAG = "log2_t/"


def threshold_history(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Site name -> (steps, log2_t) from the run's summary files, in step order."""
    points: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag.startswith(TAG):
                    site = value.tag[len(TAG):]
                    points.setdefault(site, {})[event.step] = float(tf.make_ndarray(value.tensor))
    if not points:
        raise ValueError(f"{logdir}: no log2_t summaries (a quantized train.py run writes them)")
    return {site: (np.array(sorted(p)), np.array([p[s] for s in sorted(p)])) for site, p in points.items()}


def plot_thresholds(logdir: str, out: str) -> dict:
    history = threshold_history(logdir)
    moved = {site for site, (_, v) in history.items() if np.ceil(v[0]) != np.ceil(v[-1])}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for site, (steps, values) in sorted(history.items(), key=lambda kv: kv[0] in moved):
        if site in moved:
            ax.plot(steps, values, lw=1.4, label=site)
        else:
            ax.plot(steps, values, color="0.75", lw=0.7)
    ax.set_xlabel("training step")
    ax.set_ylabel("log2_t (threshold 2^ceil(log2_t))")
    ax.set_title(f"{len(history)} sites; {len(moved)} changed their power of two (coloured)")
    if moved and len(moved) <= 12:
        ax.legend(fontsize=6, loc="best")
    save(fig, out)
    return {"sites": len(history), "moved": sorted(moved)}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or equal) bits and higher BLEU, by bits."""
    front, best = [], -np.inf
    for bits, bleu in sorted(points, key=lambda p: (p[0], -p[1])):
        if bleu > best:
            front.append((bits, bleu))
            best = bleu
    return front


def plot_pareto(bench: str, out: str) -> dict:
    """One column per corpus: every row (top) and the rows within 5% of the control (bottom)."""
    with open(bench) as f:
        corpora = json.load(f)["bleu"]
    fig, axes = plt.subplots(2, len(corpora), figsize=(7 * len(corpora), 9), squeeze=False)
    fronts = {}
    for column, (corpus, entry) in enumerate(corpora.items()):
        rows = {name: row for name, row in entry["rows"].items() if name != "parent"}
        front = pareto_front([(r["weight_bits_mean"], r["bleu_mean"]) for r in rows.values()])
        for ax in axes[:, column]:
            for name, row in rows.items():
                marker = "s" if name.startswith("ptq") else ("*" if "mixed" in name else "o")
                ax.errorbar(row["weight_bits_mean"], row["bleu_mean"], yerr=row.get("bleu_std", 0),
                            fmt=marker, capsize=3, ms=6 if marker != "*" else 11)
                ax.annotate(name, (row["weight_bits_mean"], row["bleu_mean"]), fontsize=6,
                            xytext=(4, 3), textcoords="offset points")
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bits per weight (log scale)")
            ax.set_ylabel("test BLEU (greedy), mean ± std over seeds")
            ax.legend(fontsize=7)
        axes[0, column].set_title(f"{corpus}: {entry.get('qat_steps', '?')} fine-tuning steps per row")
        if "control" in rows:
            top = max(r["bleu_mean"] for r in rows.values())
            axes[1, column].set_ylim(0.95 * rows["control"]["bleu_mean"], top + 0.01 * top)
            axes[1, column].set_title("within 5% of the float control")
        fronts[corpus] = front
    save(fig, out)
    return fronts


def site_inputs(logdir: str, site_name: str, n_batches: int) -> tuple[np.ndarray, float, float, int]:
    """The site's inputs on training batches, its first logged and its current threshold, its bits."""
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", logdir])
    sp = spm.SentencePieceProcessor(model_file=runs.spm_path(logdir))
    model = Transformer(hp, sp.get_piece_size(), runs.sites_from_flags(hp))
    load_weights(model, runs.resolve_checkpoint(logdir))
    if site_name not in model.sites.sites:
        raise ValueError(f"--site {site_name!r} is not a site of {logdir}; its sites: "
                         f"{', '.join(model.sites.sites)}")
    site = model.sites.sites[site_name]
    site.recorded = []
    for s, t in runs.first_train_batches(hp, sp, runs.load_corpus(hp)["train"], n_batches):
        model(tf.constant(s), tf.constant(t[:, :-1]), training=False)
    seen = site.recorded[:1] if site.role == "weight" else site.recorded  # a weight: the same every batch
    values = np.concatenate([x.ravel() for x, _ in seen])
    history = threshold_history(logdir).get(site_name)
    calibrated = np.exp2(np.ceil(history[1][0])) if history is not None else np.nan
    return values, float(calibrated), float(np.max(site.threshold())), site.num_bits


def plot_histogram(logdir: str, site_name: str, out: str, n_batches: int = 4) -> dict:
    values, calibrated, trained, bits = site_inputs(logdir, site_name, n_batches)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(values, bins=200, color="0.4", log=True)
    for t, style, label in ((calibrated, "--", "calibrated"), (trained, "-", "trained")):
        color = "C0" if label == "calibrated" else "C3"
        ax.axvline(t, color=color, ls=style, label=f"{label} threshold {t:g}")
        if values.min() < 0:
            ax.axvline(-t, color=color, ls=style)
    ax.set_xlabel(f"input of {site_name} ({bits} bits)")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=8)
    save(fig, out)
    return {"values": int(values.size), "calibrated": calibrated, "trained": trained}


def save(fig, out: str) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    atomic_files.write_atomic(out, png.getvalue())
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="plot", required=True)
    t = sub.add_parser("thresholds", help="every site's log2_t over training")
    t.add_argument("--logdir", required=True)
    b = sub.add_parser("pareto", help="BLEU against bits per weight from bench_quant.py's JSON")
    headline = os.path.join(ROOT, "bench", "frontier", "quant_multi30k_parent1952.json")
    b.add_argument("--bench", default=headline, help="the headline frontier by default")
    h = sub.add_parser("histogram", help="one site's values with its calibrated and trained threshold")
    h.add_argument("--logdir", required=True)
    h.add_argument("--site", required=True)
    h.add_argument("--batches", type=hparams.POSITIVE, default=4)
    for q in (t, b, h):
        q.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    if args.plot == "thresholds":
        info = plot_thresholds(args.logdir, args.out)
        print(f"{info['sites']} sites, {len(info['moved'])} changed their power of two; written {args.out}")
    elif args.plot == "pareto":
        plot_pareto(args.bench, args.out)
        print(f"written {args.out}")
    else:
        info = plot_histogram(args.logdir, args.site, args.out, args.batches)
        print(f"{info['values']} values, thresholds {info['calibrated']:g} (calibrated) -> "
              f"{info['trained']:g} (trained); written {args.out}")


if __name__ == "__main__":
    hparams.run_cli(main)
