"""Train the Transformer (float, or TQT-quantized with --quant): python train.py --logdir DIR.

Re-running the same command resumes from the latest checkpoint in DIR (step, optimizer state,
schedule, random stream, position in the epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import data_load
import hparams
from eval import bleu_score, translate
from model import Transformer
from modules import Adam, noam_lr


def check_flags(hp: argparse.Namespace) -> None:
    if hp.d_model % hp.num_heads:
        raise ValueError(f"--d_model {hp.d_model} is not divisible by --num_heads {hp.num_heads}")
    for flag in ("d_model", "d_ff", "num_blocks", "num_heads", "vocab_size", "batch_tokens",
                 "maxlen1", "maxlen2", "num_epochs", "ckpt_every"):
        if getattr(hp, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(hp, flag)}")
    if hp.d_model % 2:
        raise ValueError(f"--d_model {hp.d_model} must be even (sinusoidal positions)")


def check_resume(hp: argparse.Namespace) -> None:
    """A logdir that holds a run must be resumed with the same model flags."""
    path = os.path.join(hp.logdir, "hparams.json")
    if not os.path.exists(path):
        return
    saved = hparams.load_hparams(hp.logdir)
    for key in hparams.MODEL_FLAGS + ("quant", "wbits", "abits", "per_channel", "rounding"):
        if key in saved and saved[key] != getattr(hp, key):
            raise ValueError(f"{path}: the checkpoint there was built with --{key} {saved[key]}, "
                             f"not {getattr(hp, key)}; use another --logdir")


def spm_cache_dir(hp: argparse.Namespace) -> str:
    """Beside the training data when that folder is writable, else in the logdir."""
    if hp.spm_dir:
        return hp.spm_dir
    data_dir = os.path.dirname(os.path.abspath(hp.train_src)) if hp.train_src else (
        hp.demo_dir if hp.data == "demo" else hp.data)
    return data_dir if os.access(data_dir, os.W_OK) else os.path.join(hp.logdir, "spm")


def prepare_data(hp: argparse.Namespace):
    """Corpora, the joint SentencePiece model (copied to <logdir>/spm.model), encoded training set."""
    splits = data_load.load_splits(
        hp.data, hp.dev_set, hp.test_set, train_src=hp.train_src, train_tgt=hp.train_tgt,
        dev_src=hp.dev_src, dev_tgt=hp.dev_tgt, test_src=hp.test_src, test_tgt=hp.test_tgt,
        demo_dir=hp.demo_dir)
    train_de, train_en = splits["train"]
    sp = data_load.load_or_train_spm(train_de, train_en, hp.vocab_size, spm_cache_dir(hp))
    os.makedirs(hp.logdir, exist_ok=True)
    local = os.path.join(hp.logdir, "spm.model")
    with open(local + ".tmp", "wb") as f:
        f.write(sp.serialized_model_proto())
    os.replace(local + ".tmp", local)
    src, tgt, dropped = data_load.filter_by_length(
        data_load.encode_source(sp, train_de), data_load.encode_target(sp, train_en),
        hp.maxlen1, hp.maxlen2)
    if not src:
        raise data_load.DataError(f"no training pair fits --maxlen1 {hp.maxlen1} / --maxlen2 {hp.maxlen2}")
    print(f"data: {len(src)} training pairs ({dropped} longer than maxlen dropped), "
          f"{len(splits['dev'][0])} dev, {len(splits['test'][0])} test, vocab {sp.get_piece_size()}")
    return splits, sp, src, tgt


def make_train_step(model: Transformer, strategy: tf.distribute.Strategy, opt: Adam, hp):
    """One optimizer step on a batch split across the strategy's replicas.

    loss = sum over all target tokens of the label-smoothed cross-entropy / number of tokens;
    each replica divides its partial sum by the *global* token count, so the summed gradients
    equal the single-device gradient exactly.
    """
    variables = model.trainable_variables

    def replica_grads(src, tgt, n_tokens):
        with tf.GradientTape() as tape:
            loss_sum, _ = model.loss(src, tgt, training=True)
            loss = loss_sum / n_tokens
        return tape.gradient(loss, variables), loss_sum

    def step(src, tgt, n_tokens):
        grads, loss_sum = strategy.run(replica_grads, args=(src, tgt, n_tokens))
        grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        loss_sum = strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None)
        lr = noam_lr(opt.t + 1, hp.lr, hp.warmup_steps)
        opt.apply(grads, lr)
        return loss_sum / n_tokens, lr

    if strategy.num_replicas_in_sync == 1:  # plain tensors: one trace for every batch shape
        batch = tf.TensorSpec([None, None], tf.int32)
        return tf.function(step, input_signature=[batch, batch, tf.TensorSpec([], tf.float32)])
    return tf.function(step, reduce_retracing=True)


def distribute(strategy: tf.distribute.Strategy, src: np.ndarray, tgt: np.ndarray):
    """Split a batch row-wise over the replicas (identity with one replica)."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return tf.constant(src), tf.constant(tgt)
    shards = [np.array_split(a, n) for a in (src, tgt)]
    return tuple(strategy.experimental_distribute_values_from_function(
        lambda ctx, s=s: tf.constant(s[ctx.replica_id_in_sync_group])) for s in shards)


