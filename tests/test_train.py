"""train.py / eval.py end to end on tiny data: overfitting, resuming, mirrored, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import data_load
import demo_corpus
import eval as eval_script
import hparams
import intmodel
import train
from hparams import train_parser
from model import Transformer

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


def checkpoint_values(logdir):
    reader = tf.train.load_checkpoint(os.path.join(logdir, "ckpt"))
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
    eval_script.main(["--logdir", logdir, "--src", corpus["train"][0], "--ref", corpus["train"][1],
                      "--json", out])
    return json.load(open(out))


def test_tiny_model_overfits_200_pairs(float_run, corpus, tmp_path):
    result = train_set_bleu(float_run, corpus, str(tmp_path / "bleu.json"))
    assert result["n_sentences"] == 200
    assert result["bleu"] > 90, result
    assert {"bleu", "signature", "decode_seconds", "test_set", "checkpoint"} <= set(result)


@pytest.fixture(scope="module")
def qat_runs(float_run, tmp_path_factory):
    """W8A8 and W4A8 QAT fine-tuned from the float run (train.py exports each to <logdir>/export)."""
    runs = {}
    for preset in ("w8a8", "w4a8"):
        runs[preset] = str(tmp_path_factory.mktemp(preset) / "run")
        train.main(["--logdir", runs[preset], "--init_from", float_run, "--quant", preset,
                    "--num_epochs", "3", "--lr", "5e-4", "--warmup_steps", "10", "--dev_max_sentences", "5"])
    return runs


def test_w8a8_qat_stays_within_one_bleu_of_its_float_parent(float_run, qat_runs, corpus, tmp_path, capsys):
    parent = train_set_bleu(float_run, corpus, str(tmp_path / "float.json"))["bleu"]
    quantized = train_set_bleu(qat_runs["w8a8"], corpus, str(tmp_path / "w8a8.json"))["bleu"]
    assert quantized >= parent - 1.0, (parent, quantized)
    # post-training quantization of the parent runs from eval.py too
    eval_script.main(["--logdir", float_run, "--quant", "w8a8", "--json", str(tmp_path / "ptq.json")])
    assert "post-training quantization: w8a8" in capsys.readouterr().out


def test_qat_run_reports_its_thresholds(qat_runs):
    calibration = json.load(open(os.path.join(qat_runs["w8a8"], "calibration.json")))
    assert len(calibration) == 90
    assert os.path.exists(os.path.join(qat_runs["w8a8"], "export", "manifest.json"))


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_integer_engine_translates_token_for_token_like_tf(qat_runs, corpus, preset):
    """The exported integers, run by the NumPy engine, give the TF fake-quant model's outputs."""
    logdir = qat_runs[preset]
    hp = eval_script.restore_hparams(hparams.eval_parser(), ["--logdir", logdir])
    model, sp, _, _ = eval_script.load_model(hp)
    lines = data_load.read_lines(corpus["train"][0])
    engine = intmodel.IntTransformer.load(os.path.join(logdir, "export"))
    tf_ids, int_ids = [], []
    for _, src in data_load.eval_batches(data_load.encode_source(sp, lines), 64):
        tf_ids += [data_load.strip_ids(r) for r in model.greedy(tf.constant(src)).numpy()]
        int_ids += [data_load.strip_ids(r) for r in engine.greedy(src)]
    same = sum(a == b for a, b in zip(tf_ids, int_ids))
    assert same == len(lines), f"{same}/{len(lines)} identical"
    assert max(s["bits"] for s in engine.accumulator_stats().values()) <= 32


def test_eval_int_engine_cli(qat_runs, corpus, tmp_path, capsys):
    export_dir = os.path.join(qat_runs["w8a8"], "export")
    tf_json, int_json = str(tmp_path / "tf.json"), str(tmp_path / "int.json")
    args = ["--src", corpus["dev"][0], "--ref", corpus["dev"][1]]
    eval_script.main(["--logdir", qat_runs["w8a8"], *args, "--json", tf_json,
                      "--hyp_out", str(tmp_path / "tf.txt")])
    eval_script.main(["--engine", "int", "--export", export_dir, *args, "--json", int_json,
                      "--agree_with", str(tmp_path / "tf.txt"), "--hyp_out", str(tmp_path / "int.txt"),
                      "--dump_vectors", "2", "--out", str(tmp_path / "vectors")])
    tf_result, int_result = json.load(open(tf_json)), json.load(open(int_json))
    assert int_result["bleu"] == tf_result["bleu"] and int_result["token_agreement"] == 100.0
    assert int_result["engine"] == "int" and int_result["n_sentences"] == 20
    assert os.path.exists(tmp_path / "vectors" / "index.json")
    assert "BLEU = " in capsys.readouterr().out


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


def test_mirrored_step_equals_single_device_step():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (configured in conftest.py)")
    hp = train_parser().parse_args(["--logdir", "unused", *TINY, "--dropout_rate", "0", "--lr", "1"])
    rng = np.random.default_rng(0)
    src = rng.integers(4, 50, size=(6, 7)).astype(np.int32)
    tgt = np.concatenate([np.full((6, 1), 2), rng.integers(4, 50, size=(6, 5)), np.full((6, 1), 3)], 1)
    tgt = tgt.astype(np.int32)
    n_tokens = tf.constant(float(np.count_nonzero(tgt[:, 1:])))

    def one_step(strategy, init=None):
        with strategy.scope():
            model = Transformer(hp, 50)
            if init is not None:
                for v, value in zip(model.trainable_variables, init):
                    v.assign(value)
            opt = train.Optimizers(model, hp)
            # eps=1 keeps the update ~ lr * g: with the default eps, Adam's first step is
            # lr * sign(g), which turns float noise on near-zero gradients into +-lr
            opt.adam.eps = 1.0
        step = train.make_train_step(model, strategy, opt, train_thresholds=False)
        step(*train.distribute(strategy, src, tgt), n_tokens)
        return [v.numpy() for v in model.trainable_variables]

    tf.random.set_seed(0)
    with tf.distribute.get_strategy().scope():
        init = [v.numpy() for v in Transformer(hp, 50).trainable_variables]
    single = one_step(tf.distribute.get_strategy(), init)
    mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), init)
    moved = [np.abs(s - i).max() for s, i in zip(single, init)]
    assert max(moved) > 0
    for s, m in zip(single, mirrored):
        np.testing.assert_allclose(s, m, rtol=1e-6, atol=1e-9)


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


def test_error_missing_checkpoint(tmp_path):
    proc = run_cli("eval.py", "--logdir", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path))


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
