"""Train the Transformer, float or TQT-quantized: python train.py --logdir DIR [--quant w8a8].

Re-running the same command resumes from the latest checkpoint in DIR (step, optimizer state,
schedule, random stream, position in the epoch).  After every epoch dev BLEU is scored and the
--keep_best highest are kept in DIR/best (--patience stops when it no longer improves); the run
ends with the test BLEU of its best checkpoint.  `--quant w8a8 --init_from FLOAT_LOGDIR` is
quantization-aware fine-tuning: restore the float weights, calibrate every threshold, train
weights and thresholds together (thresholds with their own Adam).
"""

from __future__ import annotations

import hparams

if __name__ == "__main__":  # --help and a mistyped flag are answered before TensorFlow loads
    hparams.check_command_line(hparams.train_parser())

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm
import tensorflow as tf
from tqdm import tqdm

import data_load
import quant
import runs
from integer import atomic_files, calibration
from integer_tf import export
from model import Transformer, load_weights
from modules import Adam, noam_lr, set_untracked


def check_flags(hp: argparse.Namespace) -> None:
    """What the flags' own ranges (hparams) cannot say: how they go together."""
    if hp.d_model % hp.num_heads:
        raise ValueError(f"--d_model {hp.d_model} is not divisible by --num_heads {hp.num_heads}")
    if hp.d_model % 2:
        raise ValueError(f"--d_model {hp.d_model} must be even (sinusoidal positions)")
    if hp.mixed_precision != "none" and hp.quant != "none":
        raise ValueError(f"--mixed_precision {hp.mixed_precision} is for float training (--quant none): "
                         f"a quantized graph computes in float32 and float64 to match the integer engine")
    runs.quant_config(hp)  # raises on bad bits / overrides


def inherit_from_parent(hp: argparse.Namespace, explicit: set[str]) -> str:
    """--init_from: take the parent run's model and data flags; return its best checkpoint (its
    latest when it kept none)."""
    parent = hparams.load_hparams(hp.init_from, "--init_from")
    for key in hparams.MODEL_FLAGS:
        if key in explicit and getattr(hp, key) != parent.get(key, getattr(hp, key)):
            raise ValueError(f"--{key} {getattr(hp, key)} differs from {parent[key]} of --init_from "
                             f"{hp.init_from}")
    hparams.merge_saved(hp, parent, explicit, hparams.MODEL_FLAGS + hparams.DATA_FLAGS)
    schedule = {k: v for k, v in hparams.FINE_TUNE_SCHEDULE.items() if k not in explicit}
    vars(hp).update(schedule)
    if schedule:
        print("fine-tuning schedule (--init_from): " + " ".join(f"--{k} {v:g}" for k, v in schedule.items())
              + " (type a flag to change it)")
    try:
        return runs.resolve_checkpoint(hp.init_from)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init_from {hp.init_from}: {e}") from None


def check_resume(hp: argparse.Namespace) -> None:
    """A logdir that holds a run must be resumed with the same model and quantization flags."""
    path = os.path.join(hp.logdir, "hparams.json")
    if not os.path.exists(path):
        return
    saved = hparams.load_hparams(hp.logdir)
    for key in hparams.MODEL_FLAGS + hparams.QUANT_FLAGS:
        if key in saved and saved[key] != getattr(hp, key):
            raise ValueError(f"{path}: the run there was built with --{key} {saved[key]}, "
                             f"not {getattr(hp, key)}; use another --logdir")


def spm_cache_dir(hp: argparse.Namespace) -> str:
    """Beside the training data when that folder is writable, else in the logdir."""
    if hp.spm_dir:
        return hp.spm_dir
    data_dir = os.path.dirname(os.path.abspath(hp.train_src)) if hp.train_src else (
        hp.demo_dir if hp.data == "demo" else hp.data)
    return data_dir if os.access(data_dir, os.W_OK) else os.path.join(hp.logdir, "spm")


