"""Golden vectors for RTL test benches: every integer of a teacher-forced forward pass, as NumPy
arrays and `$readmemh` files."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from integer import accumulation, decoding, export_format, fixed_point
from integer.intonly_engine import IntOnlyTransformer, OpRecord
from integer.matmul_engine import IntTransformer, MatmulRecord
from integer.token_ids import BOS, pad_batch


def teacher_forced_trace(engine: IntTransformer, src: np.ndarray
                         ) -> tuple[np.ndarray, list[MatmulRecord], list[OpRecord]]:
    """Greedy-decode `src`, then trace the teacher-forced forward over [BOS] + the output
    (the decoder inputs that produced it). Returns (decoder inputs, matmul records, and the
    integer-only engine's LayerNorm and softmax records: [] for the other engine)."""
    out = decoding.greedy(engine, src)
    tgt_in = np.concatenate([np.full((len(src), 1), BOS), out[:, :-1]], axis=1)
    integer_only = isinstance(engine, IntOnlyTransformer)
    ops_context = engine.tracing_ops() if integer_only else contextlib.nullcontext([])
    with engine.tracing() as trace, ops_context as ops:
        engine.forward(src, tgt_in)
    return tgt_in, trace, [op for op in ops if op.kind in ("layer_norm", "softmax")]


def dump_vectors(engine: IntTransformer, src_ids, out_dir: str) -> list[dict]:
    """Golden vectors: every matmul of a teacher-forced forward over the greedy output.

    For the n-th matmul call, `vectors.npz` holds `<n>.<name>.x` (the activation site's
    integers), `<n>.<name>.w` (the other operand when it is an activation, e.g. K or V; a
    weight operand is the export's `mem/<site>.mem`) and `<n>.<name>.acc` (the accumulator,
    int64, bias included); `mem/` the same as `$readmemh` files (`write_mem`; accumulators 32
    bits, or 64 when they need more). `index.json` lists the calls in execution order with
    shapes, sites, bits and f. Also `src` and `tgt_in`. An integer-only export adds, after the
    matmuls, every LayerNorm's and softmax's integer input and output (`<n>.<name>.in|out`;
    a softmax also its bool key mask `.visible`), in execution order. Returns the index.
    """
    src = pad_batch(list(src_ids)) if isinstance(src_ids, list) else np.asarray(src_ids)
    tgt_in, trace, ops = teacher_forced_trace(engine, src)
    os.makedirs(os.path.join(out_dir, "mem"), exist_ok=True)
    arrays = {"src": src.astype(np.int32), "tgt_in": tgt_in.astype(np.int32)}
    index = []
    for n, rec in enumerate(trace):
        entry = {"call": n, "matmul": rec.name, "acc_shape": list(rec.acc.shape)}
        operands = [("x", rec.x_site, rec.x)]
        if rec.w_site.endswith("/weight"):
            entry["w"] = {"site": rec.w_site, "mem": export_format.mem_file_name(rec.w_site)}
        else:
            operands.append(("w", rec.w_site, rec.w))
        for tag, site, q in operands:
            grid = engine.grids[site]
            key = f"{n:04d}.{rec.name.replace('/', '.')}.{tag}"
            arrays[key] = q.astype(fixed_point.int_dtype(grid.bits, grid.signed))
            export_format.write_mem(os.path.join(out_dir, "mem", key + ".mem"), q, grid.bits, grid.signed)
            entry[tag] = {"site": site, "key": key, "shape": list(q.shape), "bits": grid.bits,
                          "signed": grid.signed, "f": grid.f.tolist()}
        key = f"{n:04d}.{rec.name.replace('/', '.')}.acc"
        wide = accumulation.signed_bits(int(np.abs(rec.acc).max(initial=0))) > fixed_point.BIAS_BITS
        bits = 64 if wide else fixed_point.BIAS_BITS
        arrays[key] = rec.acc.astype(np.int64)
        export_format.write_mem(os.path.join(out_dir, "mem", key + ".mem"), rec.acc, bits, True)
        entry["acc"] = {"key": key, "bits": bits}
        index.append(entry)
    for n, op in enumerate(ops, start=len(trace)):
        (tag, q_in), *_ = op.inputs.items()  # layer_norm: input, softmax: scores
        entry = {"call": n, "op": op.kind, "name": op.name}
        for suffix, q in (("in", q_in), ("out", op.output)):
            key = f"{n:04d}.{op.name.replace('/', '.')}.{suffix}"
            arrays[key] = q.astype(np.int64)
            width = 64 if accumulation.signed_bits(int(np.abs(q).max(initial=0))) > 32 else 32
            export_format.write_mem(os.path.join(out_dir, "mem", key + ".mem"), q, width, True)
            entry[suffix] = {"key": key, "shape": list(q.shape), "bits": width,
                             "tensor": tag if suffix == "in" else "output"}
        if "visible" in op.inputs:
            arrays[f"{n:04d}.{op.name.replace('/', '.')}.visible"] = np.asarray(op.inputs["visible"])
        index.append(entry)
    np.savez(os.path.join(out_dir, "vectors.npz"), **arrays)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index
