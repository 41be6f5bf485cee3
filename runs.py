"""What train.py, eval.py, integer_tf/export.py and scripts/ share about a run: its restored hparams, its
model and checkpoint, its corpus, translating with it and scoring BLEU (and, for the benchmarks,
clearing a run an earlier benchmark left).

A run is a train.py `--logdir`: `hparams.json`, `spm.model`, `ckpt/` (the latest checkpoints,
what a re-run resumes from), `best/` (the highest dev BLEU, `best.json` lists them, best first)
and, after scripts/average_checkpoints.py, `averaged/`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
import sacrebleu
import sentencepiece as spm
import tensorflow as tf
from tqdm import tqdm

import data_load
import hparams
import quant
from integer import export_format
from integer_tf import intonly_layers
from model import Transformer, load_weights
from modules import FloatSites, MixedPrecisionSites, SiteFactory

ROOT = os.path.dirname(os.path.abspath(__file__))


def spm_path(logdir: str) -> str:
    """The SentencePiece model a run was trained with, kept in its logdir."""
    return os.path.join(logdir, "spm.model")


BEST, LATEST, AVERAGED = "best", "latest", "averaged"
COMPUTE_DTYPES = {"bf16": tf.bfloat16, "fp16": tf.float16}  # --mixed_precision
TF_BUILDS = ("tensorflow", "tensorflow-cpu")  # the GPU build and the CPU-only one: never both


def setup_devices(require_gpu: bool) -> str:
    """Memory growth on every GPU (so eval.py can share one with a training run), and a line
    naming the devices TensorFlow will use. ValueError when both TensorFlow builds are installed
    (which one imports is an accident), or with `require_gpu` when TensorFlow sees no GPU."""
    builds = [name for name in TF_BUILDS if _installed(name)]
    if len(builds) > 1:
        raise ValueError("both tensorflow and tensorflow-cpu are installed in this environment: "
                         "pip uninstall -y tensorflow-cpu (GPU) or tensorflow (CPU), then reinstall with "
                         "make VARIANT=gpu or VARIANT=cpu")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialized (a second run in this process): as set then
            pass
    build = f"TensorFlow {tf.__version__}, {', '.join(builds) or 'unknown build'}"
    if require_gpu and not gpus:
        raise ValueError(f"--require_gpu: {build} sees no GPU; install the GPU build "
                         f"(make VARIANT=gpu) and check nvidia-smi")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return (f"devices: {len(gpus)} GPU ({', '.join(names)}), memory growth on; {build}" if gpus else
            f"devices: CPU only ({build})")


def cpu_name() -> str:
    """The CPU's model name and its widest vector units: the step-time ratios depend on them
    (matmuls gain from AVX-512 and AMX, the memory-bound quantizer passes do not)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}  # the first core's "key : value" lines
    for line in info.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    units = [unit for unit in ("avx2", "avx512f", "amx_tile") if unit in flags]
    return f"{fields.get('model name', 'unknown')} ({', '.join(units) or 'no AVX2'})"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def kept_best(logdir: str) -> list[dict]:
    """The run's best checkpoints by dev BLEU, best first: [{checkpoint (a prefix in
    <logdir>/best), epoch, step, dev_bleu}] from <logdir>/best/best.json ([] when none)."""
    path = os.path.join(logdir, BEST, "best.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def best_prefix(logdir: str, entry: dict) -> str:
    """The checkpoint prefix of one kept_best entry."""
    return os.path.join(logdir, BEST, entry["checkpoint"])


def resolve_checkpoint(logdir: str, which: str | None = None) -> str:
    """The checkpoint prefix `which` names in a run: best (the highest dev BLEU), latest,
    averaged, or a checkpoint prefix (or a folder of checkpoints: its latest); None: best when the
    run kept one, else latest. FileNotFoundError, naming the choices, when there is none."""
    if which in (None, BEST):
        best = kept_best(logdir)
        if best:
            return best_prefix(logdir, best[0])
        if which == BEST:
            raise FileNotFoundError(f"{os.path.join(logdir, BEST, 'best.json')} not found: the run "
                                    f"kept no best checkpoint (train.py --keep_best, scored per epoch)")
    if which in (None, LATEST, AVERAGED):
        folder = os.path.join(logdir, AVERAGED if which == AVERAGED else "ckpt")
        path = tf.train.latest_checkpoint(folder)
        if path:
            return path
        if which == AVERAGED:
            raise FileNotFoundError(f"--checkpoint averaged: no checkpoint in {folder} yet: python "
                                    f"scripts/average_checkpoints.py --logdir {logdir} makes it")
        raise FileNotFoundError(f"no checkpoint in {folder}")
    if os.path.isfile(f"{which}.index"):
        return which
    latest_in_folder = tf.train.latest_checkpoint(which) if os.path.isdir(which) else None
    if latest_in_folder:
        return latest_in_folder
    kept = kept_checkpoints(logdir)
    raise FileNotFoundError(f"--checkpoint {which}: not {BEST}, {LATEST}, {AVERAGED} or a checkpoint prefix; "
                            f"{logdir} keeps {', '.join(kept) if kept else 'no checkpoint'}")


def kept_checkpoints(logdir: str) -> list[str]:
    """Every checkpoint prefix a run keeps: its best, its latest few and its average."""
    prefixes = [best_prefix(logdir, entry) for entry in kept_best(logdir)]
    for folder in ("ckpt", AVERAGED):
        state = tf.train.get_checkpoint_state(os.path.join(logdir, folder))
        prefixes += list(state.all_model_checkpoint_paths) if state else []
    return prefixes


def checkpoint_kind(logdir: str, which: str | None) -> str:
    """What eval.py's --checkpoint `which` picks: best, latest, averaged, or given (a prefix)."""
    if which is None:
        return BEST if kept_best(logdir) else LATEST
    return which if which in (BEST, LATEST, AVERAGED) else "given"


def average_weights(model: Transformer, paths: list[str]) -> None:
    """Set every variable of `model` (weights and thresholds) to its mean over the checkpoints
    `paths` (each restored with model.load_weights, so each must fit the model)."""
    total = None
    for path in paths:
        load_weights(model, path)
        values = [v.numpy().astype("float64") for v in model.variables]
        total = values if total is None else [t + v for t, v in zip(total, values)]
    for variable, value in zip(model.variables, total):
        variable.assign((value / len(paths)).astype(variable.dtype.as_numpy_dtype))


def restore_hparams(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags as typed, completed by the hparams saved with the run (or with the export, for
    eval.py --engine int): hparams.SAVED_FLAGS, each unless typed (then a warning on mismatch)."""
    hp = parser.parse_args(argv)
    if hp.logdir:
        saved = hparams.load_hparams(hp.logdir)
    elif getattr(hp, "engine", "tf") == "int" and hp.export:
        saved = export_format.read_manifest(hp.export)["hparams"]
    else:
        raise ValueError("--logdir is required (or --engine int --export DIR)")
    hparams.merge_saved(hp, saved, hparams.explicit_flags(parser, argv), hparams.SAVED_FLAGS)
    return hp


def quant_config(hp: argparse.Namespace) -> quant.QuantConfig | None:
    """The quantization flags (hparams.QUANT_FLAGS) as a QuantConfig (ValueError on bad bits or
    overrides); None for --quant none."""
    return quant.QuantConfig.from_flags(hp.quant, hp.wbits, hp.abits, hp.rounding, hp.per_channel,
                                        hp.quant_override, hp.integer_only, hp.residual_bits,
                                        hp.per_row_embedding, hp.normalization)


def sites_from_flags(hp: argparse.Namespace) -> SiteFactory:
    """The site factory for the quantization flags: quant.TQTSites (intonly_layers.IntegerOnlySites
    with --integer_only), or modules.FloatSites (identity hooks) for --quant none."""
    config = quant_config(hp)
    if config is None:
        precision = getattr(hp, "mixed_precision", "none")  # a training flag: eval runs float32
        return FloatSites() if precision == "none" else MixedPrecisionSites(COMPUTE_DTYPES[precision])
    return intonly_layers.IntegerOnlySites(config) if config.integer_only else quant.TQTSites(config)


def load_model(hp: argparse.Namespace) -> tuple[Transformer, spm.SentencePieceProcessor, str, list[str]]:
    """The model of <logdir> (quantized per hp), its SentencePiece model, the checkpoint path, and
    the sites whose thresholds the checkpoint lacked (model.load_weights: PTQ calibrates them)."""
    spm_file = spm_path(hp.logdir)
    if not os.path.exists(spm_file):
        raise FileNotFoundError(f"{spm_file} not found: is --logdir a train.py log directory?")
    sp = spm.SentencePieceProcessor(model_file=spm_file)
    path = resolve_checkpoint(hp.logdir, hp.checkpoint)
    model = Transformer(hp, sp.get_piece_size(), sites_from_flags(hp))
    return model, sp, path, load_weights(model, path)


def load_quantized(logdir: str, checkpoint: str | None = None
                   ) -> tuple[Transformer, argparse.Namespace, str]:
    """The model of a quantized train.py logdir with its hparams, the checkpoint restored; also
    its SentencePiece model path. A checkpoint without every site's threshold (a float run, or a
    matmul-only run read as integer-only) is a ValueError: those grids would be uncalibrated."""
    argv = ["--logdir", logdir] + (["--checkpoint", checkpoint] if checkpoint else [])
    hp = restore_hparams(hparams.eval_parser(), argv)
    if hp.quant == "none":
        raise ValueError(f"--logdir {logdir} is a float run (--quant none): export a QAT run, or "
                         f"quantize this one after training with eval.py --logdir {logdir} --quant "
                         f"w8a8 --export_to DIR")
    model, _, path, missing = load_model(hp)
    if missing:
        raise ValueError(f"checkpoint {path} has no thresholds for {len(missing)} sites (e.g. "
                         f"{missing[0]}): calibrate or fine-tune it with --quant first")
    return model, hp, spm_path(logdir)


def load_corpus(hp: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """The train/dev/test splits named by the data flags."""
    return data_load.load_splits(
        hp.data, hp.dev_set, hp.test_set, train_src=hp.train_src, train_tgt=hp.train_tgt,
        dev_src=hp.dev_src, dev_tgt=hp.dev_tgt, test_src=hp.test_src, test_tgt=hp.test_tgt,
        demo_dir=hp.demo_dir)


def first_train_batches(hp: argparse.Namespace, sp: spm.SentencePieceProcessor,
                        train: tuple[list[str], list[str]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `n` batches of epoch 0 of the (de, en) training pairs, as train.py batches them:
    what calibration and the quantization scripts observe."""
    src, tgt, _ = data_load.encode_training_pairs(sp, *train, hp.maxlen1, hp.maxlen2)
    return data_load.train_batches(src, tgt, hp.batch_tokens, hp.seed, 0)[:n]


def test_pairs(hp: argparse.Namespace, src: str | None = None, ref: str | None = None
               ) -> tuple[list[str], list[str] | None, str]:
    """(German lines, English references, a name for them): --src (and --ref) when given (None
    for the references of a --src without --ref), else the run's test set."""
    if src:
        if ref:
            return (*data_load.read_parallel(src, ref), src)
        return data_load.read_source(src), None, "standard input" if src == "-" else src
    name = hp.test_src or f"{hp.data}:{hp.test_set}"
    return (*load_corpus(hp)["test"], name)


def translate(model: Transformer, sp: spm.SentencePieceProcessor, lines: list[str],
              hp: argparse.Namespace, progress: bool = False,
              decode: Callable[[tf.Tensor], tf.Tensor] | None = None, beam: int | None = None) -> list[str]:
    """Detokenized translations of `lines`, in order (greedy with cache, or beam search with
    `beam`, default --beam; or `decode`, a function of the source ids)."""
    beam = hp.beam if beam is None else beam
    hyps: list[str] = [""] * len(lines)
    batches = data_load.eval_batches(data_load.encode_source(sp, lines), hp.eval_batch_size)
    for index, src in tqdm(batches, desc="translate", disable=not progress, dynamic_ncols=True):
        src = tf.constant(src)
        if decode is not None:
            out = decode(src)
        else:
            out = model.greedy(src) if beam == 1 else model.beam_search(src, beam, hp.alpha)
        for i, row in zip(index, out.numpy()):
            hyps[i] = data_load.decode_ids(sp, row)
    return hyps


def bleu_score(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (cased, detokenized, 13a) and its signature."""
    metric = sacrebleu.metrics.BLEU()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def timed(fn: Callable, *args, repeats: int = 1) -> tuple:
    """fn(*args) and the median of `repeats` wall-clock timings of it (the benchmarks' speeds)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        seconds.append(time.perf_counter() - start)
    return out, float(np.median(seconds))


def repo_relative(path: str) -> str:
    """`path` relative to the repository (benchmark JSON never records a machine's own paths)."""
    return os.path.relpath(os.path.abspath(path), ROOT)


def fresh_logdir(logdir: str) -> None:
    """Delete a run left in `logdir` by an earlier benchmark: train.py would resume it, find its
    --max_steps reached and train nothing, so the BLEU would be the old run's. A folder that is
    not a train.py logdir is refused (it is not the benchmark's to delete)."""
    if not os.path.exists(logdir):
        return
    if not os.path.isfile(os.path.join(logdir, "hparams.json")):
        raise SystemExit(f"error: {logdir} exists but holds no train.py run (no hparams.json); "
                         f"remove it or pass another --workdir")
    print(f"note: {logdir} holds a run of an earlier benchmark: deleted, training it fresh",
          file=sys.stderr)
    shutil.rmtree(logdir)


def add_parent_flags(p: argparse.ArgumentParser) -> None:
    """--demo_float and --m30k_float: the float runs the fine-tuning benchmarks start from."""
    p.add_argument("--demo_float", default=os.path.join(ROOT, "runs", "demo", "float"),
                   help="float parent on the embedded corpus (make demo trains it)")
    p.add_argument("--m30k_float", default=os.path.join(ROOT, "runs", "bench", "float_multi30k"),
                   help="float parent on Multi30k (scripts/bench_float.py trains it)")


def add_fine_tune_flags(p: argparse.ArgumentParser) -> None:
    """The parents' flags and --corpus: what fine_tune_parents reads."""
    add_parent_flags(p)
    p.add_argument("--corpus", choices=["demo", "multi30k", "both"], default="both")


def fine_tune_parents(args: argparse.Namespace) -> dict[str, str]:
    """{corpus: float parent} for --corpus (demo, multi30k or both), without those that have no
    checkpoint (a note each); SystemExit when none is left."""
    parents = {"demo": args.demo_float, "multi30k": args.m30k_float}
    if args.corpus != "both":
        parents = {args.corpus: parents[args.corpus]}
    for name, parent in list(parents.items()):
        if not tf.train.latest_checkpoint(os.path.join(parent, "ckpt")):
            print(f"note: no float checkpoint in {parent}: skipping {name}", file=sys.stderr)
            del parents[name]
    if not parents:
        raise SystemExit("error: no float parent found (run make demo or scripts/bench_float.py)")
    return parents


def earlier_corpora(out: str, schedule: str) -> dict:
    """The corpora an earlier result file `out` measured with the same schedule (kept beside the new
    ones), or {}."""
    if not os.path.exists(out):
        return {}
    with open(out) as f:
        earlier = json.load(f)
    return earlier["corpora"] if earlier.get("schedule") == schedule else {}
