"""The scripts/ tools on tiny runs: benchmarks, sensitivity and allocation, plots."""

import argparse
import copy
import json
import os
import re

import numpy as np
import pytest
from helpers import checkpoint_values, load_script

import hparams
import runs
from hparams import train_parser
from integer import (
    bitbudget,
    site_names,
)
from model import Transformer


def test_benchmark_reruns_train_their_runs_fresh(tmp_path, capsys):
    """runs.fresh_logdir, which scripts/bench_quant.py and bench_intonly.py call before training."""
    old_run = tmp_path / "demo" / "qat_w8a8"
    (old_run / "ckpt").mkdir(parents=True)
    (old_run / "hparams.json").write_text("{}")
    runs.fresh_logdir(str(old_run))
    assert not old_run.exists() and "training it fresh" in capsys.readouterr().err
    runs.fresh_logdir(str(old_run))  # nothing there: nothing to do
    foreign = tmp_path / "demo" / "qat_w4a8"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no hparams.json"):
        runs.fresh_logdir(str(foreign))
    assert (foreign / "notes.txt").exists()


def test_sensitivity_has_one_row_per_site_and_its_allocation_keeps_the_budget(qat_runs, tmp_path):
    sensitivity = load_script("sensitivity")
    table_path, alloc_path = str(tmp_path / "table.json"), str(tmp_path / "alloc.json")
    # loss only and no families: each row runs the model eagerly
    sensitivity.main(["--logdir", qat_runs["w8a8"], "--bits", "2", "--dev_sentences", "4",
                      "--bleu_sentences", "0", "--no_families", "--out", table_path])
    table = json.load(open(table_path))
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", qat_runs["w8a8"]])
    model = Transformer(hp, 300, runs.sites_from_flags(hp))
    assert sorted(r["site"] for r in table["rows"]) == sorted(model.sites.sites)  # one row per site
    for r in table["rows"]:
        assert r["kind"] == "site" and r["bits"] == 2
        assert r["d_loss"] == pytest.approx(r["dev_loss"] - table["base"]["dev_loss"], abs=1e-5)
    weights = [r for r in table["rows"] if r["role"] == "weight"]
    assert sum(r["d_loss"] != 0 for r in weights) >= len(weights) - 1  # lowering a weight is felt
    assert set(table["weight_sizes"]) == {site.site_name for site, _ in model.weight_sites()}
    assert sensitivity.family("decoder/block_2/ffn/dense1/weight") == "decoder/block_*/ffn/dense1/weight"
    probe = sensitivity.Probe(hp, 4, 0)
    # --sites: only the named sites and families; a site's own width (8) is skipped, a wider one
    # measured (raising a site)
    ffn = sensitivity.sensitivity_table(probe, [3, 8, 12], families=True,
                                        patterns=["encoder/*/dense1/weight"])
    names = [n for n in model.sites.sites if re.fullmatch(r"encoder/block_\d/ffn/dense1/weight", n)]
    assert len(names) == 2
    groups = [*((n, "site") for n in names), ("encoder/block_*/ffn/dense1/weight", "family")]
    assert {(r["site"], r["kind"], r["bits"]) for r in ffn["rows"]} == {
        (name, kind, b) for name, kind in groups for b in (3, 12)}
    with pytest.raises(ValueError, match="--sites nothing: no site"):
        sensitivity.sensitivity_table(probe, [3], families=True, patterns=["nothing"])
    probe.bleu_sentences = 1  # the BLEU column, on one sentence
    one = sensitivity.sensitivity_table(probe, [3], families=False, patterns=[names[0]])
    assert [r["site"] for r in one["rows"]] == [names[0]]
    assert one["base"]["dev_bleu"] > 0  # the tiny model's translation shares n-grams with the reference
    assert one["rows"][0]["d_bleu"] == pytest.approx(one["rows"][0]["dev_bleu"] - one["base"]["dev_bleu"],
                                                     abs=1e-2)
    sensitivity.main(["--table", table_path, "--budget", "3.5", "--allocation_out", alloc_path,
                      "--allocation_name", "tiny"])
    chosen = json.load(open(alloc_path))
    assert chosen["name"] == "tiny"
    assert open(str(tmp_path / "alloc.flags")).read().split() == chosen["flags"]
    sizes = table["weight_sizes"]
    assert bitbudget.mean_bits(sizes, chosen["bits"]) == pytest.approx(chosen["weight_bits_mean"], abs=1e-3)
    assert chosen["weight_bits_mean"] <= 3.5
    # the flags build exactly that allocation
    flags = train_parser().parse_args(["--logdir", "x", *chosen["flags"]])
    config = runs.quant_config(flags)
    assert {name: config.bits_for(name, "weight") for name in sizes} == chosen["bits"]
    assert table["flags"] == [] and chosen["flags"][:2] == ["--quant", "w8a8"]
    with pytest.raises(ValueError, match="out of reach"):
        sensitivity.main(["--table", table_path, "--budget", "1.5"])
    # --bits with --table: the allocation chooses among those widths only (here the table's 2 bits
    # are left out, so 3.5 bits is out of reach of a w8a8 base)
    with pytest.raises(ValueError, match="out of reach"):
        sensitivity.main(["--table", table_path, "--budget", "3.5", "--bits", "8"])
    wider = {**table, "rows": [*table["rows"], *({**r, "bits": 4} for r in table["rows"])]}
    assert set(sensitivity.allocation(wider, 6.0, widths=[4])["bits"].values()) <= {4, 8}
    # a table measured with a threshold per embedding row: the allocation trains that way too
    rows_hp = runs.restore_hparams(hparams.eval_parser(),
                                   ["--logdir", qat_runs["w8a8"], "--per_row_embedding"])
    rows_probe = sensitivity.Probe(rows_hp, 4, 0)  # the run's per-tensor table threshold, calibrated per row
    assert rows_probe.model.embedding_site.log2_t.shape == [300, 1]
    rows_table = sensitivity.sensitivity_table(rows_probe, [3], families=False,
                                               patterns=[site_names.EMBEDDING],
                                               flags=["--per_row_embedding"])
    assert rows_table["flags"] == ["--per_row_embedding"] and len(rows_table["rows"]) == 1
    measured_with = ["--per_row_embedding", "--weight_init", "mse"]
    flags = sensitivity.allocation({**table, "flags": measured_with}, 3.5)["flags"]
    parsed = train_parser().parse_args(["--logdir", "x", *flags])
    assert runs.quant_config(parsed).per_row_embedding and parsed.weight_init == "mse"


