"""Shared test setup.

tests/integer/ and tests/hw/ hold the tests of the NumPy packages (integer/, hw/): they never import
TensorFlow, so `pytest tests/integer tests/hw` runs without it. Every other test file may use
TensorFlow; before the first of them is imported, the CPU is split into two logical devices (for
tf.distribute.MirroredStrategy tests): TensorFlow fixes its devices when it first initializes, so this
must come before any test module touches it.
"""

import os
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
NUMPY_TESTS = (TESTS / "integer", TESTS / "hw")
_tensorflow_ready = False


def _split_cpu_into_two_logical_devices() -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # TF was initialized before this ran; two_cpus skips then


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Before the first test module outside tests/integer/ and tests/hw/ is imported: the device split."""
    global _tensorflow_ready
    if (not _tensorflow_ready and isinstance(collector, pytest.Module)
            and not set(NUMPY_TESTS) & set(collector.path.resolve().parents)):
        _split_cpu_into_two_logical_devices()
        _tensorflow_ready = True


# `make test` runs the suite in two processes (pytest-xdist, --dist loadfile: whole files, so a
# file's module fixtures are built once). xdist hands out the files with the most tests first; the
# longest ones go first instead, and the one that trains the shared runs below (test_train.py)
# before the others that use them, so that the other process rarely waits for them.
SLOWEST_FILES = ("tests/test_train.py", "tests/test_distributed.py", "tests/test_int_only.py",
                 "tests/test_eval.py", "tests/test_cli_errors.py", "tests/test_scripts.py")


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # an xdist hook; tryfirst: before xdist's own
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlowestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node) -> None:
            for path in reversed(SLOWEST_FILES):
                if path in self.workqueue:
                    self.workqueue.move_to_end(path, last=False)
            super()._assign_work_unit(node)

    return SlowestFirst(config, log)


# ---- tiny trained runs, shared by the tests of train.py, eval.py and scripts/ -------------------
#
# The first process that needs one trains it, under a file lock in the folder both processes
# share; the other waits for it and reuses it.


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, request) -> Path:
    """A folder this session's test processes share: under pytest-xdist the workers' common
    parent (created fresh for each session), else the session's own temporary folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


def built_once(folder: Path, build) -> Path:
    """`folder`, made by build(folder) in the first process that asks; the others wait for that
    process's lock and reuse its result. A build that failed is retried by the next process."""
    import fcntl

    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = folder / ".built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def corpus(shared_tmp):
    """240 demo-corpus pairs as files: 200 to train on, 20 for dev (and test)."""
    from helpers import write_pairs

    from corpus import demo as demo_corpus

    def build(folder: Path) -> None:
        pairs = demo_corpus.generate_pairs(240, seed=7)
        write_pairs(folder, "train", pairs[:200])
        write_pairs(folder, "dev", pairs[200:220])

    folder = str(built_once(shared_tmp / "corpus", build))
    train_de, train_en, dev_de, dev_en = [os.path.join(folder, f"{split}.{lang}")
                                          for split in ("train", "dev") for lang in ("de", "en")]
    return dict(folder=folder, train=(train_de, train_en), dev=(dev_de, dev_en),
                flags=["--train_src", train_de, "--train_tgt", train_en, "--dev_src", dev_de,
                       "--dev_tgt", dev_en, "--test_src", dev_de, "--test_tgt", dev_en,
                       "--spm_dir", folder])


@pytest.fixture(scope="session")
def float_run(corpus, shared_tmp):
    """A tiny float model trained to overfit the 200 training pairs."""
    from helpers import TINY

    import train

    def build(folder: Path) -> None:
        train.main(["--logdir", str(folder / "run"), *TINY, *corpus["flags"], "--d_model", "64",
                    "--d_ff", "256", "--num_blocks", "2", "--dropout_rate", "0", "--smoothing", "0",
                    "--num_epochs", "70", "--dev_max_sentences", "5"])

    return str(built_once(shared_tmp / "float", build) / "run")


@pytest.fixture(scope="session")
def qat_runs(float_run, shared_tmp):
    """W8A8 and W4A8 QAT fine-tuned from the float run (train.py exports each to <logdir>/export)."""
    import train

    def build(folder: Path) -> None:
        train.main(["--logdir", str(folder / "run"), "--init_from", float_run, "--quant", folder.name,
                    "--num_epochs", "3", "--lr", "5e-4", "--warmup_steps", "10", "--dev_max_sentences", "5",
                    "--threshold_log_every", "5"])

    return {preset: str(built_once(shared_tmp / preset, build) / "run") for preset in ("w8a8", "w4a8")}


@pytest.fixture(scope="session")
def intonly_run(qat_runs, shared_tmp):
    """Integer-only W8A8 fine-tuned one epoch from the W8A8 run (its export in <run>/export); what
    train.py printed is in <run>/../train.log."""
    import contextlib

    import train

    def build(folder: Path) -> None:
        with open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log):
            train.main(["--logdir", str(folder / "run"), "--init_from", qat_runs["w8a8"], "--quant", "w8a8",
                        "--integer_only", "--num_epochs", "1", "--lr", "2e-4", "--warmup_steps", "10",
                        "--dev_max_sentences", "5"])

    return str(built_once(shared_tmp / "intonly", build) / "run")


@pytest.fixture(scope="session")
def hw_tools() -> None:
    """Skips where Icarus Verilog, Verilator, yosys or cocotb is missing, with one line saying how to
    install them; fails instead where TQT_REQUIRE_HW=1 (`make test` as root, which installs them, as
    on CI), so that CI never skips the RTL benches silently."""
    from hw import sim

    missing = sim.missing_tools()
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        missing.append("cocotb (pip)")
    if missing:
        message = f"{', '.join(missing)} not found: {sim.INSTALL}"
        if os.environ.get("TQT_REQUIRE_HW") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


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