def build_strategy(name: str) -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy() if name == "mirrored" else tf.distribute.get_strategy()


def evaluate_dev(model, sp, splits, hp, epoch: int, writer, step: int) -> float:
    de, en = splits["dev"]
    if hp.dev_max_sentences:
        de, en = de[: hp.dev_max_sentences], en[: hp.dev_max_sentences]
    hyps = translate(model, sp, de, hp)
    score, signature = bleu_score(hyps, en)
    with open(os.path.join(hp.logdir, f"dev_hyp_epoch{epoch}.txt"), "w") as f:
        f.write("\n".join(hyps) + "\n")
    with writer.as_default():
        tf.summary.scalar("dev_bleu", score, step=step)
    print(f"epoch {epoch}: dev BLEU = {score:.2f}  ({signature})")
    return score


def main(argv: list[str]) -> None:
    parser = hparams.train_parser()
    hp = parser.parse_args(argv)
    check_flags(hp)
    check_resume(hp)
    tf.random.set_seed(hp.seed)
    splits, sp, train_src, train_tgt = prepare_data(hp)
    hparams.save_hparams(hp, hp.logdir)

    strategy = build_strategy(hp.strategy)
    with strategy.scope():
        model = Transformer(hp, sp.get_piece_size())
        opt = Adam(model.trainable_variables, name="adam")
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, epoch=epoch, batch_in_epoch=batch_in_epoch)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(hp.logdir, "ckpt"), hp.keep_checkpoints)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"resumed from {manager.latest_checkpoint} (step {int(opt.t)}, epoch {int(epoch) + 1})")
    writer = tf.summary.create_file_writer(hp.logdir)
    train_step = make_train_step(model, strategy, opt, hp)

    start = time.time()

    def out_of_budget() -> bool:
        return (hp.max_steps and int(opt.t) >= hp.max_steps) or (
            hp.max_minutes and time.time() - start > 60 * hp.max_minutes)

    while int(epoch) < hp.num_epochs and not out_of_budget():
        batches = data_load.train_batches(train_src, train_tgt, hp.batch_tokens, hp.seed, int(epoch))
        bar = tqdm(batches[int(batch_in_epoch):], desc=f"epoch {int(epoch) + 1}/{hp.num_epochs}",
                   initial=int(batch_in_epoch), total=len(batches), dynamic_ncols=True)
        tokens, t0 = 0, time.time()
        for src, tgt in bar:
            n_tokens = float(np.count_nonzero(tgt[:, 1:]))
            loss, lr = train_step(*distribute(strategy, src, tgt), tf.constant(n_tokens))
            batch_in_epoch.assign_add(1)
            tokens += int(np.count_nonzero(src) + n_tokens)
            step = int(opt.t)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{float(lr):.2e}",
                                tok_s=f"{tokens / (time.time() - t0):.0f}")
                with writer.as_default():
                    tf.summary.scalar("loss", loss, step=step)
                    tf.summary.scalar("lr", lr, step=step)
            if step % hp.ckpt_every == 0:
                manager.save(checkpoint_number=step)
            if out_of_budget():
                break
        bar.close()
        if int(batch_in_epoch) == len(batches):  # a finished epoch: score dev, move on
            epoch.assign_add(1)
            batch_in_epoch.assign(0)
            evaluate_dev(model, sp, splits, hp, int(epoch), writer, int(opt.t))
        manager.save(checkpoint_number=int(opt.t))
    writer.flush()
    summary = {"steps": int(opt.t), "epochs": int(epoch), "minutes": (time.time() - start) / 60}
    print("done: " + json.dumps(summary))


if __name__ == "__main__":
    hparams.run_cli(main)
