"""Every op of the integer-only train step and greedy decoding has a GPU kernel for its dtypes, and
no int64 result goes to host memory (scripts/bench_gpu_placement.py). The GPU kernels come from the
snapshot bench/gpu/kernel_registry.json, written by the GPU build: so the check runs under the CPU
build too (CI). Under the GPU build the snapshot is also checked against the live registry."""

from __future__ import annotations

import copy

import pytest
from helpers import load_script

gpu_placement = load_script("bench_gpu_placement")


@pytest.fixture(scope="module")
def registry():
    return gpu_placement.load_snapshot()["kernels"]


@pytest.fixture(scope="module")
def rows(registry):
    return gpu_placement.placement_table(registry, gpu_placement.traced_graphs())


def test_the_integer_only_graphs_stay_on_the_gpu(rows):
    assert gpu_placement.failures(rows) == []
    int64_ops = {r["op"] for r in rows if "int64" in r["dtypes"].values()}
    # the integer kernels' own ops are among them, on the GPU with their int64 results there
    assert {"LeftShift", "RightShift", "BitwiseAnd", "FloorDiv", "SelectV2", "Sum"} <= int64_ops
    assert all(r["where"] == "gpu" for r in rows if "int64" in r["dtypes"].values())
    # int32 results stay on the host only for TF's shapes, indices and token ids
    assert {r["where"] for r in rows} == {"gpu", "gpu, int32 on the host"}
    assert all(set(r["dtypes"].values()) & {"int32", "bool"} for r in rows if r["where"] != "gpu")


def test_an_op_without_a_gpu_kernel_or_with_host_results_fails(rows, registry):
    broken = copy.deepcopy(registry)
    broken["FloorDiv"] = [k for k in broken["FloorDiv"] if k["constraints"].get("T") != ["int64"]]
    host = next(k for k in broken["RightShift"] if k["constraints"].get("T") == ["int64"])
    host["host_memory"] = ["z"]
    del broken["Bitcast"]
    where = {(r["op"], r["dtypes"].get("T")):
             gpu_placement.placement(r["op"], tuple(r["dtypes"].items()), broken)["where"] for r in rows}
    assert where[("FloorDiv", "int64")] == "cpu"
    assert where[("RightShift", "int64")] == "host memory"
    assert where[("Bitcast", "float64")] == "unknown"


def test_the_snapshot_is_the_gpu_builds_registry(registry):
    if not gpu_placement.has_gpu_build():
        pytest.skip("the CPU build of TensorFlow has no GPU kernels to compare the snapshot with: the "
                    "placement check above ran against the snapshot (make setup VARIANT=gpu compares it)")
    assert gpu_placement.live_registry(set(registry)) == registry
