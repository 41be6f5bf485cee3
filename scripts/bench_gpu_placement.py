"""Where the integer-only train step and greedy decoding would run on a GPU, read from TensorFlow's
kernel registry, without a GPU:

    python scripts/bench_gpu_placement.py --registry bench/gpu/kernel_registry.json   # GPU build only
    python scripts/bench_gpu_placement.py --json bench/gpu/placement.json --markdown docs/gpu_placement.md

TF places an op on the GPU only if a GPU kernel is registered for its op type and dtypes; otherwise
on the CPU, with copies both ways. A kernel registered for the GPU may still keep arguments in host
memory: TF's int32 kernels do that (int32 tensors are shapes and indices, computed on the host).
The integer-only graph is int64: every int64 op needs a GPU kernel whose int64 arguments stay in
device memory.

The registry is compiled into the TensorFlow build: the CPU build (tensorflow-cpu) has no GPU
kernels, the GPU build (make setup VARIANT=gpu) has them and reads them without a GPU. So the GPU
build writes a snapshot of the GPU kernels of every op type the graphs use (--registry), kept in
the repository, and the check reads it under either build. tests/test_gpu_placement.py traces the
graphs, checks them against the snapshot (under the CPU build too, so CI covers it), and under the
GPU build checks the snapshot against the live registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402
from tensorflow.python.framework import kernels, op_def_registry  # noqa: E402

import hparams  # noqa: E402
import quant  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from model import Transformer  # noqa: E402

REGISTRY = os.path.join(ROOT, "bench", "gpu", "kernel_registry.json")
GPU_DEVICES = ("GPU", "DEFAULT")  # DEFAULT kernels serve every device, the GPU included
# graph plumbing, not computation: function calls and control flow (lowered into their bodies,
# which are checked), arguments, placeholders
PLUMBING = {"PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile", "If", "StatelessIf",
            "Placeholder", "_Arg", "_Retval", "NoOp"}
# the integer-only configurations traced: each adds or changes kernels (normalization, per-channel
# shifts, roundings)
CONFIGS = {"w8a8": [], "w8a8_reciprocal": ["--normalization", "reciprocal"],
           "w8a8_per_channel_half_up": ["--per_channel", "--rounding", "half_up"]}
TINY_MODEL = ["--d_model", "16", "--d_ff", "32", "--num_blocks", "1", "--num_heads", "2"]


def typed_ops(graph_def: graph_pb2.GraphDef) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """{(op type, ((type attr, dtype), ...)): count} over the graph and every function in its
    library (loop bodies, branches, gradients)."""
    found: dict = {}
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    for node in nodes:
        if node.op in PLUMBING:
            continue
        types = []
        for name, value in sorted(node.attr.items()):
            if value.HasField("type"):
                types.append((name, tf.dtypes.as_dtype(value.type).name))
            elif value.HasField("list") and value.list.type:
                types.append((name, ",".join(tf.dtypes.as_dtype(t).name for t in value.list.type)))
        key = (node.op, tuple(types))
        found[key] = found.get(key, 0) + 1
    return found


def integer_only_graphs(config_flags: list[str]) -> dict[str, graph_pb2.GraphDef]:
    """The train step and greedy decoding of a tiny integer-only model, traced as on a GPU (without
    the CPU-only gradient kernel, quant.GRAD_KERNEL)."""
    hp = hparams.train_parser().parse_args(["--logdir", "unused", "--quant", "w8a8", "--integer_only",
                                            *TINY_MODEL, *config_flags])
    model = Transformer(hp, 40, runs.sites_from_flags(hp))
    optimizers = train.Optimizers(model, hp)
    with quant.without_grad_kernel():
        step = train.make_train_step(model, tf.distribute.get_strategy(), optimizers, train_thresholds=True)
        return {"train_step": step.get_concrete_function().graph.as_graph_def(),
                "greedy": model.greedy.get_concrete_function().graph.as_graph_def()}


def traced_graphs() -> dict[str, dict[str, graph_pb2.GraphDef]]:
    """{configuration: integer_only_graphs} for every configuration in CONFIGS."""
    return {config: integer_only_graphs(flags) for config, flags in CONFIGS.items()}


def live_registry(op_types: set[str]) -> dict[str, list[dict]]:
    """The GPU kernels of each op type in this TensorFlow build: type constraints and host-memory
    arguments."""
    registry = {}
    for op in sorted(op_types):
        entries = []
        for kernel in kernels.get_registered_kernels_for_op(op).kernel:
            if kernel.device_type not in GPU_DEVICES:
                continue
            constraints = {c.name: sorted(tf.dtypes.as_dtype(t).name for t in c.allowed_values.list.type)
                           for c in kernel.constraint}
            entries.append({"device": kernel.device_type, "constraints": constraints,
                            "host_memory": sorted(kernel.host_memory_arg)})
        registry[op] = sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))
    return registry


def has_gpu_build() -> bool:
    return tf.test.is_built_with_cuda()


def _matches(kernel: dict, types: dict[str, str]) -> bool:
    return all(types.get(name) in allowed for name, allowed in kernel["constraints"].items())


def _host_results(op: str, kernel: dict, types: dict[str, str]) -> list[str]:
    """The dtypes of the results the kernel writes to host memory: there it computes on the host.
    Inputs in host memory are parameters (shapes, axes, scalar ranges, variable handles); an op
    without outputs (a variable update) counts its inputs other than the handle."""
    op_def = op_def_registry.get(op)
    args = list(op_def.output_arg) or [a for a in op_def.input_arg if a.type != tf.resource.as_datatype_enum]
    return [types.get(a.type_attr) if a.type_attr else tf.dtypes.as_dtype(a.type).name
            for a in args if a.name in kernel["host_memory"]]


def placement(op: str, types: tuple[tuple[str, str], ...], registry: dict[str, list[dict]]) -> dict:
    """Where TF would run (op, dtypes) on a GPU machine: "gpu", "gpu, int32 on the host" (a kernel
    writing int32 or bool results to host memory: TF's shapes, indices and token ids), "host memory"
    (other results there), "cpu" (no GPU kernel) or "unknown" (the op type is not in the registry)."""
    if op not in registry:
        return {"where": "unknown", "host_memory": []}
    attrs = dict(types)
    kernels_for = [k for k in registry[op] if _matches(k, attrs)]
    if not kernels_for:
        return {"where": "cpu", "host_memory": []}
    # TF picks the device's own kernel before a DEFAULT one
    kernel = sorted(kernels_for, key=lambda k: k["device"] != "GPU")[0]
    host = sorted({d for d in _host_results(op, kernel, attrs) if d})
    if not host:
        return {"where": "gpu", "host_memory": []}
    where = "gpu, int32 on the host" if set(host) <= {"int32", "bool"} else "host memory"
    return {"where": where, "host_memory": host}


def placement_table(registry: dict[str, list[dict]], graphs: dict[str, dict[str, graph_pb2.GraphDef]]
                    ) -> list[dict]:
    """One row per (graph, op type, dtypes) of the traced configurations (traced_graphs), with its
    placement."""
    rows: dict = {}
    for config, by_name in graphs.items():
        for graph_name, graph_def in by_name.items():
            for (op, types), count in typed_ops(graph_def).items():
                row = rows.setdefault((graph_name, op, types), {
                    "graph": graph_name, "op": op, "dtypes": dict(types), "count": 0, "configs": [],
                    **placement(op, types, registry)})
                row["count"] = max(row["count"], count)
                row["configs"].append(config)
    return sorted(rows.values(), key=lambda r: (r["graph"], r["op"], json.dumps(r["dtypes"], sort_keys=True)))


def failures(rows: list[dict]) -> list[str]:
    """The rows that would leave the GPU: no GPU kernel, an op type missing from the registry, or a
    kernel keeping something other than int32 in host memory."""
    return [f"{r['graph']}: {r['op']} {r['dtypes']}: {r['where']}" for r in rows
            if r["where"] not in ("gpu", "gpu, int32 on the host")]


def markdown(rows: list[dict], tf_version: str) -> str:
    """docs/gpu_placement.md: what the table is, then the table."""
    int64 = [r for r in rows if "int64" in r["dtypes"].values()]
    host = [r for r in rows if r["where"] != "gpu"]
    lines = [
        "# Where the integer-only graphs run on a GPU",
        "",
        "Written by `python scripts/bench_gpu_placement.py --markdown docs/gpu_placement.md` from the GPU "
        f"kernels of TensorFlow {tf_version}'s GPU build (`bench/gpu/kernel_registry.json`, written by the "
        "same script with `--registry` under `make setup VARIANT=gpu`; no GPU is needed to read a "
        "registry). Every op type and dtype of the integer-only train step and greedy decoding, traced "
        "for W8A8 with the exact and the reciprocal normalization and with per-channel weights and "
        "half_up rounding, and where TF would run it on a GPU machine: `gpu` (a GPU kernel for these "
        "dtypes, results in device memory), `gpu, int32 on the host` (TF's GPU kernels for int32 keep "
        "their results in host memory: these are shapes, indices, positions and token ids, in both the "
        "matmul-only and the integer-only graphs), `host memory` or `cpu` (no GPU kernel: TF would "
        "copy to the CPU and back).",
        "",
        f"{len(rows)} rows; {len(int64)} with int64, all `gpu`; {len(host)} with int32 results on the "
        f"host; {len(failures(rows))} leaving the GPU. `tests/test_gpu_placement.py` keeps it so (on CI "
        "against the snapshot; under the GPU build also the snapshot against the live registry).",
        "",
        "| graph | op | dtypes | where on a GPU machine | nodes (most in one configuration) |",
        "|---|---|---|---|---:|"]
    for r in rows:
        dtypes = ", ".join(f"{k}={v}" for k, v in r["dtypes"].items()) or "-"
        lines.append(f"| {r['graph']} | {r['op']} | {dtypes} | {r['where']} | {r['count']} |")
    return "\n".join(lines) + "\n"


def load_snapshot(path: str = REGISTRY) -> dict:
    """A registry snapshot: {"tensorflow": the GPU build's version, "kernels": live_registry's dict}."""
    with open(path) as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", help="write the GPU build's kernel snapshot here (needs the GPU build)")
    p.add_argument("--json", help="write the placement table here")
    p.add_argument("--markdown", help="write the placement table as a Markdown table here")
    args = p.parse_args(argv)
    if args.registry and not has_gpu_build():
        raise SystemExit("error: --registry reads the GPU build's kernels: this TensorFlow is the CPU "
                         "build (make setup VARIANT=gpu, or pip install 'tensorflow[and-cuda]')")
    graphs = traced_graphs()
    if args.registry:
        op_types = {op for by_name in graphs.values() for g in by_name.values() for op, _ in typed_ops(g)}
        hparams.write_json(args.registry, {"tensorflow": tf.__version__, "kernels": live_registry(op_types)})
        print(f"{len(op_types)} op types' GPU kernels written to {args.registry}")
    snapshot = load_snapshot(args.registry or REGISTRY)
    rows = placement_table(snapshot["kernels"], graphs)
    bad = failures(rows)
    if args.json:
        hparams.write_json(args.json, {"tensorflow": tf.__version__, "rows": rows, "leaving_the_gpu": bad})
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, snapshot["tensorflow"]))
    print(f"{len(rows)} (graph, op, dtypes) rows; {len(bad)} leave the GPU")
    for line in bad:
        print("  " + line)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    hparams.run_cli(main)
