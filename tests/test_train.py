"""train.py / eval.py end to end on tiny data: overfitting, resuming, mirrored, errors."""

import argparse
import copy
import importlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import data_load
import hparams
import modules
import quant
import runs
import train
from corpus import demo as demo_corpus
from hparams import train_parser
from integer import (
    atomic_files,
    bitbudget,
    calibration,
    decoding,
    export_format,
    loader,
    site_names,
    token_ids,
)
from model import Transformer, load_weights

# eval.py's main, for the tests that run it in-process (`import eval` would shadow the builtin)
eval_main = importlib.import_module("eval").main


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d_model", "32", "--d_ff", "64", "--num_blocks", "1", "--num_heads", "4",
        "--vocab_size", "300", "--batch_tokens", "400", "--warmup_steps", "30", "--lr", "3e-3"]


def write_pairs(folder, name, pairs):
    for side, lang in ((0, "de"), (1, "en")):
        with open(os.path.join(folder, f"{name}.{lang}"), "w") as f:
            f.write("\n".join(p[side] for p in pairs) + "\n")
    return [os.path.join(folder, f"{name}.{lang}") for lang in ("de", "en")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    pairs = demo_corpus.generate_pairs(240, seed=7)
    train_de, train_en = write_pairs(folder, "train", pairs[:200])
    dev_de, dev_en = write_pairs(folder, "dev", pairs[200:220])
    return dict(folder=str(folder), train=(train_de, train_en), dev=(dev_de, dev_en),
                flags=["--train_src", train_de, "--train_tgt", train_en, "--dev_src", dev_de,
                       "--dev_tgt", dev_en, "--test_src", dev_de, "--test_tgt", dev_en,
                       "--spm_dir", str(folder)])


def checkpoint_values(logdir, step=None):
    """Every saved value of the latest checkpoint of logdir (or of ckpt-<step>), by name."""
    folder = os.path.join(logdir, "ckpt")
    reader = tf.train.load_checkpoint(folder if step is None else os.path.join(folder, f"ckpt-{step}"))
    skip = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter")
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.split("/")[0] not in skip)
    return {n: reader.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def float_run(corpus, tmp_path_factory):
    """A tiny float model trained to overfit the 200 training pairs."""
    logdir = str(tmp_path_factory.mktemp("float") / "run")
    train.main(["--logdir", logdir, *TINY, *corpus["flags"], "--d_model", "64", "--d_ff", "256",
                "--num_blocks", "2", "--dropout_rate", "0", "--smoothing", "0", "--num_epochs", "70",
                "--dev_max_sentences", "5"])
    return logdir


def train_set_bleu(logdir, corpus, out):
    eval_main(["--logdir", logdir, "--src", corpus["train"][0], "--ref", corpus["train"][1], "--json", out])
    return json.load(open(out))


def test_tiny_model_overfits_200_pairs(float_run, corpus, tmp_path):
    result = train_set_bleu(float_run, corpus, str(tmp_path / "bleu.json"))
    assert result["n_sentences"] == 200
    assert result["bleu"] > 90, result
    assert {"bleu", "signature", "decode_seconds", "test_set", "checkpoint"} <= set(result)


@pytest.fixture(scope="module")
def qat_runs(float_run, tmp_path_factory):
    """W8A8 and W4A8 QAT fine-tuned from the float run (train.py exports each to <logdir>/export)."""
    logdirs = {}
    for preset in ("w8a8", "w4a8"):
        logdirs[preset] = str(tmp_path_factory.mktemp(preset) / "run")
        train.main(["--logdir", logdirs[preset], "--init_from", float_run, "--quant", preset,
                    "--num_epochs", "3", "--lr", "5e-4", "--warmup_steps", "10", "--dev_max_sentences", "5",
                    "--threshold_log_every", "5"])
    return logdirs


def test_init_from_takes_a_fine_tuning_schedule_and_the_best_checkpoint(float_run, capsys):
    parser = train_parser()
    argv = ["--logdir", "unused", "--init_from", float_run, "--lr", "1e-3"]
    hp = parser.parse_args(argv)
    path = train.inherit_from_parent(hp, hparams.explicit_flags(parser, argv))
    assert (hp.num_epochs, hp.lr, hp.warmup_steps) == (2, 1e-3, 100)  # --lr typed: kept
    assert "fine-tuning schedule (--init_from): --num_epochs 2 --warmup_steps 100" in capsys.readouterr().out
    assert path == runs.resolve_checkpoint(float_run) and os.sep + "best" + os.sep in path


def test_w8a8_qat_stays_within_one_bleu_of_its_float_parent(float_run, qat_runs, corpus, tmp_path, capsys):
    parent = train_set_bleu(float_run, corpus, str(tmp_path / "float.json"))["bleu"]
    quantized = train_set_bleu(qat_runs["w8a8"], corpus, str(tmp_path / "w8a8.json"))["bleu"]
    assert quantized >= parent - 1.0, (parent, quantized)
    # post-training quantization of the parent runs from eval.py too
    eval_main(["--logdir", float_run, "--quant", "w8a8", "--json", str(tmp_path / "ptq.json")])
    assert "post-training quantization: w8a8" in capsys.readouterr().out


def test_qat_run_reports_its_thresholds(qat_runs):
    at_calibration = json.load(open(os.path.join(qat_runs["w8a8"], "calibration.json")))
    assert len(at_calibration) == 90
    assert os.path.exists(os.path.join(qat_runs["w8a8"], "export", "manifest.json"))


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


def npz_arrays(export_dir):
    with np.load(os.path.join(export_dir, "model.npz")) as npz:
        return {key: npz[key] for key in npz.files}


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


def test_input_pipeline_yields_the_batches_in_order_with_their_token_counts():
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (1, 9), (7, 2), (2, 4), (5, 6)]
    batches = [(rng.integers(0, 9, (r, c), np.int32), rng.integers(0, 9, (r, c + 2), np.int32))
               for r, c in shapes]
    got = list(train.input_pipeline(batches, depth=2))
    assert len(got) == len(batches)
    for (src, tgt), (s, t, n_tgt, n_all) in zip(batches, got):
        np.testing.assert_array_equal(s.numpy(), src)
        np.testing.assert_array_equal(t.numpy(), tgt)
        assert n_tgt.dtype == tf.float32 and float(n_tgt) == np.count_nonzero(tgt[:, 1:])
        assert int(n_all) == np.count_nonzero(src) + np.count_nonzero(tgt[:, 1:])


