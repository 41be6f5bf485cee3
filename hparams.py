"""Every command-line flag, in one place (train.py, eval.py and integer_tf/export.py share the
model, data and decoding flags).

Defaults follow Kyubyong/transformer (IWSLT16 de->en) where it has one; `make demo` passes a
smaller model for the embedded corpus. Every number is range-checked as it is parsed, and this
module loads no TensorFlow, so `--help` and a mistyped flag are answered at once
(`check_command_line`, which the commands call before they import TensorFlow).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from integer import atomic_files, calibration, fixed_point, kernels

# flags that describe the model and its vocabulary: restored from <logdir>/hparams.json
MODEL_FLAGS = ("d_model", "d_ff", "num_blocks", "num_heads", "vocab_size", "maxlen1", "maxlen2",
               "dropout_rate", "smoothing")
# flags that say which data a run used: restored too, so eval.py and QAT see the same corpus
DATA_FLAGS = ("data", "demo_dir", "dev_set", "test_set", "train_src", "train_tgt", "dev_src",
              "dev_tgt", "test_src", "test_tgt")
QUANT_FLAGS = ("quant", "wbits", "abits", "quant_override", "rounding", "per_channel", "per_row_embedding",
               "integer_only", "residual_bits", "normalization")
# --init_from fine-tunes: these replace the from-scratch schedule unless typed (a short run at a
# low rate with a short warm-up, as the QAT benchmarks and `make demo` use)
FINE_TUNE_SCHEDULE = {"num_epochs": 2, "lr": 2e-4, "warmup_steps": 100}
# what a run (or an export) saves of its flags, so eval.py can evaluate it on its own
SAVED_FLAGS = MODEL_FLAGS + DATA_FLAGS + QUANT_FLAGS + ("decode_margin",)
DEFAULT_MAX_POSITIONS = 512  # rows of an integer-only export's position table
OBSERVE_SENTENCES = 50  # dev sentences an integer-only export's observed accumulators come from


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: ...`, exit status 2) and the defaults in --help."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one (not for None, an off switch or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def number(low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high], each end open when told."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            if high == math.inf:
                bound = f"{'>' if low_open else '>='} {low:g}"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text}")
        return value

    return parse


COUNT, POSITIVE = integer(0), integer(1)
BITS = integer(fixed_point.MIN_BITS, fixed_point.MAX_BITS)
RATE = number(0, low_open=True)  # a learning rate
FRACTION = number(0, 1, high_open=True)  # dropout, label smoothing


def check_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Parse the flags once before the command loads TensorFlow: --help and a bad flag are
    answered at once; then a missing TensorFlow is one line saying how to install it."""
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import tensorflow  # noqa: F401  (the command imports it next anyway)
    except ModuleNotFoundError as error:
        if error.name != "tensorflow":
            raise
        raise SystemExit("error: TensorFlow is not installed in this environment: pip install -e '.[cpu]' "
                         "(or '.[gpu]' for the CUDA build), or run make setup") from None


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="demo",
                   help="'demo' (the embedded synthetic corpus) or an IWSLT raw-layout folder "
                        "(scripts/download_iwslt.sh makes one)")
    g.add_argument("--demo_dir", default="data/demo", help="where the demo corpus is written")
    g.add_argument("--dev_set", default="tst2013", help="IWSLT dev set name (e.g. tst2013, dev2010)")
    g.add_argument("--test_set", default="tst2014", help="IWSLT test set name")
    for split in ("train", "dev", "test"):
        for side, lang in (("src", "German"), ("tgt", "English")):
            g.add_argument(f"--{split}_{side}", default=None,
                           help=f"{split} {lang} file: plain text (.gz ok), or IWSLT .xml / WMT .sgm")
    g.add_argument("--spm_dir", default=None,
                   help="SentencePiece cache folder; unset: beside the training data if writable, "
                        "else <logdir>")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--vocab_size", type=POSITIVE, default=32000, help="joint BPE vocabulary size")
    g.add_argument("--d_model", type=POSITIVE, default=512,
                   help="hidden size (even, a multiple of --num_heads)")
    g.add_argument("--d_ff", type=POSITIVE, default=2048, help="feed-forward inner size")
    g.add_argument("--num_blocks", type=POSITIVE, default=6, help="encoder and decoder blocks (each)")
    g.add_argument("--num_heads", type=POSITIVE, default=8, help="attention heads")
    g.add_argument("--maxlen1", type=POSITIVE, default=100, help="max source pieces in training")
    g.add_argument("--maxlen2", type=POSITIVE, default=100, help="max target pieces in training")
    g.add_argument("--dropout_rate", type=FRACTION, default=0.3,
                   help="dropout on the embeddings, each sublayer's output and the attention weights")
    g.add_argument("--smoothing", type=FRACTION, default=0.1, help="label smoothing")


