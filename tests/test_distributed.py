"""Training on other devices and precisions: mixed precision, MirroredStrategy, fused Adam, two workers."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, TINY, assert_one_line_error, checkpoint_values, run_cli

import modules
import runs
import train
from hparams import train_parser
from integer import (
    calibration,
    token_ids,
)
from model import Transformer


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
