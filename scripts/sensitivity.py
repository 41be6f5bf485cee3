"""Per-site sensitivity of a W8A8 model, and a weight-bit allocation under a budget.

    python scripts/sensitivity.py --logdir runs/bench/float_multi30k \\
        --out bench/sensitivity/sensitivity_multi30k.json
    python scripts/sensitivity.py --table bench/sensitivity/sensitivity_multi30k.json --budget 3.5 \\
        --allocation_out bench/allocations/allocation_multi30k_3.5.json

Table: the run's best checkpoint quantized W8A8 (`--quant`; a float run's thresholds calibrated as
eval.py's PTQ does, a QAT run's kept), then one site — or one family, the same site in every block
(`encoder/block_*/ffn/dense1/weight`) — at a time set to each of `--bits` other than its own width
(narrower, or wider: what raising that site buys), its threshold calibrated again for that width;
each row records the dev loss (label-smoothed, per target token, teacher-forced) and the dev BLEU
(greedy), and their change from the model as `--quant` made it.

Allocation (`--budget B`): bitbudget.allocate on the weight sites' dev-loss changes, so that the
mean bits per weight is at most B; written as JSON with the --quant_override flags (which
scripts/bench_quant.py --allocation trains as a QAT row) and beside it as a .flags file, one flag
per line, for `train.py ... $(cat FILE.flags)`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data_load  # noqa: E402
import hparams  # noqa: E402
import runs  # noqa: E402
from integer import (  # noqa: E402
    atomic_files,  # noqa: E402
    bitbudget,
    calibration,
)
from model import Transformer, load_weights  # noqa: E402


def family(site_name: str) -> str:
    """The site's name with its block number as a wildcard: the same site in every block."""
    return re.sub(r"block_\d+", "block_*", site_name)


class Probe:
    """A quantized model, its calibration batches and dev data; scores the model as it is now."""

    def __init__(self, hp: argparse.Namespace, dev_sentences: int, bleu_sentences: int):
        self.hp = hp
        self.sp = spm.SentencePieceProcessor(model_file=runs.spm_path(hp.logdir))
        self.model = Transformer(hp, self.sp.get_piece_size(), runs.sites_from_flags(hp))
        splits = runs.load_corpus(hp)
        batches = runs.first_train_batches(hp, self.sp, splits["train"], hp.calib_batches)
        missing = load_weights(self.model, runs.resolve_checkpoint(hp.logdir))
        every = list(self.model.sites.sites.values())
        self.observed = calibration.observe_inputs(self.model, batches, every)
        if missing:
            chosen = [site for site in every if site.site_name in missing]
            calibration.set_thresholds(self.model, chosen, self.observed, hp.calib, hp.weight_init)
        de, en = (lines[:dev_sentences] for lines in splits["dev"])
        self.dev_lines, self.dev_refs = de, en
        dsrc, dtgt, _ = data_load.encode_training_pairs(self.sp, de, en, hp.maxlen1, hp.maxlen2)
        self.dev_batches = data_load.train_batches(dsrc, dtgt, hp.batch_tokens, hp.seed, 0, shuffle=False)
        self.bleu_sentences = bleu_sentences

    def score(self) -> dict:
        """Dev loss and greedy dev BLEU, eagerly: a site's width is read when a function is traced,
        and tracing anew for every row would cost more than running eagerly."""
        total = tokens = 0.0
        for src, tgt in self.dev_batches:
            loss_sum, n = self.model.loss(tf.constant(src), tf.constant(tgt), training=False)
            total, tokens = total + float(loss_sum), tokens + float(n)
        scored = {"dev_loss": round(total / tokens, 5)}
        if self.bleu_sentences:
            lines, refs = self.dev_lines[: self.bleu_sentences], self.dev_refs[: self.bleu_sentences]
            hyps = runs.translate(self.model, self.sp, lines, self.hp,
                                  decode=lambda src: self.model.beam_search_impl(src, beam=1, alpha=0.0))
            scored["dev_bleu"] = round(runs.bleu_score(hyps, refs)[0], 2)
        return scored

    def lowered(self, names: list[str], bits: int) -> dict:
        """Score with the named sites at `bits` (thresholds calibrated for that width), then put
        them back."""
        sites = [self.model.sites.sites[name] for name in names]
        saved = [(site.num_bits, site.log2_t.numpy()) for site in sites]
        try:
            for site in sites:
                site.num_bits = bits
            calibration.set_thresholds(self.model, sites, self.observed, self.hp.calib, self.hp.weight_init)
            return self.score()
        finally:
            for site, (num_bits, log2_t) in zip(sites, saved):
                site.num_bits = num_bits
                site.log2_t.assign(log2_t)


