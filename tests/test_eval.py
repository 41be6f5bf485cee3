"""eval.py on tiny trained runs: the integer engine against TF, exports, the engines' CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, assert_one_line_error, eval_main, npz_arrays, run_cli

import data_load
import hparams
import runs
from integer import (
    atomic_files,
    decoding,
    export_format,
    loader,
    token_ids,
)
from integer_tf import export


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_integer_engine_translates_token_for_token_like_tf(qat_runs, corpus, preset):
    """The exported integers, run by the NumPy engine, give the TF fake-quant model's outputs."""
    logdir = qat_runs[preset]
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", logdir])
    model, sp, _, _ = runs.load_model(hp)
    lines = data_load.read_lines(corpus["train"][0])
    engine = loader.load_engine(os.path.join(logdir, "export"))
    tf_ids, int_ids = [], []
    for _, src in data_load.eval_batches(data_load.encode_source(sp, lines), 64):
        tf_ids += [token_ids.strip_ids(r) for r in model.greedy(tf.constant(src)).numpy()]
        int_ids += [token_ids.strip_ids(r) for r in decoding.greedy(engine, src)]
    same = sum(a == b for a, b in zip(tf_ids, int_ids))
    assert same == len(lines), f"{same}/{len(lines)} identical"
    assert max(s["bits"] for s in engine.accumulator_stats().values()) <= 32


def test_eval_int_engine_cli(qat_runs, corpus, tmp_path, capsys):
    """eval.py --export_to D after a TF evaluation writes the export that --engine int
    --export D evaluates (the integers train.py exported, bit for bit), with the TF BLEU."""
    logdir = qat_runs["w8a8"]
    export_dir = str(tmp_path / "export")
    tf_json, int_json = str(tmp_path / "tf.json"), str(tmp_path / "int.json")
    args = ["--src", corpus["dev"][0], "--ref", corpus["dev"][1]]
    eval_main(["--logdir", logdir, *args, "--json", tf_json, "--hyp_out", str(tmp_path / "tf.txt"),
               "--export_to", export_dir])
    assert f"with the integers in {export_dir}" in capsys.readouterr().out
    manifest = export_format.read_manifest(export_dir)
    trained = export_format.read_manifest(os.path.join(logdir, "export"))
    assert manifest["sites"] == trained["sites"] and manifest["model"] == trained["model"]
    exported, by_train = npz_arrays(export_dir), npz_arrays(os.path.join(logdir, "export"))
    assert exported.keys() == by_train.keys()
    for key in exported:
        assert exported[key].dtype == by_train[key].dtype, key
        np.testing.assert_array_equal(exported[key], by_train[key], err_msg=key)
    eval_main(["--engine", "int", "--export", export_dir, *args, "--json", int_json,
               "--agree_with", str(tmp_path / "tf.txt"), "--hyp_out", str(tmp_path / "int.txt"),
               "--dump_vectors", "2", "--out", str(tmp_path / "vectors")])
    tf_result, int_result = json.load(open(tf_json)), json.load(open(int_json))
    assert tf_result["export"] == export_dir and tf_result["engine"] == "tf"
    assert int_result["bleu"] == tf_result["bleu"] and int_result["token_agreement"] == 100.0
    assert int_result["engine"] == "int" and int_result["n_sentences"] == 20
    assert int_result["export"] == int_result["checkpoint"] == export_dir
    assert os.path.exists(tmp_path / "vectors" / "index.json")
    assert "BLEU = " in capsys.readouterr().out