def test_resume_after_interruption_gives_the_same_weights(corpus, tmp_path):
    common = [*TINY, *corpus["flags"], "--dropout_rate", "0.2", "--ckpt_every", "2", "--num_epochs", "2"]
    # 15 batches an epoch: the resumed run finishes epoch 1 mid-way and goes into epoch 2
    train.main(["--logdir", str(tmp_path / "a"), *common, "--max_steps", "18"])
    train.main(["--logdir", str(tmp_path / "b"), *common, "--max_steps", "5"])  # interrupted here
    train.main(["--logdir", str(tmp_path / "b"), *common, "--max_steps", "18"])  # ... and resumed
    a, b = checkpoint_values(str(tmp_path / "a")), checkpoint_values(str(tmp_path / "b"))
    assert a.keys() == b.keys() and sum(k.startswith("model/") for k in a) > 10
    assert any("/m/" in k for k in a) and "model/rng/_state_var/.ATTRIBUTES/VARIABLE_VALUE" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_best_checkpoints_patience_and_the_test_bleu_line(corpus, tmp_path, monkeypatch, capsys):
    """Dev BLEU 3, 7, 5, 4, ... (faked): --keep_best 2 keeps epochs 2 and 3 through the worse
    4th and deletes the others' files; --patience 2 stops after epoch 4, also when re-run; the
    run ends with the test BLEU of the best checkpoint, which holds the weights the run had after
    epoch 2, and eval.py / --init_from read it by default."""
    scores = iter([3.0, 7.0, 5.0, 4.0, 9.0, 9.0])

    def fake_dev(model, sp, splits, hp, epoch, writer, step):
        score = next(scores)
        hparams.write_json(os.path.join(hp.logdir, "dev_bleu.json"), train.dev_history(hp.logdir) + [
            {"epoch": epoch, "step": step, "dev_bleu": score}])
        return score

    monkeypatch.setattr(train, "evaluate_dev", fake_dev)
    logdir = str(tmp_path / "run")
    argv = ["--logdir", logdir, *TINY, *corpus["flags"], "--num_epochs", "6", "--keep_best", "2",
            "--patience", "2", "--keep_checkpoints", "10"]
    train.main(argv)
    with open(os.path.join(logdir, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs"] == 4 and summary["stopped_early"]
    assert 0 <= summary["input_wait_fraction"] < 1
    kept = runs.kept_best(logdir)
    assert [(e["epoch"], e["dev_bleu"]) for e in kept] == [(2, 7.0), (3, 5.0)]
    files = {f"{e['checkpoint']}.{ext}" for e in kept for ext in ("index", "data-00000-of-00001")}
    assert set(os.listdir(os.path.join(logdir, "best"))) == files | {"best.json"}
    best = tf.train.load_checkpoint(os.path.join(logdir, "best", kept[0]["checkpoint"]))
    at_epoch_2 = checkpoint_values(logdir, kept[0]["step"])
    names = [n for n in best.get_variable_to_shape_map() if n.startswith("model/")]
    assert len(names) > 10
    for name in names:
        np.testing.assert_array_equal(best.get_tensor(name), at_epoch_2[name], err_msg=name)
    test = summary["test"]
    assert (test["checkpoint"], test["epoch"], test["step"]) == ("best", 2, kept[0]["step"])
    assert 0 <= test["greedy_bleu"] <= 100 and "beam_bleu" not in test
    out = capsys.readouterr().out
    assert "early stop after epoch 4" in out
    assert f"test BLEU on {corpus['dev'][0]}: greedy {test['greedy_bleu']:.2f}; best checkpoint " \
           f"(epoch 2, dev BLEU 7.00)" in out
    assert runs.resolve_checkpoint(logdir) == runs.resolve_checkpoint(logdir, "best") == \
        os.path.join(logdir, "best", kept[0]["checkpoint"])
    assert runs.resolve_checkpoint(logdir, "latest").endswith(f"ckpt-{summary['steps']}")
    train.main(argv)  # the patience is spent: a re-run trains no further
    assert checkpoint_values(logdir)["optimizer/adam/t/.ATTRIBUTES/VARIABLE_VALUE"] == summary["steps"]
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        runs.resolve_checkpoint(logdir, "averaged")


def test_averaging_checkpoints(float_run, tmp_path, capsys):
    """The mean of one checkpoint taken three times is that checkpoint, of two the elementwise
    mean (float64, rounded once); the script writes <logdir>/averaged, which eval.py reads."""
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", float_run])
    model = runs.load_model(hp)[0]
    paths = tf.train.get_checkpoint_state(os.path.join(float_run, "ckpt")).all_model_checkpoint_paths
    values = []
    for path in paths[-2:]:
        load_weights(model, path)
        values.append([v.numpy() for v in model.variables])
    assert any(np.any(a != b) for a, b in zip(*values))
    runs.average_weights(model, [paths[-1]] * 3)
    for variable, value in zip(model.variables, values[1]):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.name)
    runs.average_weights(model, list(paths[-2:]))
    for variable, a, b in zip(model.variables, *values):
        expected = ((a.astype(np.float64) + b.astype(np.float64)) / 2).astype(a.dtype)
        np.testing.assert_array_equal(variable.numpy(), expected, err_msg=variable.name)
    script = os.path.join(ROOT, "scripts", "average_checkpoints.py")
    proc = subprocess.run([sys.executable, script, "--logdir", float_run, "--last", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(float_run, "averaged", "average.json")) as f:
        assert len(json.load(f)["sources"]) == 2
    eval_main(["--logdir", float_run, "--checkpoint", "averaged", "--json", str(tmp_path / "avg.json")])
    with open(tmp_path / "avg.json") as f:
        assert os.path.basename(os.path.dirname(json.load(f)["checkpoint"])) == "averaged"
    proc = subprocess.run([sys.executable, script, "--logdir", float_run, "--last", "9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --last 9: {float_run}/ckpt keeps 3 checkpoint(s) (train with --keep_checkpoints 9)")


def test_freeze_thresholds_after_n_steps(float_run, tmp_path, monkeypatch, capsys):
    """QAT with --freeze_thresholds_after 3: thresholds train in steps 1-3, then stay at their
    step-3 values (and so does their Adam) while the weights keep training to step 5. Without
    csrc/quant_grad.cc (TF's gradient kernels), which train.py says."""
    monkeypatch.setattr(quant, "GRAD_KERNEL", None)
    logdir = str(tmp_path / "qat")
    train.main(["--logdir", logdir, "--init_from", float_run, "--quant", "w8a8", "--max_steps", "5",
                "--freeze_thresholds_after", "3", "--ckpt_every", "1", "--keep_checkpoints", "10",
                "--num_epochs", "5", "--lr", "5e-4", "--warmup_steps", "10", "--calib", "max"])
    assert "note: _quant_grad.so is not built (make kernel)" in capsys.readouterr().out
    at = {step: checkpoint_values(logdir, step) for step in (1, 3, 5)}
    thresholds = [n for n in at[5] if n.startswith("model/") and "log2_t" in n]
    weights = [n for n in at[5] if n.startswith("model/") and "log2_t" not in n and "rng" not in n]
    th_adam = [n for n in at[5] if n.startswith("optimizer/th_adam/")]
    assert len(thresholds) > 40 and len(weights) > 20 and th_adam
    moved = [n for n in thresholds if np.any(at[1][n] != at[3][n])]
    assert len(moved) >= 0.9 * len(thresholds), f"only {len(moved)} of {len(thresholds)} moved in steps 2-3"
    for name in thresholds + th_adam:
        np.testing.assert_array_equal(at[5][name], at[3][name], err_msg=f"{name} moved after step 3")
    still = [n for n in weights if np.array_equal(at[5][n], at[3][n])]
    assert not still, f"weights frozen too: {still[:3]}"


# Runs train.py as its command line does, except that the KILL_AT_CALL-th call of the training
# step SIGKILLs the process: no handler, no final save, as when a machine goes away.
KILLED_TRAIN = """
import os, signal, sys
import hparams, train

make_train_step, calls = train.make_train_step, []


def killing_make_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def killing_step(*step_args):
        calls.append(None)
        if len(calls) == int(os.environ["KILL_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*step_args)

    return killing_step


train.make_train_step = killing_make_train_step
hparams.run_cli(train.main)
"""


def test_qat_run_killed_between_checkpoints_resumes_bit_for_bit(corpus, tmp_path, capsys):
    """W8A8 QAT (thresholds trained, dropout on) killed at step 5 with checkpoints every 2
    steps, re-run with the same command: resumes from step 4 and ends, at step 8, with the
    weights, thresholds, both Adams and the dropout stream of a run never killed."""
    common = [*TINY, *corpus["flags"], "--quant", "w8a8", "--calib", "max", "--dropout_rate", "0.2",
              "--ckpt_every", "2", "--max_steps", "8"]
    killed = str(tmp_path / "killed")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KILL_AT_CALL="5")
    proc = subprocess.run([sys.executable, "-c", KILLED_TRAIN, "--logdir", killed, *common], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert tf.train.latest_checkpoint(os.path.join(killed, "ckpt")).endswith("ckpt-4")
    train.main(["--logdir", killed, *common])
    assert "ckpt-4 (step 4, epoch 1)" in capsys.readouterr().out
    train.main(["--logdir", str(tmp_path / "whole"), *common])
    a, b = checkpoint_values(str(tmp_path / "whole")), checkpoint_values(killed)
    assert a.keys() == b.keys() and int(a["optimizer/adam/t/.ATTRIBUTES/VARIABLE_VALUE"]) == 8
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for part in ("log2_t", "optimizer/adam/m/", "optimizer/th_adam/v/", "model/rng/"):
        assert any(part in name for name in a), f"no {part} in the checkpoint"


def padded_batch(rng, rows, vocab):
    """(src, tgt) of `rows` sentences of random lengths, padded with PAD to one width."""
    src, tgt = np.full((rows, 9), token_ids.PAD, np.int32), np.full((rows, 8), token_ids.PAD, np.int32)
    for i in range(rows):
        n_src, n_tgt = rng.integers(2, 10), rng.integers(1, 7)
        src[i, :n_src] = rng.integers(4, vocab, n_src)
        src[i, n_src - 1] = token_ids.EOS
        tgt[i, : n_tgt + 2] = [token_ids.BOS, *rng.integers(4, vocab, n_tgt), token_ids.EOS]
    return src, tgt


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_low_precision_matmuls(precision):
    """--mixed_precision: the step's matmuls run in bfloat16 / float16 (variables float32), the
    loss on a fixed batch goes down over 15 steps; fp16 keeps a loss scale in the checkpoint, and
    a step whose scaled gradient overflows changes no weight and halves the scale."""
    hp = train_parser().parse_args(["--logdir", "unused", *TINY, "--dropout_rate", "0",
                                    "--mixed_precision", precision, "--lr", "1e-2", "--warmup_steps", "1"])
    rng = np.random.default_rng(3)
    src, tgt = padded_batch(rng, 8, 50)
    tf.random.set_seed(0)
    model = Transformer(hp, 50, runs.sites_from_flags(hp))
    opt = train.Optimizers(model, hp)
    scale = train.LossScale() if precision == "fp16" else None
    step = train.make_train_step(model, tf.distribute.get_strategy(), opt, False, scale)
    args = (tf.constant(src), tf.constant(tgt), tf.constant(float(np.count_nonzero(tgt[:, 1:]))))
    losses = [float(step(*args)[0]) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
    if precision == "bf16":  # and compiled by XLA (--jit_compile): the step runs and trains on
        jit = train.make_train_step(model, tf.distribute.get_strategy(), opt, False, jit_compile=True)
        jit_losses = [float(jit(*args)[0]) for _ in range(3)]
        assert jit_losses[-1] < losses[-1], jit_losses
        assert "HloModule" in jit.experimental_get_compiler_ir(*args)(stage="hlo")
    graph = step.get_concrete_function(*args).graph
    matmuls = [op for op in graph.get_operations() if op.type in ("MatMul", "BatchMatMulV2")]
    dtype = runs.COMPUTE_DTYPES[precision]
    assert len(matmuls) > 10 and all(op.get_attr("T") == dtype for op in matmuls)
    assert all(v.dtype == tf.float32 for v in model.variables)
    if scale is not None:
        assert float(scale.scale) == 2.0**15 and int(scale.finite_steps) == 15
        scale.scale.assign(2.0**40)  # the float16 gradient of this loss overflows
        before, t = [v.numpy() for v in model.trainable_variables], int(opt.adam.t)
        step(*args)
        assert float(scale.scale) == 2.0**39 and int(opt.adam.t) == t + 1 and int(scale.finite_steps) == 0
        for v, value in zip(model.trainable_variables, before):
            np.testing.assert_array_equal(v.numpy(), value)
    with pytest.raises(ValueError, match="is for float training"):
        train.check_flags(train_parser().parse_args(["--logdir", "x", "--mixed_precision", precision,
                                                     "--quant", "w8a8"]))


def test_mirrored_steps_equal_single_device_steps(two_cpus, fused_grad_op):
    """Four W8A8 steps (thresholds calibrated, then trained with the weights) on uneven shards:
    2 replicas get 3 and 2 rows with different target-token counts, so only dividing every
    replica's loss sum by the *global* count reproduces the single-device update."""
    hp = train_parser().parse_args(["--logdir", "unused", *TINY, "--dropout_rate", "0", "--quant", "w8a8",
                                    "--lr", "1", "--warmup_steps", "1", "--th_lr", "1e-2"])
    vocab, rng = 50, np.random.default_rng(0)
    batches = [padded_batch(rng, 5, vocab) for _ in range(4)]
    for _, tgt in batches:
        counts = [np.count_nonzero(shard[:, 1:]) for shard in np.array_split(tgt, 2)]
        assert counts[0] != counts[1] and np.any(tgt == token_ids.PAD)
    tf.random.set_seed(0)
    calibrated = Transformer(hp, vocab, runs.sites_from_flags(hp))
    calibration.calibrate(calibrated, batches[:2], "max", "max")
    init = [v.numpy() for v in calibrated.variables]

    def train_steps(strategy):
        with strategy.scope():
            model = Transformer(hp, vocab, runs.sites_from_flags(hp))
            for v, value in zip(model.variables, init):
                v.assign(value)
            opt = train.Optimizers(model, hp)
            # eps=1 keeps the weight update ~ lr * g: with eps=1e-9 Adam's first steps are
            # ~ lr * sign(g), which turns float noise on near-zero gradients into +-lr
            opt.adam.eps = 1.0
        step = train.make_train_step(model, strategy, opt, train_thresholds=True)
        losses = []
        for src, tgt, n_tokens, _ in train.input_pipeline(batches):
            args = (*train.distribute(strategy, src, tgt), n_tokens)
            losses.append(float(step(*args)[0]))
        graph_ops = step.get_concrete_function(*args).graph.get_operations()
        # Adam's square roots: where each variable's update runs
        ops = {op.type for op in graph_ops} | {f"Sqrt@{op.device}" for op in graph_ops if op.type == "Sqrt"}
        return losses, {v.name + str(i): v.numpy() for i, v in enumerate(model.variables)}, ops

    single_loss, single, _ = train_steps(tf.distribute.get_strategy())
    mirrored_loss, mirrored, ops = train_steps(tf.distribute.MirroredStrategy(two_cpus))
    assert {"QuantizeAndDequantizeV4", fused_grad_op} <= ops  # the fused kernels ran
    # every device updates its own copies (modules.Adam through strategy.extended.update), none
    # takes the update from the host
    sqrt_on = {o.rsplit("device:", 1)[-1] for o in ops if o.startswith("Sqrt@")}
    assert {device.rsplit("device:", 1)[-1] for device in two_cpus} <= sqrt_on, sqrt_on
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-6)
    thresholds = [name for name in single if "log2_t" in name]
    assert len(thresholds) > 40
    for name, before in zip(single, init):
        moved = np.abs(single[name] - before).max()
        if "log2_t" in name:
            assert moved > 1e-3, f"{name} did not train"
        # the update agrees to 1e-4 of its size (the replica sums only reorder float additions);
        # 1e-8 absolute covers the key biases, whose gradient is zero up to float noise
        np.testing.assert_allclose(mirrored[name], single[name], rtol=1e-6, atol=1e-4 * moved + 1e-8,
                                   err_msg=name)


def test_fused_adam_is_the_same_update_and_resumes_exactly(tmp_path):
    """--fused_adam: TF's ResourceApplyAdam per variable gives the written-out update to float
    rounding, and 2 steps + checkpoint + restore + 1 step equal 3 steps bit for bit."""
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [[tf.constant(rng.standard_normal(v.shape).astype(np.float32)) for v in init] for _ in range(3)]

    def adam(fused):
        variables = [tf.Variable(v) for v in init]
        return variables, modules.Adam(variables, "adam", fused=fused)

    def run(opt, steps):
        update = tf.function(lambda g: opt.apply(g, tf.constant(1e-2)))
        for g in steps:
            update(g)
        return update

    plain, plain_opt = adam(False)
    fused, fused_opt = adam(True)
    run(plain_opt, grads)
    update = run(fused_opt, grads)
    graph = update.get_concrete_function(grads[0]).graph
    assert "ResourceApplyAdam" in {op.type for op in graph.get_operations()}
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
        assert np.any(a.numpy() != init[0 if a.shape == (4, 3) else 1])
    resumed, resumed_opt = adam(True)
    run(resumed_opt, grads[:2])
    path = tf.train.Checkpoint(v=resumed, opt=resumed_opt).write(str(tmp_path / "ckpt"))
    again, again_opt = adam(True)
    tf.train.Checkpoint(v=again, opt=again_opt).read(path).assert_consumed()
    run(again_opt, grads[2:])
    for a, b in zip(again, fused):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_train_like_one_on_the_same_global_batches(corpus, tmp_path):
    """--strategy multiworker: two processes on localhost ports (TF_CONFIG), each the same
    command, split every global batch; after 4 steps the chief's checkpoint holds the weights of
    one process training on the same batches (Adam's first steps are ~lr * sign(g), so float
    noise in a near-zero gradient may flip a few updates: 99% equal to 1e-6, all but the key
    biases within 1e-4).
    Only the chief writes the run: one event file, the worker's own folder deleted."""
    common = [*TINY, *corpus["flags"], "--dropout_rate", "0", "--max_steps", "4", "--dev_max_sentences", "5"]
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    run = str(tmp_path / "run")
    workers = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=config, TF_CPP_MIN_LOG_LEVEL="3")
        workers.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--logdir", run,
                                         "--strategy", "multiworker", *common], env=env, cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    own = re.search(r"this worker's own files go to (\S+) ", outputs[1]).group(1)
    assert not os.path.exists(own) and "worker 1: the chief writes" not in outputs[0]
    assert len([f for f in os.listdir(run) if f.startswith("events.out")]) == 1
    single = str(tmp_path / "single")
    train.main(["--logdir", single, *common])
    a, b = checkpoint_values(run), checkpoint_values(single)
    assert int(a["optimizer/adam/t/.ATTRIBUTES/VARIABLE_VALUE"]) == 4
    names = [n for n in b if n.startswith("model/") and "rng" not in n]
    equal = sum(np.sum(np.abs(a[n] - b[n]) <= 1e-6 * np.maximum(1, np.abs(b[n]))) for n in names)
    assert equal >= 0.99 * sum(b[n].size for n in names)
    for name in names:  # but the key biases: softmax ignores them, their gradient is float noise
        if "/wk/b/" not in name:
            np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=0, err_msg=name)
    proc = run_cli("train.py", "--logdir", str(tmp_path / "x"), *common, "--strategy", "multiworker")
    assert_one_line_error(proc, "--strategy multiworker needs TF_CONFIG")