def test_bench_quant_rows_are_means_over_seeds_against_the_control(tmp_path, monkeypatch):
    """corpus_rows without training: each row's mean, deviation and seeds, every percentage of the
    control's mean (rows kept from an earlier result included), PTQ beside each QAT config, the
    result written after every run; kept_rows only from the same parent and settings."""
    bench = load_script("bench_quant")
    monkeypatch.setattr(bench, "weight_memory", lambda parent, flags: {"weight_bits_mean": 8.0})
    monkeypatch.setattr(bench, "bleu_of", lambda logdir, extra, out, reuse=False: 10.0)
    score = {"control": 20.0, "qat_w8a8": 20.5, "qat_w4a8": 19.0, "qat_w4a8_3sd": 19.5}
    trained_with = {}

    def fine_tune(parent, logdir, flags, seed, args):
        trained_with[os.path.basename(logdir)] = flags
        return {"seed": seed, "bleu": score[os.path.basename(logdir).rsplit("_s", 1)[0]] + seed,
                "logdir": logdir}
    monkeypatch.setattr(bench, "fine_tune", fine_tune)
    recipe = bench.recipe("w4a8_3sd=--quant w4a8 --weight_init 3sd")
    args = argparse.Namespace(configs=["w8a8", "w4a8"], granularities=["tensor"], integer_only=False,
                              allocation=[], recipe=[recipe], seeds=[1, 2], reuse_runs=True)
    written = []

    def write(rows):  # a copy: the rows are updated in place after each run
        written.append(json.loads(json.dumps(rows)))
    rows = bench.corpus_rows("parent", str(tmp_path), bench.row_flags(args), args, write,
                            {"qat_w2a8": {"bleu_mean": 4.3}})
    assert len(written) == 8 and written[0]["control"]["seeds"] == [1] and written[-1] == rows
    assert rows["control"]["bleu_mean"] == 21.5 and rows["control"]["bleu_std"] == 0.71
    assert [r["seed"] for r in rows["qat_w4a8"]["runs"]] == [1, 2] == rows["qat_w4a8"]["seeds"]
    assert rows["qat_w4a8"]["pct_of_control_mean"] == round(100 * 20.5 / 21.5, 2)
    assert rows["qat_w2a8"]["pct_of_control_mean"] == 20.0  # kept, against the new control
    assert rows["ptq_w8a8"]["bleu_mean"] == rows["ptq_w4a8"]["bleu_mean"] == 10.0
    # a recipe: its flags as given, a PTQ row beside it, a percentage like the presets'
    assert trained_with["qat_w4a8_3sd_s2"] == ["--quant", "w4a8", "--weight_init", "3sd"]
    assert rows["qat_w4a8_3sd"]["pct_of_control_mean"] == round(100 * 21 / 21.5, 2)
    assert "ptq_w4a8_3sd" in rows
    for bad, why in (("w4a8", "NAME=FLAGS"), ("=--quant w4a8", "NAME=FLAGS"),
                     ("a/b=--quant w4a8", "NAME=FLAGS"), ("x=--weight_init 3sd", "with --quant"),
                     ("x=--quant w4a8 --wieght_init 3sd", "unrecognized arguments: --wieght_init"),
                     ("x=--quant w4a8 --mixed_precision bf16", "is for float training")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            bench.recipe(bad)
    for taken in ("w4a8", "w4a8_3sd"):  # a preset's row, another recipe's row: never replaced
        second = bench.recipe(f"{taken}=--quant w3a8")
        clash = argparse.Namespace(**{**vars(args), "recipe": [recipe, second]})
        with pytest.raises(ValueError, match=f"qat_{taken} is already made"):
            bench.row_flags(clash)
    only = argparse.Namespace(**{**vars(args), "configs": []})  # --configs with no preset
    assert list(bench.row_flags(only)) == ["control", "qat_w4a8_3sd"]
    header = {"parent": "runs/demo/float", "qat_steps": 300}
    # --merge: one result per seed (parallel processes) joined as if one process had run both seeds
    per_seed = []
    for seed in (1, 2):
        one = {k: {**row, **bench.summarize([r for r in row["runs"] if r["seed"] == seed])}
               if row.get("seeds", [None]) != [None] and "runs" in row else {**row}
               for k, row in rows.items()}
        bench.set_percentages(one)  # each process's percentages are of its own control
        per_seed.append({"timing": {}, "bleu": {"tiny": {**header, "rows": one}}})
    merged = bench.merge(per_seed)["bleu"]["tiny"]["rows"]
    for name in ("control", "qat_w4a8", "qat_w4a8_3sd", "ptq_w4a8"):
        assert {k: merged[name][k] for k in ("bleu_mean", "bleu_std", "seeds", "pct_of_control_mean")} == \
            {k: rows[name][k] for k in ("bleu_mean", "bleu_std", "seeds", "pct_of_control_mean")}, name
    # a row first met in a later result joins the merge as a copy: merging leaves its inputs as they were
    without = {k: v for k, v in per_seed[0]["bleu"]["tiny"]["rows"].items() if k != "qat_w4a8"}
    late = [{"timing": {}, "bleu": {"tiny": {**header, "rows": without}}}, per_seed[1], per_seed[0]]
    before = copy.deepcopy(late)
    assert bench.merge(late)["bleu"]["tiny"]["rows"]["qat_w4a8"]["seeds"] == [1, 2]
    assert late == before
    per_seed[1]["bleu"]["tiny"]["qat_steps"] = 150
    with pytest.raises(ValueError, match="differ in parent or fine-tuning"):
        bench.merge(per_seed)
    assert bench.kept_rows({**header, "rows": rows}, header) == rows
    assert bench.kept_rows({**header, "qat_steps": 150, "rows": rows}, header) == {}


def test_plots_write_pngs_from_a_run_and_a_benchmark(qat_runs, tmp_path):
    plots = load_script("plot_quant")
    history = plots.threshold_history(qat_runs["w8a8"])
    ckpt = checkpoint_values(qat_runs["w8a8"])
    trained = {k.split("/.ATTRIBUTES")[0] for k in ckpt if "log2_t" in k}
    assert len(history) == len(trained) > 40
    steps, values = history["decoder/block_1/ffn/dense1/input"]
    assert steps[0] == 0 and len(steps) >= 2 and np.all(np.diff(steps) > 0)
    assert np.ptp(np.concatenate([v for _, v in history.values()])) > 0  # the thresholds moved
    bench = {"bleu": {"tiny": {"qat_steps": 10, "rows": {
        "parent": {"bleu_mean": 30.0, "weight_bits_mean": 32},
        "control": {"bleu_mean": 31.0, "bleu_std": 0.5, "weight_bits_mean": 32},
        "qat_w8a8": {"bleu_mean": 31.2, "bleu_std": 0.4, "weight_bits_mean": 8},
        "qat_w4a8": {"bleu_mean": 30.5, "bleu_std": 0.3, "weight_bits_mean": 4},
        "ptq_w4a8": {"bleu_mean": 25.0, "bleu_std": 0.0, "weight_bits_mean": 4},
        "qat_mixed_mean3.5": {"bleu_mean": 30.6, "bleu_std": 0.2, "weight_bits_mean": 3.4}}}}}
    with open(tmp_path / "bench.json", "w") as f:
        json.dump(bench, f)
    fronts = plots.plot_pareto(str(tmp_path / "bench.json"), str(tmp_path / "pareto.png"))
    # w4a8 is beaten by the mixed row (fewer bits, higher BLEU), the float rows by w8a8
    assert fronts["tiny"] == [(3.4, 30.6), (8, 31.2)]
    info = plots.plot_thresholds(qat_runs["w8a8"], str(tmp_path / "thresholds.png"))
    # the sites whose power of two 2^ceil(log2_t) is another at the end than at the start
    changed = [s for s, (_, v) in history.items() if np.ceil(v[0]) != np.ceil(v[-1])]
    assert info["sites"] == len(history) and info["moved"] == sorted(changed)
    site = "decoder/block_1/ffn/dense1/input"
    info = plots.plot_histogram(qat_runs["w8a8"], site, str(tmp_path / "hist.png"), 1)
    assert info["values"] > 1000 and info["calibrated"] > 0 and info["trained"] > 0
    for name in ("pareto", "thresholds", "hist"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="is not a site"):
        plots.plot_histogram(qat_runs["w8a8"], "no/such/site", str(tmp_path / "x.png"))