def add_require_gpu(g) -> None:
    g.add_argument("--require_gpu", action="store_true",
                   help="stop with an error unless TensorFlow sees a GPU (a CPU fallback is silent "
                        "otherwise, apart from the devices line)")


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=POSITIVE, default=1,
                   help="beam size of the test translation (1 = greedy with cache)")
    g.add_argument("--alpha", type=number(0), default=0.6, help="beam length penalty ((5+len)/6)^alpha")
    g.add_argument("--decode_margin", type=COUNT, default=50,
                   help="max output length = source length + this")
    g.add_argument("--eval_batch_size", type=POSITIVE, default=64, help="sentences per decoding batch")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (TQT)")
    g.add_argument("--quant", default="none", choices=list(fixed_point.PRESETS),
                   help="bit-width preset for weights / activations")
    g.add_argument("--wbits", type=BITS, default=None, help="weight bits (overrides the preset)")
    g.add_argument("--abits", type=BITS, default=None, help="activation bits (overrides the preset)")
    g.add_argument("--quant_override", action="append", default=[], metavar="PATTERN=BITS",
                   help="bits for the sites whose name matches a glob, e.g. '*/softmax_output=8' "
                        "(repeatable; the last match wins)")
    g.add_argument("--rounding", default="half_even", choices=fixed_point.ROUNDINGS,
                   help="rounding of x/s (the integer engine uses the same)")
    g.add_argument("--integer_only", action="store_true",
                   help="integer-only inference: LayerNorm, softmax, residual adds and scalings on "
                        "integer grids too (docs/integer_only.md)")
    g.add_argument("--residual_bits", type=BITS, default=16,
                   help="bits of the residual stream and LayerNorm sites with --integer_only")
    g.add_argument("--normalization", default="exact", choices=kernels.NORMALIZATIONS,
                   help="with --integer_only: LayerNorm and softmax divide each element (exact) or "
                        "multiply it by one reciprocal per row (cheaper in hardware, within one output "
                        "unit: docs/hardware.md)")
    g.add_argument("--per_channel", action="store_true",
                   help="one power-of-two threshold per output channel for dense weights")
    g.add_argument("--per_row_embedding", action="store_true",
                   help="one power-of-two threshold per row of the embedding table (the output "
                        "projection's output channels)")


def train_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python train.py", description="Train a (quantized) Transformer de->en.")
    p.add_argument("--logdir", required=True, help="checkpoints, hparams.json, summaries, hypotheses")
    add_data_flags(p)
    add_model_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=RATE, default=3e-4, help="peak learning rate of the Noam schedule")
    g.add_argument("--warmup_steps", type=POSITIVE, default=4000,
                   help="steps of the Noam schedule's linear warm-up to --lr")
    g.add_argument("--num_epochs", type=POSITIVE, default=20, help="passes over the training data")
    g.add_argument("--batch_tokens", type=POSITIVE, default=4096, help="tokens per batch (source or target)")
    g.add_argument("--max_steps", type=COUNT, default=0, help="stop after this many steps (0: no limit)")
    g.add_argument("--max_minutes", type=number(0), default=0,
                   help="stop after this much training wall-clock time in this run (0: no limit)")
    g.add_argument("--ckpt_every", type=POSITIVE, default=1000, help="checkpoint every N steps")
    g.add_argument("--threshold_log_every", type=POSITIVE, default=100,
                   help="write every site's log2_t to the summaries every N steps (and at the start)")
    g.add_argument("--keep_checkpoints", type=POSITIVE, default=3,
                   help="latest checkpoints kept in <logdir>/ckpt (what a re-run resumes from)")
    g.add_argument("--keep_best", type=COUNT, default=1,
                   help="keep the N checkpoints with the highest dev BLEU in <logdir>/best (scored "
                        "after every epoch; 0: none); eval.py and --init_from read the best")
    g.add_argument("--patience", type=COUNT, default=0,
                   help="stop when dev BLEU has not improved for N epochs (0: train every epoch)")
    g.add_argument("--dev_max_sentences", type=COUNT, default=0,
                   help="score dev BLEU on the first N dev sentences (0: all)")
    g.add_argument("--dev_beam", type=POSITIVE, default=1,
                   help="beam size of each epoch's dev BLEU, which --keep_best and --patience follow "
                        "(1 = greedy, fast; --beam is for the test BLEU at the end)")
    g.add_argument("--seed", type=COUNT, default=1234,
                   help="seed of the initial weights, dropout and the batch order")
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
    schedule = " ".join(f"--{k} {v:g}" for k, v in FINE_TUNE_SCHEDULE.items())
    g.add_argument("--init_from", default=None, metavar="LOGDIR",
                   help="start from this run's best checkpoint (else its latest; its model flags, data "
                        "flags and SentencePiece model are taken over), e.g. a float run to fine-tune "
                        f"with --quant; the schedule becomes {schedule} unless typed")
    add_calib_flags(g)
    g.add_argument("--th_lr", type=RATE, default=1e-2, help="Adam learning rate of the thresholds")
    g.add_argument("--th_decay_steps", type=POSITIVE, default=1000,
                   help="halve the threshold learning rate every N steps")
    g.add_argument("--freeze_thresholds_after", type=COUNT, default=0,
                   help="stop training thresholds after N steps (0: never)")
    return p


