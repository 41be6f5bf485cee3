"""Every command-line flag, in one place (train.py and eval.py share the model and data flags).

Defaults follow Kyubyong/transformer (IWSLT16 de->en) where it has one; `make demo` passes a
smaller model for the embedded corpus.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from integer import atomic_files, calibration, fixed_point

# flags that describe the model and its vocabulary: restored from <logdir>/hparams.json
MODEL_FLAGS = ("d_model", "d_ff", "num_blocks", "num_heads", "vocab_size", "maxlen1", "maxlen2",
               "dropout_rate", "smoothing")
# flags that say which data a run used: restored too, so eval.py and QAT see the same corpus
DATA_FLAGS = ("data", "demo_dir", "dev_set", "test_set", "train_src", "train_tgt", "dev_src",
              "dev_tgt", "test_src", "test_tgt")
QUANT_FLAGS = ("quant", "wbits", "abits", "quant_override", "rounding", "per_channel", "per_row_embedding",
               "integer_only", "residual_bits")
# --init_from fine-tunes: these replace the from-scratch schedule unless typed (a short run at a
# low rate with a short warm-up, as the QAT benchmarks and `make demo` use)
FINE_TUNE_SCHEDULE = {"num_epochs": 2, "lr": 2e-4, "warmup_steps": 100}
# what a run (or an export) saves of its flags, so eval.py can evaluate it on its own
SAVED_FLAGS = MODEL_FLAGS + DATA_FLAGS + QUANT_FLAGS + ("decode_margin",)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="demo",
                   help="'demo' (the embedded synthetic corpus) or an IWSLT raw-layout folder")
    g.add_argument("--demo_dir", default="data/demo", help="where the demo corpus is written")
    g.add_argument("--dev_set", default="tst2013", help="IWSLT dev set name (e.g. tst2013, dev2010)")
    g.add_argument("--test_set", default="tst2014", help="IWSLT test set name")
    for split in ("train", "dev", "test"):
        for side, lang in (("src", "German"), ("tgt", "English")):
            g.add_argument(f"--{split}_{side}", default=None,
                           help=f"{split} {lang} file: plain text (.gz ok), or IWSLT .xml / WMT .sgm")
    g.add_argument("--spm_dir", default=None,
                   help="SentencePiece cache folder (default: beside the training data if writable, "
                        "else <logdir>)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--vocab_size", type=int, default=32000, help="joint BPE vocabulary size")
    g.add_argument("--d_model", type=int, default=512, help="hidden size")
    g.add_argument("--d_ff", type=int, default=2048, help="feed-forward inner size")
    g.add_argument("--num_blocks", type=int, default=6, help="encoder and decoder blocks (each)")
    g.add_argument("--num_heads", type=int, default=8, help="attention heads")
    g.add_argument("--maxlen1", type=int, default=100, help="max source pieces in training")
    g.add_argument("--maxlen2", type=int, default=100, help="max target pieces in training")
    g.add_argument("--dropout_rate", type=float, default=0.3)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")


def add_require_gpu(g) -> None:
    g.add_argument("--require_gpu", action="store_true",
                   help="stop with an error unless TensorFlow sees a GPU (a CPU fallback is silent "
                        "otherwise, apart from the devices line)")


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy with cache)")
    g.add_argument("--alpha", type=float, default=0.6, help="beam length penalty ((5+len)/6)^alpha")
    g.add_argument("--decode_margin", type=int, default=50,
                   help="max output length = source length + this")
    g.add_argument("--eval_batch_size", type=int, default=64, help="sentences per decoding batch")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (TQT)")
    g.add_argument("--quant", default="none", choices=list(fixed_point.PRESETS),
                   help="bit-width preset for weights / activations")
    g.add_argument("--wbits", type=int, default=None, help="weight bits (overrides the preset)")
    g.add_argument("--abits", type=int, default=None, help="activation bits (overrides the preset)")
    g.add_argument("--quant_override", action="append", default=[], metavar="PATTERN=BITS",
                   help="bits for the sites whose name matches a glob, e.g. '*/softmax_output=8' "
                        "(repeatable; the last match wins)")
    g.add_argument("--rounding", default="half_even", choices=fixed_point.ROUNDINGS,
                   help="rounding of x/s (the integer engine uses the same)")
    g.add_argument("--integer_only", action="store_true",
                   help="integer-only inference: LayerNorm, softmax, residual adds and scalings on "
                        "integer grids too (docs/integer_only.md; in progress)")
    g.add_argument("--residual_bits", type=int, default=16,
                   help="bits of the residual stream and LayerNorm sites with --integer_only")
    g.add_argument("--per_channel", action="store_true",
                   help="one power-of-two threshold per output channel for dense weights")
    g.add_argument("--per_row_embedding", action="store_true",
                   help="one power-of-two threshold per row of the embedding table (the output "
                        "projection's output channels)")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a (quantized) Transformer de->en.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", required=True, help="checkpoints, hparams.json, summaries, hypotheses")
    add_data_flags(p)
    add_model_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the Noam schedule")
    g.add_argument("--warmup_steps", type=int, default=4000)
    g.add_argument("--num_epochs", type=int, default=20)
    g.add_argument("--batch_tokens", type=int, default=4096, help="tokens per batch (source or target)")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    g.add_argument("--max_minutes", type=float, default=0,
                   help="stop after this much training wall-clock time in this run (0: no limit)")
    g.add_argument("--ckpt_every", type=int, default=1000, help="checkpoint every N steps")
    g.add_argument("--threshold_log_every", type=int, default=100,
                   help="write every site's log2_t to the summaries every N steps (and at the start)")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="latest checkpoints kept in <logdir>/ckpt (what a re-run resumes from)")
    g.add_argument("--keep_best", type=int, default=1,
                   help="keep the N checkpoints with the highest dev BLEU in <logdir>/best (scored "
                        "after every epoch; 0: none); eval.py and --init_from read the best")
    g.add_argument("--patience", type=int, default=0,
                   help="stop when dev BLEU has not improved for N epochs (0: train every epoch)")
    g.add_argument("--dev_max_sentences", type=int, default=0,
                   help="score dev BLEU on the first N dev sentences (0: all)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--strategy", default="none", choices=["none", "mirrored", "multiworker"],
                   help="'mirrored': tf.distribute.MirroredStrategy over the local GPUs; "
                        "'multiworker': MultiWorkerMirroredStrategy over the cluster in TF_CONFIG "
                        "(one process per worker, the same command; only the chief writes --logdir)")
    add_require_gpu(g)
    g.add_argument("--fused_adam", action="store_true",
                   help="update each variable with TF's fused Adam kernel (one op instead of ~6; the "
                        "same equations, other float rounding: not bit-identical to the default)")
    g.add_argument("--jit_compile", action="store_true",
                   help="compile the train step with XLA (once per batch shape: the first steps of "
                        "each length bucket are slow)")
    g.add_argument("--mixed_precision", default="none", choices=["none", "bf16", "fp16"],
                   help="float training (--quant none) with bfloat16 / float16 matmuls; variables, "
                        "LayerNorm, softmax and the loss stay float32; fp16 with dynamic loss scaling")
    add_decode_flags(p)
    add_quant_flags(p)
    g = p.add_argument_group("quantization-aware training")
    g.add_argument("--init_from", default=None, metavar="LOGDIR",
                   help="start from this run's best checkpoint (else its latest; its model flags, data "
                        "flags and SentencePiece model are taken over), e.g. a float run to fine-tune "
                        "with --quant")
    add_calib_flags(g)
    g.add_argument("--th_lr", type=float, default=1e-2, help="Adam learning rate of the thresholds")
    g.add_argument("--th_decay_steps", type=int, default=1000,
                   help="halve the threshold learning rate every N steps")
    g.add_argument("--freeze_thresholds_after", type=int, default=0,
                   help="stop training thresholds after N steps (0: never)")
    return p


def add_calib_flags(g) -> None:
    g.add_argument("--calib", default="kl", choices=calibration.METHODS,
                   help="activation calibration (kl: symmetric KL-J as in TQT)")
    g.add_argument("--calib_batches", type=int, default=8, help="training batches to calibrate on")
    g.add_argument("--weight_init", default="max", choices=calibration.WEIGHT_INITS,
                   help="weight thresholds from max|w|, |mean| + 3 std, or the power of two of least "
                        "squared quantization error (per tensor, channel or row)")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Translate a test set and report sacreBLEU.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", default=None,
                   help="a train.py --logdir (checkpoint + hparams.json); optional with --engine int")
    p.add_argument("--engine", default="tf", choices=["tf", "int"],
                   help="tf: the TensorFlow (fake-quant) model; int: the NumPy integer engine on --export")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="the export directory (eval.py --export_to) that --engine int evaluates")
    p.add_argument("--export_to", default=None, metavar="DIR",
                   help="with --engine tf: write the (quantized) model's integers here after evaluating")
    p.add_argument("--dump_vectors", type=int, default=0, metavar="N",
                   help="write every site's integer inputs/outputs for N test sentences to --out")
    p.add_argument("--out", default=None, help="folder for --dump_vectors")
    p.add_argument("--agree_with", default=None, metavar="HYP_FILE",
                   help="report the %% of sentences whose output equals these hypotheses")
    p.add_argument("--src", default=None, help="German file to translate (instead of the test set)")
    p.add_argument("--ref", default=None, help="English reference for --src")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--hyp_out", default=None,
                   help="hypotheses file (default <logdir or export>/test_hyp_<engine>.txt)")
    p.add_argument("--checkpoint", default=None,
                   help="best, latest, averaged (scripts/average_checkpoints.py) or a checkpoint "
                        "prefix (default: best when the run kept one, else latest)")
    p.add_argument("--summary", default=None,
                   help="add this result to a JSON summary file (e.g. runs/demo/summary.json)")
    p.add_argument("--summary_key", default="float", help="the entry's name in --summary")
    add_require_gpu(p)
    add_data_flags(p)
    add_model_flags(p)
    add_decode_flags(p)
    add_quant_flags(p)
    add_calib_flags(p.add_argument_group("post-training quantization (a float --logdir with --quant)"))
    p.add_argument("--batch_tokens", type=int, default=4096, help="tokens per calibration batch")
    p.add_argument("--seed", type=int, default=1234)
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the flags the user actually typed (as opposed to defaults)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def save_hparams(hp: argparse.Namespace, logdir: str) -> None:
    """Write <logdir>/hparams.json atomically."""
    write_json(os.path.join(logdir, "hparams.json"), vars(hp))


def write_json(path: str, obj: dict | list) -> None:
    """Write JSON atomically (atomic_files.write_atomic); an object that does not serialize writes nothing."""
    atomic_files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def update_json(path: str, key: str, entry: dict) -> None:
    """Set path[key] = entry in a JSON object file (created when missing)."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = entry
    write_json(path, data)


def load_hparams(logdir: str) -> dict:
    path = os.path.join(logdir, "hparams.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found: is --logdir a train.py log directory?") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e})") from None


def merge_saved(hp: argparse.Namespace, saved: dict, explicit: set[str], keys: tuple[str, ...]) -> None:
    """Take `keys` from the saved hparams unless given on the command line (then warn on mismatch)."""
    for key in keys:
        if key not in saved:
            continue
        if key in explicit:
            if getattr(hp, key) != saved[key]:
                print(f"warning: --{key} {getattr(hp, key)} overrides {saved[key]} saved with the "
                      f"checkpoint", file=sys.stderr)
        else:
            setattr(hp, key, saved[key])


def run_cli(main, argv: list[str] | None = None) -> None:
    """Run main(argv); expected failures (ValueError, which data_load.DataError and
    export_format.ExportError are, and FileNotFoundError) become one line on stderr and exit status 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: the latest checkpoint is kept; re-run the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