def run_cli(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in err[-1], err[-1]


def test_error_missing_data_file(tmp_path, corpus):
    proc = run_cli("train.py", "--logdir", str(tmp_path), "--train_src", str(tmp_path / "nope.de"),
                   "--train_tgt", corpus["train"][1])
    assert_one_line_error(proc, "nope.de")


def test_error_heads_do_not_divide_d_model(tmp_path):
    proc = run_cli("train.py", "--logdir", str(tmp_path), "--d_model", "30", "--num_heads", "4")
    assert_one_line_error(proc, "--d_model", "--num_heads")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is visible here")
def test_require_gpu_fails_with_one_line_on_a_cpu_machine(tmp_path, corpus):
    proc = run_cli("train.py", "--logdir", str(tmp_path), *TINY, *corpus["flags"], "--require_gpu")
    assert_one_line_error(proc, "--require_gpu", "sees no GPU", "VARIANT=gpu")
    assert not os.path.exists(os.path.join(str(tmp_path), "ckpt"))


def test_the_devices_line_and_a_mix_of_tensorflow_builds(monkeypatch):
    line = runs.setup_devices(require_gpu=False)
    assert line.startswith("devices: ") and tf.__version__ in line
    assert ("GPU" in line) == bool(tf.config.list_physical_devices("GPU"))
    monkeypatch.setattr(runs, "_installed", lambda name: True)  # tensorflow and tensorflow-cpu
    with pytest.raises(ValueError, match="both tensorflow and tensorflow-cpu are installed"):
        runs.setup_devices(require_gpu=False)


def test_error_not_a_logdir(tmp_path):
    proc = run_cli("eval.py", "--logdir", str(tmp_path))
    assert_one_line_error(proc, os.path.join(str(tmp_path), "hparams.json"), "not found")


def test_error_logdir_without_checkpoint(corpus, tmp_path, capsys):
    """hparams.json and spm.model are there (a run that died before its first checkpoint)."""
    logdir = str(tmp_path / "run")
    hparams.save_hparams(train_parser().parse_args(["--logdir", logdir, *TINY, *corpus["flags"]]), logdir)
    sp = data_load.load_or_train_spm(*data_load.read_parallel(*corpus["train"]), 300, corpus["folder"])
    atomic_files.write_atomic(os.path.join(logdir, "spm.model"), sp.serialized_model_proto())
    with pytest.raises(SystemExit) as exit_:
        hparams.run_cli(eval_main, ["--logdir", logdir])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and len(err.splitlines()) == 1, err
    assert err == f"error: no checkpoint in {os.path.join(logdir, 'ckpt')}"


def bad_inputs(case, folder, corpus):
    """(flags that override the corpus's, words the error line must contain) for one bad input."""
    if case == "corrupt_gz":
        (folder / "train.de.gz").write_bytes(b"not gzip data\n")
        return ["--train_src", str(folder / "train.de.gz")], ["train.de.gz", "cannot read"]
    if case == "line_counts":
        (folder / "short.en").write_text("one\ntwo\n")
        return ["--train_tgt", str(folder / "short.en")], [corpus["train"][0], "short.en", "line-aligned"]
    if case == "xml_segments":
        for lang, ids in (("de", (1, 2, 3)), ("en", (1, 3))):
            segs = "".join(f'<seg id="{i}">s {i}</seg>\n' for i in ids)
            (folder / f"dev.{lang}.xml").write_text(f'<doc docid="7">\n{segs}</doc>\n')
        return (["--dev_src", str(folder / "dev.de.xml"), "--dev_tgt", str(folder / "dev.en.xml")],
                ["dev.en.xml", "segment 2", "dev.de.xml"])
    (folder / "empty.de").write_text("")
    (folder / "empty.en").write_text("")
    return (["--train_src", str(folder / "empty.de"), "--train_tgt", str(folder / "empty.en")],
            ["empty.de", "empty corpus"])


@pytest.mark.parametrize("case", ["corrupt_gz", "line_counts", "xml_segments", "empty"])
def test_error_bad_corpus_cli(case, corpus, tmp_path):
    """Each bad input ends train.py with one line naming the file, exit status 1, no traceback."""
    flags, words = bad_inputs(case, tmp_path, corpus)
    proc = run_cli("train.py", "--logdir", str(tmp_path / "run"), *TINY, *corpus["flags"], *flags)
    assert proc.returncode == 1
    assert_one_line_error(proc, *words)


def test_error_incompatible_checkpoint(corpus, tmp_path):
    logdir = str(tmp_path / "run")
    train.main(["--logdir", logdir, *TINY, *corpus["flags"], "--max_steps", "1"])
    proc = run_cli("eval.py", "--logdir", logdir, "--d_model", "64")
    assert_one_line_error(proc, "checkpoint")
    proc = run_cli("train.py", "--logdir", logdir, *TINY, *corpus["flags"], "--d_ff", "128")
    assert_one_line_error(proc, "--d_ff")


def test_error_vocab_larger_than_corpus(tmp_path, corpus):
    proc = run_cli("train.py", "--logdir", str(tmp_path / "run"), *TINY, *corpus["flags"],
                   "--vocab_size", "50000", "--spm_dir", str(tmp_path))
    assert_one_line_error(proc, "--vocab_size")


def interrupt_replace_of(target, monkeypatch):
    """os.replace onto `target` raises KeyboardInterrupt (Ctrl-C between write and rename)."""
    real_replace = os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == os.path.abspath(target):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_interrupted_atomic_writes_keep_the_old_file(corpus, tmp_path, monkeypatch):
    path = str(tmp_path / "result.json")
    hparams.write_json(path, {"old": 1})
    with pytest.raises(TypeError):
        hparams.write_json(path, {"new": object()})  # fails while serializing
    interrupt_replace_of(path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        hparams.write_json(path, {"new": 2})
    assert json.load(open(path)) == {"old": 1} and os.listdir(tmp_path) == ["result.json"]
    # the SentencePiece model that train.py keeps in the logdir
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "spm.model").write_bytes(b"old")
    hp = train_parser().parse_args(["--logdir", str(logdir), *TINY, *corpus["flags"]])
    interrupt_replace_of(logdir / "spm.model", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.prepare_data(hp)
    assert (logdir / "spm.model").read_bytes() == b"old" and os.listdir(logdir) == ["spm.model"]
    monkeypatch.undo()
    train.prepare_data(hp)
    assert (logdir / "spm.model").read_bytes() != b"old" and os.listdir(logdir) == ["spm.model"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(logdir / "spm.model").st_mode & 0o777 == 0o666 & ~umask  # as open() creates it


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


def test_integer_only_fine_tuning_from_a_w8a8_run_cli(qat_runs, corpus, tmp_path, capsys):
    """--integer_only --init_from a W8A8 run: only the new sites are calibrated, the model stays
    close to its parent on the training set, and its export (format 3) runs in the integer-only
    engine token for token like the TF model, with LayerNorm and softmax golden vectors."""
    logdir = str(tmp_path / "intonly")
    train.main(["--logdir", logdir, "--init_from", qat_runs["w8a8"], "--quant", "w8a8", "--integer_only",
                "--num_epochs", "1", "--lr", "2e-4", "--warmup_steps", "10", "--dev_max_sentences", "5"])
    # 2+2 blocks: 4 + 6 LayerNorms, each with an input, gamma and output site, and the embedding sum
    assert "calibrated 31 of 115 sites" in capsys.readouterr().out  # 6 fixed softmax sites aside
    # the first 60 training pairs: the integer-only TF graph decodes slowly
    for lang, path in zip(("de", "en"), corpus["train"]):
        (tmp_path / f"sample.{lang}").write_text("\n".join(data_load.read_lines(path)[:60]) + "\n")
    args = ["--src", str(tmp_path / "sample.de"), "--ref", str(tmp_path / "sample.en")]
    eval_main(["--logdir", qat_runs["w8a8"], *args, "--json", str(tmp_path / "w8a8.json")])
    parent = json.load(open(tmp_path / "w8a8.json"))["bleu"]
    eval_main(["--logdir", logdir, *args, "--json", str(tmp_path / "tf.json"),
               "--hyp_out", str(tmp_path / "tf.txt")])
    tf_result = json.load(open(tmp_path / "tf.json"))
    assert tf_result["bleu"] >= parent - 3.0, (parent, tf_result["bleu"])
    export_dir = os.path.join(logdir, "export")
    assert type(loader.load_engine(export_dir)).__name__ == "IntOnlyTransformer"
    eval_main(["--engine", "int", "--export", export_dir, *args, "--json", str(tmp_path / "int.json"),
               "--agree_with", str(tmp_path / "tf.txt"), "--dump_vectors", "2",
               "--out", str(tmp_path / "vec")])
    int_result = json.load(open(tmp_path / "int.json"))
    assert int_result["token_agreement"] == 100.0 and int_result["bleu"] == tf_result["bleu"]
    index = json.load(open(tmp_path / "vec" / "index.json"))
    assert {entry.get("op") for entry in index} >= {"layer_norm", "softmax"}


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