def add_calib_flags(g) -> None:
    g.add_argument("--calib", default="kl", choices=calibration.METHODS,
                   help="activation calibration (kl: symmetric KL-J as in TQT)")
    g.add_argument("--calib_batches", type=POSITIVE, default=8, help="training batches to calibrate on")
    g.add_argument("--weight_init", default="max", choices=calibration.WEIGHT_INITS,
                   help="weight thresholds from max|w|, |mean| + 3 std, or the power of two of least "
                        "squared quantization error (per tensor, channel or row)")


def eval_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python eval.py", description="Translate with a trained run (--logdir) or an export "
               "(--engine int --export DIR): the run's test set, scored by sacreBLEU, or --src FILE "
               "(with --ref FILE: scored; without: translated only).")
    p.add_argument("--logdir", default=None,
                   help="a train.py --logdir (checkpoint + hparams.json); optional with --engine int")
    p.add_argument("--engine", default="tf", choices=["tf", "int"],
                   help="tf: the TensorFlow (fake-quant) model; int: the NumPy integer engine on --export")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="the export directory (eval.py --export_to) that --engine int evaluates")
    p.add_argument("--export_to", default=None, metavar="DIR",
                   help="with --engine tf: write the (quantized) model's integers here after evaluating")
    p.add_argument("--dump_vectors", type=COUNT, default=0, metavar="N",
                   help="golden vectors: every integer op of the first N sentences' passes, in execution "
                        "order, to --out (docs/integer_only.md)")
    p.add_argument("--out", default=None, help="folder for --dump_vectors")
    p.add_argument("--agree_with", default=None, metavar="HYP_FILE",
                   help="report the %% of sentences whose output equals these hypotheses")
    p.add_argument("--src", default=None, metavar="FILE",
                   help="German text to translate instead of the test set, one sentence per line "
                        "('-': standard input)")
    p.add_argument("--ref", default=None, metavar="FILE",
                   help="English references of --src: score BLEU (without it, --src is only translated)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--hyp_out", default=None, metavar="FILE",
                   help="where the translations go ('-': standard output); unset: "
                        "<logdir>/test_hyp_<engine>.txt with --logdir, standard output when --src "
                        "has no --ref, else nowhere (nothing is ever written into an export)")
    p.add_argument("--checkpoint", default=None,
                   help="best, latest, averaged (scripts/average_checkpoints.py) or a checkpoint "
                        "prefix; unset: best when the run kept one, else latest")
    p.add_argument("--summary", default=None,
                   help="add this result to a JSON summary file (e.g. runs/demo/summary.json)")
    p.add_argument("--summary_key", default="float", help="the entry's name in --summary")
    add_require_gpu(p)
    add_data_flags(p)
    add_model_flags(p)
    add_decode_flags(p)
    add_quant_flags(p)
    add_calib_flags(p.add_argument_group("post-training quantization (a float --logdir with --quant)"))
    p.add_argument("--batch_tokens", type=POSITIVE, default=4096, help="tokens per calibration batch")
    p.add_argument("--seed", type=COUNT, default=1234, help="seed of the calibration batches' order")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m integer_tf.export", description="Export a quantized run's integers "
               "for the NumPy engines and hardware (docs/integer_only.md).")
    p.add_argument("--logdir", required=True, help="a train.py --logdir of a quantized run")
    p.add_argument("--out", required=True, help="export directory (replaced atomically)")
    p.add_argument("--checkpoint", default=None,
                   help="best, latest, averaged or a checkpoint prefix; unset: best when the run "
                        "kept one, else latest")
    p.add_argument("--max_positions", type=POSITIVE, default=DEFAULT_MAX_POSITIONS,
                   help="integer-only: rows of the exported position table (the longest sequence)")
    p.add_argument("--observe_sentences", type=COUNT, default=OBSERVE_SENTENCES,
                   help="integer-only: dev sentences the data sheet's observed accumulators come from")
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


def load_hparams(logdir: str, flag: str = "--logdir") -> dict:
    """<logdir>/hparams.json; a missing or broken one is a one-line error naming `flag`."""
    path = os.path.join(logdir, "hparams.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        what = "no such folder" if not os.path.isdir(logdir) else f"{path} not found"
        raise SystemExit(f"error: {flag} {logdir}: {what}; it must be a train.py --logdir") from None
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