def prepare_data(hp: argparse.Namespace):
    """Corpora, the joint SentencePiece model (kept as <logdir>/spm.model), encoded training set.

    With --init_from the parent's SentencePiece model is reused (the weights depend on it).
    """
    splits = runs.load_corpus(hp)
    train_de, train_en = splits["train"]
    if hp.init_from:
        sp = spm.SentencePieceProcessor(model_file=runs.spm_path(hp.init_from))
    else:
        sp = data_load.load_or_train_spm(train_de, train_en, hp.vocab_size, spm_cache_dir(hp))
    atomic_files.write_atomic(runs.spm_path(hp.logdir), sp.serialized_model_proto())
    src, tgt, dropped = data_load.encode_training_pairs(sp, train_de, train_en, hp.maxlen1, hp.maxlen2)
    if not src:
        raise data_load.DataError(f"no training pair fits --maxlen1 {hp.maxlen1} / --maxlen2 {hp.maxlen2}")
    if not hp.train_src and hp.data != "demo":
        print(f"data: {hp.data} holds train.tags.de-en ({len(train_de)} pairs) and the sets "
              f"{', '.join(data_load.iwslt_sets(hp.data))}; dev {hp.dev_set}, test {hp.test_set}")
    print(f"data: {len(src)} training pairs ({dropped} longer than maxlen dropped), "
          f"{len(splits['dev'][0])} dev, {len(splits['test'][0])} test, vocab {sp.get_piece_size()}")
    return splits, sp, src, tgt


class Optimizers(tf.Module):
    """Adam on the weights (Noam schedule) and, when quantized, the thresholds' own optimizer
    (quant.ThresholdOptimizer)."""

    def __init__(self, model: Transformer, hp: argparse.Namespace):
        super().__init__(name="optimizers")
        sites = quant.trained_threshold_sites(model.sites.sites.values())
        thresholds = {s.log2_t.ref() for s in sites}
        set_untracked(self, "weights", [v for v in model.trainable_variables if v.ref() not in thresholds])
        self.adam = Adam(self.weights, name="adam", fused=hp.fused_adam)
        set_untracked(self, "threshold_opt", quant.ThresholdOptimizer(sites, hp.th_lr, hp.th_decay_steps,
                                                                       fused=hp.fused_adam))
        self.th_adam = self.threshold_opt.adam  # tracked under this name: the checkpoints' layout
        set_untracked(self, "hp", hp)

    @property
    def sites(self) -> list[quant.QuantSite]:
        """The sites whose thresholds train."""
        return self.threshold_opt.sites

    @property
    def thresholds(self) -> list[tf.Variable]:
        """Their log2_t, in the order of the gradients after the weights'."""
        return self.threshold_opt.variables

    def lr(self) -> tf.Tensor:
        return noam_lr(self.adam.t + 1, self.hp.lr, self.hp.warmup_steps)

    def apply(self, grads: list[tf.Tensor], train_thresholds: bool) -> tf.Tensor:
        lr = self.lr()
        n = len(self.weights)
        if train_thresholds:
            self.threshold_opt.apply(grads[n:], self.adam.t)
        self.adam.apply(grads[:n], lr)
        return lr

    def skip(self) -> tf.Tensor:
        """A batch that changes no weight (an fp16 overflow) still counts as a step: `t` counts
        batches, so the schedule, --max_steps and checkpoint numbers never wait on the device."""
        self.adam.t.assign_add(1)
        return self.lr()


class LossScale(tf.Module):
    """Dynamic loss scaling for float16 training: the loss is multiplied by `scale` before the
    gradient and the gradients divided by it after; a step whose gradients are not all finite is
    skipped and halves the scale, 2000 finite steps in a row double it (checkpointed: resumes)."""

    GROWTH_INTERVAL = 2000

    def __init__(self, initial: float = 2.0**15):
        super().__init__(name="loss_scale")
        self.scale = tf.Variable(initial, trainable=False, name="scale")
        self.finite_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="finite_steps")

    def update(self, finite: tf.Tensor) -> None:
        grow = finite & (self.finite_steps + 1 >= self.GROWTH_INTERVAL)
        self.scale.assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * self.scale)
        self.finite_steps.assign(tf.where(finite & ~grow, self.finite_steps + 1, 0))