def test_eval_export_with_the_tf_engine_is_an_error(qat_runs, corpus, tmp_path, capsys):
    """--export names an export for --engine int to read: with the TF engine it is one error line
    pointing to --export_to (exit status 1), and nothing is written there; --engine int needs it."""
    target = str(tmp_path / "export")
    args = ["--logdir", qat_runs["w8a8"], "--src", corpus["dev"][0], "--ref", corpus["dev"][1],
            "--hyp_out", str(tmp_path / "hyp.txt")]
    for argv, message in [
        ([*args, "--engine", "tf", "--export", target],
         "error: --export names an export to evaluate with --engine int; to write the integers of "
         "--logdir use --export_to DIR"),
        ([*args, "--engine", "int"],
         "error: --engine int needs --export DIR (an export directory: eval.py --export_to)"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            hparams.run_cli(eval_main, argv)
        captured = capsys.readouterr()
        assert exit_.value.code == 1 and captured.err.strip().splitlines() == [message], captured.err
        assert "BLEU" not in captured.out
    assert not os.path.exists(target) and not os.path.exists(tmp_path / "hyp.txt")


def test_an_out_folder_with_other_files_is_never_replaced(qat_runs, corpus, tmp_path, capsys):
    """--export_to, --dump_vectors' --out and integer_tf.export's --out replace a whole folder: one
    naming a folder that holds other files (a run, a home folder) is a one-line error before any
    work, and the folder is untouched; an earlier export or vectors folder is replaced."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    base = ["--logdir", qat_runs["w8a8"], "--src", corpus["dev"][0], "--ref", corpus["dev"][1]]
    exported = os.path.join(qat_runs["w8a8"], "export")  # train.py wrote it
    for main, argv, flag in [(eval_main, [*base, "--export_to", str(precious)], "--export_to"),
                             (eval_main, ["--engine", "int", "--export", exported, "--dump_vectors", "1",
                                          "--out", str(precious), *base[2:]], "--out"),
                             (export.main, ["--logdir", qat_runs["w8a8"], "--out", str(precious)], "--out")]:
        with pytest.raises(SystemExit) as exit_:
            hparams.run_cli(main, argv)
        err = capsys.readouterr().err.strip()
        marker = "index.json" if "--dump_vectors" in argv else "manifest.json"
        assert exit_.value.code == 1, err
        assert err == (f"error: {flag} {precious}: a folder with other files (no {marker}); it would be "
                       "replaced whole: name a new folder"), err
        assert os.listdir(precious) == ["notes.txt"]
    atomic_files.check_replaceable(str(tmp_path / "new"), "manifest.json", "--out")  # new, or empty: fine
    atomic_files.check_replaceable(str(precious), "notes.txt", "--out")  # a folder it wrote: replaced


# ---- eval.py as a user runs it --------------------------------------------------------------------


def test_an_export_of_a_float_run_is_refused_before_decoding(float_run, tmp_path, capsys):
    """eval.py --export_to and integer_tf.export on a float run: one line saying how to quantize
    it, before a sentence is translated (no progress bar, no hypotheses), nothing written."""
    target = str(tmp_path / "export")
    proc = run_cli("eval.py", "--logdir", float_run, "--export_to", target)
    assert_one_line_error(proc, "--export_to", "float run", "--quant w8a8")
    assert "devices:" not in proc.stdout and "translate" not in proc.stderr  # before the model loads
    assert not os.path.exists(target)
    with pytest.raises(SystemExit):
        hparams.run_cli(export.main, ["--logdir", float_run, "--out", target])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --logdir {float_run} is a float run") and "--quant w8a8 --export_to" in err
    assert not os.path.exists(target)


def test_translate_a_file_or_standard_input_without_references(float_run, qat_runs, corpus, tmp_path,
                                                                capsys):
    """--src without --ref translates: to standard output (every other message on standard
    error) or --hyp_out, with no BLEU; the same translations the scored run writes, for both
    engines; standard input with --src -."""
    src, ref = corpus["dev"]
    scored = str(tmp_path / "scored.txt")
    eval_main(["--logdir", float_run, "--src", src, "--ref", ref, "--hyp_out", scored])
    expected = data_load.read_lines(scored)
    proc = run_cli("eval.py", "--logdir", float_run, "--src", src)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == expected and "BLEU" not in proc.stdout + proc.stderr
    with open(src) as stdin:
        piped = subprocess.run([sys.executable, "eval.py", "--logdir", float_run, "--src", "-"], stdin=stdin,
                               capture_output=True, text=True, cwd=ROOT, timeout=300,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert piped.returncode == 0 and piped.stdout.splitlines() == expected, piped.stderr[-2000:]
    assert "standard input" in piped.stderr

    export_dir = os.path.join(qat_runs["w8a8"], "export")
    eval_main(["--logdir", qat_runs["w8a8"], "--src", src, "--ref", ref, "--hyp_out", scored])
    out = str(tmp_path / "int.txt")
    capsys.readouterr()
    eval_main(["--engine", "int", "--export", export_dir, "--src", src, "--hyp_out", out])
    printed = capsys.readouterr().out
    assert f"hypotheses in {out}" in printed and "BLEU" not in printed
    assert data_load.read_lines(out) == data_load.read_lines(scored)


def test_the_bleu_line_names_what_it_scored(float_run, qat_runs, corpus, capsys):
    args = ["--src", corpus["dev"][0], "--ref", corpus["dev"][1], "--hyp_out", os.devnull]
    eval_main(["--logdir", float_run, *args])
    best = runs.best_prefix(float_run, runs.kept_best(float_run)[0])
    bleu_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("BLEU = "))
    assert bleu_line.endswith(f"(best checkpoint {best})"), bleu_line
    latest = tf.train.latest_checkpoint(os.path.join(float_run, "ckpt"))
    eval_main(["--logdir", float_run, "--checkpoint", "latest", *args])
    assert f"(latest checkpoint {latest})" in capsys.readouterr().out
    export_dir = os.path.join(qat_runs["w8a8"], "export")
    eval_main(["--engine", "int", "--export", export_dir, *args])
    assert f"(export {export_dir})" in capsys.readouterr().out


def eval_error(argv: list[str], capsys) -> tuple[str, str]:
    """eval.py's error line (exit status 1) and its standard output, run in this process."""
    with pytest.raises(SystemExit) as exit_:
        hparams.run_cli(eval_main, argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err.strip(), captured.out


def test_checkpoint_and_input_mistakes_are_named_before_any_work(qat_runs, corpus, tmp_path, capsys):
    """A mistyped --checkpoint lists the names and the run's checkpoints (the command itself);
    averaged before averaging names the script; a missing --agree_with, --src or --ref is found
    before the model loads (no devices line)."""
    logdir = qat_runs["w4a8"]
    proc = run_cli("eval.py", "--logdir", logdir, "--checkpoint", "bset")
    kept = runs.kept_checkpoints(logdir)
    assert kept and kept[0] == runs.best_prefix(logdir, runs.kept_best(logdir)[0])
    assert_one_line_error(proc, "--checkpoint bset", "best, latest, averaged", *kept)
    err, _ = eval_error(["--logdir", logdir, "--checkpoint", "averaged"], capsys)
    assert err.startswith("error: --checkpoint averaged: ")
    assert f"python scripts/average_checkpoints.py --logdir {logdir}" in err
    src, ref = corpus["dev"]
    missing = str(tmp_path / "nothere.txt")
    for flags, flag in (([*("--src", src, "--ref", ref), "--agree_with", missing], "--agree_with"),
                        (["--src", missing], "--src"), (["--src", src, "--ref", missing], "--ref")):
        err, out = eval_error(["--logdir", logdir, *flags], capsys)
        assert err == f"error: {flag} {missing}: file not found" and "devices:" not in out
    assert eval_error(["--logdir", logdir, "--ref", ref], capsys)[0] == (
        "error: --ref needs --src (the German side of the references)")


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_an_export_travels(qat_runs, corpus, tmp_path):
    """An export holds no absolute path; moved to another folder it still evaluates to the same
    BLEU, and evaluating it writes nothing into it."""
    original = os.path.join(qat_runs["w8a8"], "export")
    manifest = export_format.read_manifest(original)
    assert not [s for s in strings(manifest) if os.path.isabs(s)], strings(manifest)
    assert manifest["spm"] == {"path": "spm.model", "sha256": manifest["spm"]["sha256"]}
    moved = str(tmp_path / "elsewhere" / "export")
    shutil.copytree(original, str(tmp_path / "copy"))
    shutil.move(str(tmp_path / "copy"), moved)
    before = sorted(os.listdir(moved))
    results = []
    for export_dir in (original, moved):
        out = str(tmp_path / f"{len(results)}.json")
        eval_main(["--engine", "int", "--export", export_dir, "--src", corpus["dev"][0],
                   "--ref", corpus["dev"][1], "--json", out])
        results.append(json.load(open(out))["bleu"])
    assert results[0] == results[1]
    assert sorted(os.listdir(moved)) == before and "test_hyp_int.txt" not in os.listdir(original)