def sensitivity_table(probe: Probe, bits: list[int], families: bool,
                      patterns: list[str] | None = None, flags: list[str] | None = None) -> dict:
    """The probe's base scores and one row per site (and family) that `patterns` name, per width;
    `flags`: the quantization flags the probe was built with beyond --quant (the allocation's
    QAT gets them too)."""
    hp = probe.hp
    base = probe.score()
    sites = probe.model.sites.sites
    sizes = bitbudget.weight_sizes(probe.model)
    groups = [(name, "site", [name]) for name in sites]
    if families:
        members: dict[str, list[str]] = {}
        for name in sites:
            members.setdefault(family(name), []).append(name)
        groups += [(fam, "family", names) for fam, names in members.items() if len(names) > 1]
    if patterns:  # only the sites (families) a glob names
        groups = [g for g in groups if any(fnmatch.fnmatchcase(g[0], pat) for pat in patterns)]
        if not groups:
            raise ValueError(f"--sites {' '.join(patterns)}: no site of the model matches")
    rows = []
    for name, kind, names in tqdm(groups, desc="sites", dynamic_ncols=True):
        for b in bits:
            if b == sites[names[0]].num_bits:
                continue
            scored = probe.lowered(names, b)
            change = {f"d_{k[4:]}": round(v - base[k], 5) for k, v in scored.items()}
            rows.append({"site": name, "kind": kind, "role": sites[names[0]].role, "bits": b,
                         "n_weights": sum(sizes.get(n, 0) for n in names), **scored, **change})
    return {"logdir": runs.repo_relative(hp.logdir), "quant": hp.quant, "flags": flags or [],
            "base_bits": runs.quant_config(hp).wbits, "dev_sentences": len(probe.dev_lines),
            "bleu_sentences": len(probe.dev_lines[: probe.bleu_sentences]),
            "base": base, "weight_sizes": sizes, "rows": rows}


def allocation(table: dict, budget: float, name: str | None = None, widths: list[int] | None = None) -> dict:
    """bitbudget.allocate on the table's weight-site rows (cost = dev-loss change), choosing among
    the rows of `widths` only (default: every width the table measured)."""
    sizes = table["weight_sizes"]
    cost = {(r["site"], r["bits"]): r["d_loss"] for r in table["rows"]
            if r["kind"] == "site" and r["site"] in sizes and (widths is None or r["bits"] in widths)}
    bits = bitbudget.allocate(sizes, cost, table["base_bits"], budget)
    return {"name": name or f"mean{budget:g}", "budget_mean_bits": budget, "from_table": table["logdir"],
            "weight_bits_mean": round(bitbudget.mean_bits(sizes, bits), 3),
            "weight_memory_bits": bitbudget.memory_bits(sizes, bits), "bits": bits,
            "flags": ["--quant", table["quant"], *table.get("flags", []),
                      *bitbudget.override_flags(bits, table["base_bits"])]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", help="the run to probe (float or quantized)")
    p.add_argument("--quant", default="w8a8", help="preset the sites start from")
    p.add_argument("--per_row_embedding", action="store_true",
                   help="the embedding table with a threshold per row (calibrated anew when the run "
                        "trained one per tensor); the allocation's flags keep it")
    p.add_argument("--weight_init", choices=calibration.WEIGHT_INITS,
                   help="how the thresholds of lowered weights are calibrated (default: the run's "
                        "own); the allocation's flags keep it")
    p.add_argument("--bits", nargs="+", type=hparams.BITS,
                   help="widths each site is set to (above the preset's too, e.g. 8 on a w4a8 model; "
                        "default 4 3 2); with --table, the widths the allocation may choose (default: "
                        "the table's)")
    p.add_argument("--dev_sentences", type=hparams.POSITIVE, default=200,
                   help="dev pairs the loss is measured on")
    p.add_argument("--bleu_sentences", type=hparams.COUNT, default=100,
                   help="the first N of them also translated for dev BLEU (0: loss only)")
    p.add_argument("--no_families", action="store_true", help="one row per site only")
    p.add_argument("--sites", nargs="+", metavar="GLOB",
                   help="only the sites (and families) these globs name, e.g. '*/weight'")
    p.add_argument("--out", help="write the table here (JSON)")
    p.add_argument("--table", help="read a table written by --out instead of measuring")
    p.add_argument("--budget", type=hparams.number(0, low_open=True),
                   help="mean weight bits the allocation must not exceed")
    p.add_argument("--allocation_out", help="write the allocation here (JSON)")
    p.add_argument("--allocation_name", help="its name, the bench row's suffix (default mean<budget>)")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            table = json.load(f)
    elif args.logdir:
        flags = ["--per_row_embedding"] if args.per_row_embedding else []
        flags += ["--weight_init", args.weight_init] if args.weight_init else []
        argv = ["--logdir", args.logdir, "--quant", args.quant, *flags]
        hp = runs.restore_hparams(hparams.eval_parser(), argv)
        table = sensitivity_table(Probe(hp, args.dev_sentences, args.bleu_sentences), args.bits or [4, 3, 2],
                                  families=not args.no_families, patterns=args.sites, flags=flags)
        if args.out:
            hparams.write_json(args.out, table)
        worst = sorted((r for r in table["rows"] if r["kind"] == "site"), key=lambda r: -r["d_loss"])[:10]
        print(f"{table['quant']}: dev {table['base']}; the most sensitive sites (bits, changes):")
        for r in worst:
            print(f"  {r['site']:55s} {r['bits']}  " + "  ".join(f"{k} {v:+.4f}" for k, v in r.items()
                                                                if k.startswith("d_")))
    else:
        raise ValueError("give --logdir (measure a table) or --table FILE (read one)")
    if args.budget is not None:
        chosen = allocation(table, args.budget, args.allocation_name, args.bits)
        if args.allocation_out:
            hparams.write_json(args.allocation_out, chosen)
            flags_file = os.path.splitext(args.allocation_out)[0] + ".flags"
            atomic_files.write_atomic(flags_file, "\n".join(chosen["flags"]) + "\n")
        print(f"allocation: mean {chosen['weight_bits_mean']} weight bits (budget {args.budget:g}), "
              f"{chosen['weight_memory_bits']} bits in all")
        print(" ".join(chosen["flags"]))


if __name__ == "__main__":
    hparams.run_cli(main)