def make_train_step(model: Transformer, strategy: tf.distribute.Strategy, opt: Optimizers,
                    train_thresholds: bool, loss_scale: LossScale | None = None,
                    jit_compile: bool = False):
    """One optimizer step on a batch split across the strategy's replicas.

    loss = (sum over all target tokens of the label-smoothed cross-entropy) / (number of tokens);
    each replica divides its partial sum by the *global* token count, so the summed replica
    gradients equal the single-device gradient. With `loss_scale` (float16) the gradient is taken
    of the scaled loss, and a step with a non-finite gradient changes nothing but the scale.
    `jit_compile`: XLA compiles the step (once per batch shape).
    """
    variables = opt.weights + (opt.thresholds if train_thresholds else [])

    def replica_grads(src, tgt, n_tokens):
        with tf.GradientTape() as tape:
            loss_sum, _ = model.loss(src, tgt, training=True)
            loss = loss_sum / n_tokens
            if loss_scale is not None:
                loss = loss * loss_scale.scale
        grads = tape.gradient(loss, variables)
        if loss_scale is not None:
            grads = [g / loss_scale.scale for g in grads]
        return grads, loss_sum

    def step(src, tgt, n_tokens):
        grads, loss_sum = strategy.run(replica_grads, args=(src, tgt, n_tokens))
        if strategy.num_replicas_in_sync > 1:  # summed onto every variable's devices (all-reduce)
            grads = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, list(zip(grads, variables)))
        else:
            grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        loss_sum = strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None)
        if loss_scale is None:
            lr = opt.apply(grads, train_thresholds)
        else:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            lr = tf.cond(finite, lambda: opt.apply(grads, train_thresholds), opt.skip)
            loss_scale.update(finite)
        return loss_sum / n_tokens, lr

    if strategy.num_replicas_in_sync == 1:  # plain tensors: one trace for every batch shape
        batch = tf.TensorSpec([None, None], tf.int32)
        return tf.function(step, input_signature=[batch, batch, tf.TensorSpec([], tf.float32)],
                           jit_compile=jit_compile)
    return tf.function(step, reduce_retracing=True, jit_compile=jit_compile)


def input_pipeline(batches: list[tuple[np.ndarray, np.ndarray]], depth: int = 4) -> tf.data.Dataset:
    """(src, tgt, target tokens, all tokens) tensors of the given batches, in order, made by
    tf.data's threads up to `depth` batches ahead of the train step."""
    spec = tf.TensorSpec([None, None], tf.int32)

    def counted(src, tgt):
        n_tgt = tf.math.count_nonzero(tgt[:, 1:])  # the loss's tokens (BOS is input, not target)
        return src, tgt, tf.cast(n_tgt, tf.float32), tf.math.count_nonzero(src) + n_tgt

    # one thread and no autotuning: the work per batch is tiny, and tf.data's default threads
    # otherwise compete with the train step's on a small CPU (slowing some steps by a third)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=(spec, spec))
    return dataset.map(counted).prefetch(depth).with_options(options)


def distribute(strategy: tf.distribute.Strategy, src: tf.Tensor, tgt: tf.Tensor):
    """Split a batch row-wise over the replicas (identity with one replica)."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return src, tgt
    shards = [np.array_split(a.numpy(), n) for a in (src, tgt)]
    return tuple(strategy.experimental_distribute_values_from_function(
        lambda ctx, s=s: tf.constant(s[ctx.replica_id_in_sync_group])) for s in shards)


def build_strategy(name: str) -> tf.distribute.Strategy:
    """none: one device; mirrored: every local GPU; multiworker: MultiWorkerMirroredStrategy over
    the cluster in TF_CONFIG (this process is the task TF_CONFIG names)."""
    if name == "multiworker":
        if not json.loads(os.environ.get("TF_CONFIG", "{}")).get("task"):
            raise ValueError("--strategy multiworker needs TF_CONFIG with the cluster and this "
                             "process's task, e.g. {\"cluster\": {\"worker\": [\"host1:port\", "
                             "\"host2:port\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy() if name == "mirrored" else tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run: always, but in a multi-worker cluster only the chief
    (task "chief", or worker 0 when the cluster names no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


def private_logdir(run_dir: str) -> str:
    """A non-chief worker's own folder for everything train.py writes (deleted at the end): it
    starts from the run's dev history and best checkpoints, so that its --patience and best
    choices, made on the same dev BLEU, stay the chief's."""
    folder = tempfile.mkdtemp(prefix="worker_")
    for name in ("dev_bleu.json", runs.BEST):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(folder, name))
        elif os.path.exists(path):
            shutil.copy(path, folder)
    return folder


