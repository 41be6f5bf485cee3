"""Shared test setup.

tests/integer/ holds the tests of the NumPy package (integer/): they never import TensorFlow, so
`pytest tests/integer` runs without it. Every other test file may use TensorFlow; before the first
of them is imported, the CPU is split into two logical devices (for tf.distribute.MirroredStrategy
tests): TensorFlow fixes its devices when it first initializes, so this must come before any test
module touches it.
"""

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
NUMPY_TESTS = TESTS / "integer"
_tensorflow_ready = False


def _split_cpu_into_two_logical_devices() -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # TF was initialized before this ran; two_cpus skips then


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Before the first test module outside tests/integer/ is imported: the device split."""
    global _tensorflow_ready
    if (not _tensorflow_ready and isinstance(collector, pytest.Module)
            and NUMPY_TESTS not in collector.path.resolve().parents):
        _split_cpu_into_two_logical_devices()
        _tensorflow_ready = True


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` distributes whole groups to its processes (--dist loadgroup): one group per
    file, so a file's module fixtures are built once, except that every test using the trained
    runs below is in one group, so they are trained once."""
    for item in items:
        shared = TRAINED_RUNS & set(item.fixturenames)
        group = "trained_runs" if shared else str(item.path.relative_to(TESTS))
        item.add_marker(pytest.mark.xdist_group(group))


# ---- tiny trained runs, shared by the tests of train.py, eval.py and scripts/ -------------------

TRAINED_RUNS = {"float_run", "qat_runs"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """240 demo-corpus pairs as files: 200 to train on, 20 for dev (and test)."""
    from helpers import write_pairs

    from corpus import demo as demo_corpus

    folder = tmp_path_factory.mktemp("corpus")
    pairs = demo_corpus.generate_pairs(240, seed=7)
    train_de, train_en = write_pairs(folder, "train", pairs[:200])
    dev_de, dev_en = write_pairs(folder, "dev", pairs[200:220])
    return dict(folder=str(folder), train=(train_de, train_en), dev=(dev_de, dev_en),
                flags=["--train_src", train_de, "--train_tgt", train_en, "--dev_src", dev_de,
                       "--dev_tgt", dev_en, "--test_src", dev_de, "--test_tgt", dev_en,
                       "--spm_dir", str(folder)])


@pytest.fixture(scope="session")
def float_run(corpus, tmp_path_factory):
    """A tiny float model trained to overfit the 200 training pairs."""
    from helpers import TINY

    import train

    logdir = str(tmp_path_factory.mktemp("float") / "run")
    train.main(["--logdir", logdir, *TINY, *corpus["flags"], "--d_model", "64", "--d_ff", "256",
                "--num_blocks", "2", "--dropout_rate", "0", "--smoothing", "0", "--num_epochs", "70",
                "--dev_max_sentences", "5"])
    return logdir


@pytest.fixture(scope="session")
def qat_runs(float_run, tmp_path_factory):
    """W8A8 and W4A8 QAT fine-tuned from the float run (train.py exports each to <logdir>/export)."""
    import train

    logdirs = {}
    for preset in ("w8a8", "w4a8"):
        logdirs[preset] = str(tmp_path_factory.mktemp(preset) / "run")
        train.main(["--logdir", logdirs[preset], "--init_from", float_run, "--quant", preset,
                    "--num_epochs", "3", "--lr", "5e-4", "--warmup_steps", "10", "--dev_max_sentences", "5",
                    "--threshold_log_every", "5"])
    return logdirs


@pytest.fixture(scope="session")
def two_cpus() -> list[str]:
    """Names of two logical CPU devices, e.g. for MirroredStrategy(two_cpus)."""
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("two logical CPUs must be configured before TF initializes")
    return [d.name for d in devices[:2]]


SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def shared_data() -> str:
    """Path of the read-only real corpora (../shared/data); skips the test when absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("real data folder ../shared/data is absent")
    return os.path.normpath(SHARED_DATA)


@pytest.fixture(scope="session")
def fused_grad_op() -> str:
    """The op type of the fused path's backward on the CPU: the one-pass kernel where it is built."""
    import quant

    return "TqtFakeQuantGrad" if quant.GRAD_KERNEL is not None else "QuantizeAndDequantizeV4Grad"
