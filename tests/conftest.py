"""Shared test setup.

TensorFlow fixes its devices when it first initializes, so the split of the CPU into two
logical devices (for tf.distribute.MirroredStrategy tests) happens here, at import, before any
test touches TF.
"""

import os

import pytest
import tensorflow as tf


def _split_cpu_into_two_logical_devices() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass  # TF was initialized before this conftest ran; two_cpus skips then


_split_cpu_into_two_logical_devices()

import quant  # noqa: E402  (after the device split: importing it initializes TF)


@pytest.fixture(scope="session")
def two_cpus() -> list[str]:
    """Names of two logical CPU devices, e.g. for MirroredStrategy(two_cpus)."""
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
    return "TqtFakeQuantGrad" if quant.GRAD_KERNEL is not None else "QuantizeAndDequantizeV4Grad"