def dev_history(logdir: str) -> list[dict]:
    """Every epoch's dev BLEU so far (<logdir>/dev_bleu.json, evaluate_dev)."""
    path = os.path.join(logdir, "dev_bleu.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def evaluate_dev(model, sp, splits, hp, epoch: int, writer, step: int) -> float:
    de, en = splits["dev"]
    if hp.dev_max_sentences:
        de, en = de[: hp.dev_max_sentences], en[: hp.dev_max_sentences]
    hyps = runs.translate(model, sp, de, hp, beam=hp.dev_beam)
    score, signature = runs.bleu_score(hyps, en)
    with open(os.path.join(hp.logdir, f"dev_hyp_epoch{epoch}.txt"), "w") as f:
        f.write("\n".join(hyps) + "\n")
    with writer.as_default():
        tf.summary.scalar("dev_bleu", score, step=step)
    tqdm.write(f"epoch {epoch}: dev BLEU = {score:.2f}  ({signature})")
    curve = dev_history(hp.logdir) + [{"epoch": epoch, "step": step, "dev_bleu": round(score, 2),
                                        "signature": signature}]
    hparams.write_json(os.path.join(hp.logdir, "dev_bleu.json"), curve)
    return score


def epochs_without_improvement(logdir: str) -> int:
    """Epochs scored since the first one with the highest dev BLEU (0 when none were scored)."""
    scores = [entry["dev_bleu"] for entry in dev_history(logdir)]
    return len(scores) - 1 - scores.index(max(scores)) if scores else 0


def keep_if_best(model: Transformer, logdir: str, keep: int, entry: dict) -> None:
    """Save the model (weights and thresholds) as <logdir>/best/ckpt-<step> when its dev BLEU is
    among the `keep` highest so far (a tie keeps the earlier epoch); best.json lists the kept
    ones, best first, and is replaced atomically before a dropped one's files are deleted."""
    kept = runs.kept_best(logdir)
    if keep <= 0 or (len(kept) >= keep and entry["dev_bleu"] <= kept[-1]["dev_bleu"]):
        return
    folder = os.path.join(logdir, runs.BEST)
    entry = {**entry, "checkpoint": f"ckpt-{entry['step']}"}
    tf.train.Checkpoint(model=model).write(os.path.join(folder, entry["checkpoint"]))
    kept = sorted([e for e in kept if e["checkpoint"] != entry["checkpoint"]] + [entry],
                  key=lambda e: -e["dev_bleu"])  # stable: earlier epochs first among equals
    hparams.write_json(os.path.join(folder, "best.json"), kept[:keep])
    for dropped in kept[keep:]:
        for path in glob.glob(os.path.join(folder, dropped["checkpoint"] + ".*")):
            os.remove(path)
    if kept[0] is entry:
        tqdm.write(f"new best dev BLEU {entry['dev_bleu']:.2f}: {os.path.join(folder, entry['checkpoint'])}")


def score_test(model: Transformer, sp, splits, hp: argparse.Namespace) -> dict:
    """Test BLEU of the run's best checkpoint (its latest when it kept none), greedy, and with
    --beam > 1 also beam search; `model` is left holding that checkpoint."""
    best = runs.kept_best(hp.logdir)
    result = {"test_set": hp.test_src or f"{hp.data}:{hp.test_set}", "checkpoint": "latest"}
    if best:
        load_weights(model, runs.best_prefix(hp.logdir, best[0]))
        result.update(checkpoint="best", epoch=best[0]["epoch"], step=best[0]["step"])
    de, en = splits["test"]
    result["greedy_bleu"] = round(runs.bleu_score(runs.translate(model, sp, de, hp, beam=1), en)[0], 2)
    if hp.beam > 1:
        result["beam"] = hp.beam
        result["beam_bleu"] = round(runs.bleu_score(runs.translate(model, sp, de, hp), en)[0], 2)
    where = "" if not best else f" (epoch {best[0]['epoch']}, dev BLEU {best[0]['dev_bleu']:.2f})"
    beam = f", beam {hp.beam} {result['beam_bleu']:.2f}" if hp.beam > 1 else ""
    print(f"test BLEU on {result['test_set']}: greedy {result['greedy_bleu']:.2f}{beam}; "
          f"{result['checkpoint']} checkpoint{where}")
    return result


def log_thresholds(sites: list, writer, step: int) -> None:
    """Every site's log2_t and fractional bits f as summaries (the scales visibly train)."""
    with writer.as_default():
        for site in sites:
            tf.summary.scalar(f"log2_t/{site.site_name}", tf.reduce_mean(site.log2_t), step=step)
            tf.summary.scalar(f"frac_bits/{site.site_name}", float(np.mean(site.frac_bits())), step=step)


def calibrate(model: Transformer, sites: list, batches: list, hp: argparse.Namespace,
              names: list[str]) -> None:
    """Calibrate the thresholds of the named sites (those the parent checkpoint lacked: all of
    a float parent's) and record every site's fractional bits (calibration.json)."""
    t0 = time.time()
    calibration.calibrate(model, batches[: hp.calib_batches], hp.calib, hp.weight_init, names)
    hparams.write_json(os.path.join(hp.logdir, "calibration.json"),
                       {s.site_name: s.frac_bits().tolist() for s in sites})
    print(f"calibrated {len(names)} of {len(sites)} sites ({hp.calib} on "
          f"{min(hp.calib_batches, len(batches))} batches, weights by {hp.weight_init}) in "
          f"{time.time() - t0:.1f} s")


def site_table(sites, clip_fractions: dict[str, float] | None = None) -> str:
    """A text table of the sites: name, bits, signed, threshold 2^ceil(log2_t), f, % clipped."""
    rows = [f"{'site':58s} {'bits':>4s} {'sign':>4s} {'threshold':>10s} {'f':>4s} {'clipped':>8s}"]
    for site in sites:
        f = site.frac_bits()
        t = site.threshold()
        f_text = str(int(f)) if f.ndim == 0 else f"{int(f.min())}..{int(f.max())}"
        t_text = f"{float(t):g}" if t.ndim == 0 else f"{float(t.min()):g}.."
        clipped = "" if clip_fractions is None else f"{100 * clip_fractions[site.site_name]:7.3f}%"
        rows.append(f"{site.site_name:58s} {site.num_bits:4d} {'s' if site.signed else 'u':>4s} "
                    f"{t_text:>10s} {f_text:>4s} {clipped:>8s}")
    return "\n".join(rows)


def threshold_report(model: Transformer, sites: list, batches: list, logdir: str) -> str:
    """The end-of-training table: per site bits, sign, threshold, f, fraction clipped (measured
    on two training batches), and how many sites changed f since calibration."""
    for site in sites:
        site.recorded = []
    for src, tgt in batches[:2]:
        model(tf.constant(src), tf.constant(tgt[:, :-1]), training=False)
    clipped = {}
    for site in sites:
        clipped[site.site_name] = float(np.mean([site.clip_fraction(x) for x, _ in site.recorded]))
        site.recorded = None
    table = site_table(sites, clipped)
    calib_path = os.path.join(logdir, "calibration.json")
    if os.path.exists(calib_path):
        with open(calib_path) as f:
            at_calibration = json.load(f)
        changed = sum(np.any(np.asarray(at_calibration[s.site_name]) != s.frac_bits()) for s in sites
                      if s.site_name in at_calibration)
        table += f"\n{changed} of {len(sites)} sites changed their fractional bits f since calibration"
    return table


def main(argv: list[str]) -> None:
    parser = hparams.train_parser()
    hp = parser.parse_args(argv)
    parent_ckpt = inherit_from_parent(hp, hparams.explicit_flags(parser, argv)) if hp.init_from else None
    check_flags(hp)
    check_resume(hp)
    print(runs.setup_devices(hp.require_gpu))
    strategy = build_strategy(hp.strategy)  # before any other TF op (multi-worker needs that)
    run_dir = hp.logdir
    if not is_chief(strategy):  # every worker computes everything; only the chief writes the run
        hp.logdir = private_logdir(run_dir)
        print(f"worker {strategy.cluster_resolver.task_id}: the chief writes {run_dir}; this "
              f"worker's own files go to {hp.logdir} (deleted at the end)")
    try:
        train(hp, strategy, run_dir, parent_ckpt)
    finally:
        if hp.logdir != run_dir:
            shutil.rmtree(hp.logdir, ignore_errors=True)


def train(hp: argparse.Namespace, strategy: tf.distribute.Strategy, run_dir: str,
          parent_ckpt: str | None) -> None:
    """The run: writes go to hp.logdir (the run's folder, or a worker's own), a resume reads
    run_dir's latest checkpoint."""
    tf.random.set_seed(hp.seed)
    splits, sp, train_src, train_tgt = prepare_data(hp)
    hparams.save_hparams(hp, hp.logdir)

    with strategy.scope():
        model = Transformer(hp, sp.get_piece_size(), runs.sites_from_flags(hp))
        opt = Optimizers(model, hp)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        loss_scale = LossScale() if hp.mixed_precision == "fp16" else None
    sites = opt.sites
    if sites and quant.grad_kernel_missing():
        print(f"note: {os.path.basename(quant.GRAD_KERNEL_PATH)} is not built (make kernel): the QAT "
              f"backward takes TF's kernels, a slower step with the same dL/dx")
    state = {"loss_scale": loss_scale} if loss_scale else {}
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, epoch=epoch, batch_in_epoch=batch_in_epoch,
                               **state)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(hp.logdir, "ckpt"), hp.keep_checkpoints)
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "ckpt"))
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        print(f"resumed from {latest} (step {int(opt.adam.t.numpy())}, epoch {int(epoch.numpy()) + 1})")
    else:
        missing = load_weights(model, parent_ckpt) if parent_ckpt else [s.site_name for s in sites]
        if parent_ckpt:
            print(f"initialized from {parent_ckpt}")
        if missing:
            calibrate(model, sites, data_load.train_batches(train_src, train_tgt, hp.batch_tokens,
                                                            hp.seed, 0), hp, missing)
    writer = tf.summary.create_file_writer(hp.logdir)
    if sites and not latest:
        log_thresholds(sites, writer, int(opt.adam.t.numpy()))  # the calibrated (or inherited) thresholds
    start = time.time()

    # the loop counts steps on the host (Optimizers.skip: one per batch) and reads the device
    # only to log, so it queues the next step while the device still runs this one
    step = int(opt.adam.t.numpy())

    def out_of_budget() -> bool:
        return bool((hp.max_steps and step >= hp.max_steps) or (
            hp.max_minutes and time.time() - start > 60 * hp.max_minutes))

    def thresholds_train() -> bool:
        frozen = bool(hp.freeze_thresholds_after) and step >= hp.freeze_thresholds_after
        for site in sites:
            site.frozen = frozen
        return bool(sites) and not frozen

    def patience_exhausted() -> bool:
        return bool(hp.patience) and epochs_without_improvement(hp.logdir) >= hp.patience

    train_thresholds = thresholds_train()
    train_step = make_train_step(model, strategy, opt, train_thresholds, loss_scale, hp.jit_compile)
    run_tokens = 0
    wait_seconds = loop_seconds = 0.0  # waiting for the next batch / the whole batch loop
    while int(epoch.numpy()) < hp.num_epochs and not out_of_budget() and not patience_exhausted():
        done = int(batch_in_epoch.numpy())  # batches of this epoch already trained (a resume)
        batches = data_load.train_batches(train_src, train_tgt, hp.batch_tokens, hp.seed, int(epoch.numpy()))
        bar = tqdm(desc=f"epoch {int(epoch.numpy()) + 1}/{hp.num_epochs}", initial=done,
                   total=len(batches), dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        tokens, t0 = 0, time.time()
        inputs = iter(input_pipeline(batches[done:]))
        while True:
            began = time.perf_counter()
            src, tgt, n_tokens, n_all = next(inputs, (None,) * 4)
            if src is None:
                break
            wait_seconds += time.perf_counter() - began
            loss, lr = train_step(*distribute(strategy, src, tgt), n_tokens)
            step += 1
            batch_in_epoch.assign_add(1)
            bar.update(1)
            tokens += int(n_all)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{float(lr):.2e}",
                                tok_s=f"{tokens / (time.time() - t0):.0f}", refresh=False)
                with writer.as_default():
                    tf.summary.scalar("loss", loss, step=step)
                    tf.summary.scalar("lr", lr, step=step)
            if sites and step % hp.threshold_log_every == 0:
                log_thresholds(sites, writer, step)
            if step % hp.ckpt_every == 0:
                manager.save(checkpoint_number=step)
            if train_thresholds != thresholds_train():  # --freeze_thresholds_after reached
                train_thresholds = False
                train_step = make_train_step(model, strategy, opt, train_thresholds, loss_scale,
                                             hp.jit_compile)
                tqdm.write(f"step {step}: thresholds frozen")
            loop_seconds += time.perf_counter() - began
            if out_of_budget():
                break
        bar.close()
        run_tokens += tokens
        if int(batch_in_epoch.numpy()) == len(batches):  # a finished epoch: score dev, move on
            epoch.assign_add(1)
            batch_in_epoch.assign(0)
            scored = {"epoch": int(epoch.numpy()), "step": step}
            dev_bleu = evaluate_dev(model, sp, splits, hp, scored["epoch"], writer, scored["step"])
            keep_if_best(model, hp.logdir, hp.keep_best, {**scored, "dev_bleu": round(dev_bleu, 2)})
        manager.save(checkpoint_number=step)
    writer.flush()
    minutes = (time.time() - start) / 60  # training (and dev scoring) only: tokens/s below
    stopped_early = patience_exhausted() and int(epoch.numpy()) < hp.num_epochs
    if stopped_early:
        epochs = "1 epoch" if hp.patience == 1 else f"{hp.patience} epochs"
        print(f"early stop after epoch {int(epoch.numpy())}: dev BLEU has not improved for {epochs} "
              f"(--patience)")
    test = score_test(model, sp, splits, hp)  # the model now holds the checkpoint it scored
    if sites:
        print(threshold_report(model, sites, data_load.train_batches(
            train_src, train_tgt, hp.batch_tokens, hp.seed, 0), hp.logdir))
        out = os.path.join(hp.logdir, "export")
        spm_file = runs.spm_path(hp.logdir)
        export.export_model(model, hp, spm_file, out, export.observed_sources(model, hp, spm_file))
        print(f"integer weights of the {test['checkpoint']} checkpoint exported to {out}")
    summary = {"steps": step, "epochs": int(epoch.numpy()), "minutes": round(minutes, 2),
               "tokens_per_s": round(run_tokens / max(60 * minutes, 1e-9)), "test": test,
               "stopped_early": stopped_early,
               # the share of the batch loop spent waiting for the input pipeline's next batch
               "input_wait_fraction": round(wait_seconds / loop_seconds, 3) if loop_seconds else None}
    hparams.write_json(os.path.join(hp.logdir, "train_summary.json"), summary)
    print("done: " + json.dumps(summary))


if __name__ == "__main__":
    hparams.run_cli(main)
