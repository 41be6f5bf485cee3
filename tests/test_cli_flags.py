"""The command lines themselves: every number range-checked as it is parsed, help for every flag,
and --help, a mistyped flag or a missing TensorFlow answered in one line before TensorFlow loads."""

import argparse
import os
import subprocess
import sys

import pytest

import hparams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"train.py": hparams.train_parser, "eval.py": hparams.eval_parser,
            "integer_tf.export": hparams.export_parser}
REQUIRED = {"train.py": ["--logdir", "x"], "eval.py": ["--logdir", "x"],
            "integer_tf.export": ["--logdir", "x", "--out", "y"]}


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory) -> dict:
    """An environment whose `import tensorflow` fails as it does where it is not installed: a
    command that loaded it before parsing its flags could not print its help."""
    folder = tmp_path_factory.mktemp("no_tf")
    os.makedirs(folder / "tensorflow")
    (folder / "tensorflow" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\", name='tensorflow')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), ROOT]))


def run(command: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    script = ["-m", command] if "." in command and not command.endswith(".py") else [command]
    return subprocess.run([sys.executable, *script, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_and_flag_errors_come_before_tensorflow(command, no_tensorflow):
    proc = run(command, "--help", env=no_tensorflow)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr[-2000:]
    assert "--logdir" in proc.stdout
    flag = "--max_positions" if command == "integer_tf.export" else "--beam"
    proc = run(command, *REQUIRED[command], flag, "0", env=no_tensorflow)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: argument {flag}: must be an integer >= 1, got 0 "
                                        f"({COMMANDS[command]().prog} --help lists the flags)"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_tensorflow_is_one_line(command, no_tensorflow):
    proc = run(command, *REQUIRED[command], env=no_tensorflow)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "error: TensorFlow is not installed in this environment: pip install -e '.[cpu]' (or "
        "'.[gpu]' for the CUDA build), or run make setup"]


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.type is not None and a.choices is None]


def test_every_number_has_a_range():
    """A plain int or float type would let 0, a negative or NaN through to a traceback later."""
    for name, make in COMMANDS.items():
        for action in numeric_actions(make()):
            assert action.type not in (int, float), f"{name} {action.option_strings[0]}"


# (flag, values refused, a value accepted): the edges of each range
RANGES = [
    ("--beam", ["0", "-1", "2.5", "x"], "1"), ("--dev_beam", ["0"], "1"), ("--alpha", ["-0.1", "nan"], "0"),
    ("--decode_margin", ["-1"], "0"), ("--eval_batch_size", ["0"], "1"), ("--batch_tokens", ["0"], "1"),
    ("--num_epochs", ["0"], "1"), ("--max_steps", ["-1"], "0"), ("--max_minutes", ["-1", "inf"], "0"),
    ("--warmup_steps", ["0"], "1"), ("--lr", ["0", "-1e-3", "nan", "inf"], "1e-9"),
    ("--th_lr", ["0"], "1e-9"), ("--dropout_rate", ["1", "-0.1"], "0"), ("--smoothing", ["1"], "0.99"),
    ("--patience", ["-1"], "0"), ("--keep_best", ["-1"], "0"), ("--keep_checkpoints", ["0"], "1"),
    ("--ckpt_every", ["0"], "1"), ("--threshold_log_every", ["0"], "1"), ("--dev_max_sentences", ["-1"], "0"),
    ("--wbits", ["1", "17"], "2"), ("--abits", ["17"], "16"), ("--residual_bits", ["1"], "16"),
    ("--d_model", ["0"], "2"), ("--num_heads", ["0"], "1"), ("--vocab_size", ["0"], "1"),
    ("--calib_batches", ["0"], "1"), ("--th_decay_steps", ["0"], "1"), ("--seed", ["-1"], "0"),
    ("--freeze_thresholds_after", ["-1"], "0"), ("--maxlen1", ["0"], "1"),
]


@pytest.mark.parametrize("flag, bad, good", RANGES, ids=[r[0] for r in RANGES])
def test_train_flag_ranges(flag, bad, good, capsys):
    parser = hparams.train_parser()
    assert getattr(parser.parse_args(["--logdir", "x", flag, good]), flag[2:]) == float(good)
    for value in bad:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--logdir", "x", flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: argument {flag}: ") and err.count("\n") == 1


def test_eval_and_export_flag_ranges(capsys):
    for make, argv in ((hparams.eval_parser, ["--dump_vectors", "-1"]),
                       (hparams.eval_parser, ["--beam", "0"]),
                       (hparams.export_parser, ["--logdir", "x", "--out", "y", "--observe_sentences", "-1"]),
                       (hparams.export_parser, ["--logdir", "x", "--out", "y", "--max_positions", "0"])):
        with pytest.raises(SystemExit):
            make().parse_args(argv)
        assert capsys.readouterr().err.startswith(f"error: argument {argv[-2]}: ")


def test_every_flag_has_help_and_no_empty_default():
    for name, make in COMMANDS.items():
        parser = make()
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings}"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert "in progress" not in text and "(default: beside" not in text, name
    train_help = hparams.train_parser().format_help()
    assert "(default: 0.3)" in train_help  # --dropout_rate: a default is still shown
    init_from = next(a for a in hparams.train_parser()._actions if a.dest == "init_from")
    for key, value in hparams.FINE_TUNE_SCHEDULE.items():
        assert f"--{key} {value:g}" in init_from.help
