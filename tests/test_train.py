"""train.py end to end on tiny data: overfitting, fine-tuning, QAT, resuming, best checkpoints,
averaging, atomic writes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, TINY, checkpoint_values, eval_main, train_set_bleu

import data_load
import hparams
import quant
import runs
import train
from hparams import train_parser
from integer import (
    loader,
)
from model import load_weights


def test_tiny_model_overfits_200_pairs(float_run, corpus, tmp_path):
    result = train_set_bleu(float_run, corpus, str(tmp_path / "bleu.json"))
    assert result["n_sentences"] == 200
    assert result["bleu"] > 90, result
    assert {"bleu", "signature", "decode_seconds", "test_set", "checkpoint"} <= set(result)


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
    with pytest.raises(FileNotFoundError, match="python scripts/average_checkpoints.py --logdir"):
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


def test_integer_only_fine_tuning_from_a_w8a8_run_cli(intonly_run, qat_runs, corpus, tmp_path):
    """--integer_only --init_from a W8A8 run (conftest's intonly_run): only the new sites are
    calibrated, the model stays close to its parent on the training set, and its export runs in the
    integer-only engine token for token like the TF model, with LayerNorm and softmax golden vectors."""
    logdir = intonly_run
    # 2+2 blocks: 4 + 6 LayerNorms, each with an input, gamma and output site, and the embedding sum
    with open(os.path.join(os.path.dirname(logdir), "train.log")) as log:
        assert "calibrated 31 of 115 sites" in log.read()  # 6 fixed softmax sites aside
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
    assert len(index["sentences"]) == 2 and index["engine"] == "integer_only"
    kinds = {op["op"] for op in index["sentences"][0]["ops"]}
    assert kinds >= {"layer_norm", "softmax", "residual", "argmax"}


def test_dev_bleu_is_greedy_unless_dev_beam(monkeypatch, tmp_path):
    """--beam is the test translation's; each epoch's dev BLEU (which keep-best and patience
    follow) decodes with --dev_beam, greedy by default."""
    beams = []

    def translate(model, sp, lines, hp, beam=None, **_):
        beams.append(hp.beam if beam is None else beam)
        return list(lines)

    monkeypatch.setattr(runs, "translate", translate)
    writer = tf.summary.create_noop_writer()
    splits = {"dev": (["ein Satz"], ["a sentence"])}
    for dev_beam in (1, 3):
        hp = hparams.train_parser().parse_args(["--logdir", str(tmp_path), "--beam", "4",
                                                *(["--dev_beam", str(dev_beam)] if dev_beam > 1 else [])])
        train.evaluate_dev(None, None, splits, hp, 1, writer, 1)
    assert beams == [1, 3]
