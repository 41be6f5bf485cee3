"""eval.py on tiny trained runs: the integer engine against TF, exports, the engines' CLI."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import eval_main, npz_arrays

import data_load
import hparams
import runs
from integer import (
    decoding,
    export_format,
    loader,
    token_ids,
)


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
