"""The commands' errors: one line naming the file or flag, a non-zero exit, no traceback."""

import gzip
import os

import pytest
import tensorflow as tf
from helpers import TINY, assert_one_line_error, eval_main, run_cli

import data_load
import hparams
import runs
import train
from hparams import train_parser
from integer import (
    atomic_files,
)


def test_error_missing_data_file(tmp_path, corpus):
    proc = run_cli("train.py", "--logdir", str(tmp_path), "--train_src", str(tmp_path / "nope.de"),
                   "--train_tgt", corpus["train"][1])
    assert_one_line_error(proc, "nope.de")


def test_error_reciprocal_normalization_without_integer_only(tmp_path):
    proc = run_cli("train.py", "--logdir", str(tmp_path), "--quant", "w8a8", "--normalization", "reciprocal")
    assert_one_line_error(proc, "--normalization reciprocal needs --integer_only")


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
    if case == "corrupt_gz_body":  # a good header, then deflate data that is not
        data = bytearray(gzip.compress(b"ein Satz\n" * 200))
        data[14:24] = bytes(b ^ 0xFF for b in data[14:24])
        (folder / "train.de.gz").write_bytes(bytes(data))
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


@pytest.mark.parametrize("case", ["corrupt_gz", "corrupt_gz_body", "line_counts", "xml_segments", "empty"])
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


def train_error(argv: list[str], capsys) -> str:
    """train.py's one error line, run in this process: printed with exit status 1 by run_cli, or
    the message of a SystemExit (which Python prints, with exit status 1)."""
    with pytest.raises(SystemExit) as exit_:
        hparams.run_cli(train.main, argv)
    code, err = exit_.value.code, capsys.readouterr().err.strip()
    if isinstance(code, str):
        code, err = 1, code
    assert code == 1 and len(err.splitlines()) == 1, err
    return err


def test_error_init_from_not_a_run(tmp_path, capsys):
    err = train_error(["--logdir", str(tmp_path / "run"), "--init_from", str(tmp_path / "nothere")], capsys)
    assert err == f"error: --init_from {tmp_path / 'nothere'}: no such folder; it must be a train.py --logdir"


def test_error_data_folder_missing_points_to_the_download(tmp_path, capsys):
    folder = tmp_path / "iwslt16"
    err = train_error(["--logdir", str(tmp_path / "run"), "--data", str(folder)], capsys)
    assert err == (f"error: --data {folder}: no such folder; scripts/download_iwslt.sh 2016 {folder} "
                   f"makes it (README: Train on IWSLT), or --data demo for the embedded corpus")
