"""Golden vectors for RTL test benches: every integer of a sentence's forward pass, in execution order.

For each source sentence (alone: nothing is padded) the engine greedy-decodes it (up to and including
EOS), then runs the teacher-forced forward with the decoder reading [BOS] + output[:-1], which
computes exactly the integers of the cached decoding steps (row by row), and records every op (the
format: docs/integer_only.md, "Golden vectors"):

    <out>/index.json                 the export it came from, and per sentence its source, its
                                     output and its ops in execution order
    <out>/sentence_<i>/vectors.npz   every tensor of sentence i by key
    <out>/sentence_<i>/mem/<key>.mem the same as `$readmemh` files, each after a `//` header line
                                     (key, shape, bits, signedness, f)

Integer-only exports: every op between the ids and the argmax (embedding sum, requantizing edges,
matmuls with their operands and accumulators, ReLU, residual adds, LayerNorm and softmax with their
intermediates and the key mask, the argmax). Matmul-only exports: every matmul's integer operands
and accumulator (the steps between them are float32: docs/integer_only.md, "The matmul-only export").
"""

from __future__ import annotations

import json
import os

import numpy as np

from integer import accumulation, atomic_files, export_format, site_names
from integer.decoding import greedy
from integer.intonly_engine import IntOnlyTransformer, OpRecord
from integer.matmul_engine import IntTransformer, MatmulRecord
from integer.token_ids import BOS, EOS

ARGMAX = "decoder/argmax"
INDEX = "index.json"


def sentence_pass(engine: IntTransformer, src: list[int]) -> tuple[np.ndarray, list[OpRecord]]:
    """Greedy-decode one sentence, then trace the teacher-forced forward over [BOS] + the output up
    to its EOS. Returns (the output ids, the ops in execution order). An integer-only engine records
    every op and the argmax is appended; a matmul-only engine's matmuls are given as ops."""
    src_row = np.asarray([src], np.int64)
    out = greedy(engine, src_row)[0]
    ends = np.flatnonzero(out == EOS)
    out = out[: ends[0] + 1] if len(ends) else out  # no padding past the sentence's end
    tgt_in = np.concatenate([[BOS], out[:-1]])[None]
    if isinstance(engine, IntOnlyTransformer):
        with engine.tracing_ops() as ops:
            logits = engine.forward(src_row, tgt_in)
        tokens = np.argmax(logits, axis=-1).astype(np.int32)  # the first maximum, as greedy takes it
        ops.append(OpRecord(ARGMAX, "argmax", {"logits": logits}, tokens, {"logits": ops[-1].name},
                            {"out": engine.token_format()}))
        return out, list(ops)
    with engine.tracing() as trace:
        engine.forward(src_row, tgt_in)
    return out, [matmul_op(engine, rec) for rec in trace]


def matmul_op(engine: IntTransformer, rec: MatmulRecord) -> OpRecord:
    """A matmul-only engine's traced matmul as an op: operands on their sites' grids and the
    accumulator (bias included) on f_x + f_w with its proven width (K max|x| max|w| + max|bias|;
    K of this pass: the context matmul's grows with the number of keys)."""
    gx, gw = engine.grids[rec.x_site], engine.grids[rec.w_site]
    weight = rec.w_site in engine.ints and rec.w is engine.ints[rec.w_site]
    bias_key = site_names.dense(rec.name).bias
    bias_key = bias_key if bias_key in engine.ints else None
    bias = 0 if bias_key is None else int(np.abs(engine.ints[bias_key].astype(np.int64)).max(initial=0))
    bound = accumulation.accumulator_bound(rec.x.shape[-1], gx, gw) + bias
    inputs = {"x": rec.x.astype(np.int64)}
    if not weight:
        inputs["w"] = rec.w.astype(np.int64)
    params = {"input_formats": {"x": engine.site_format(rec.x_site), "w": engine.site_format(rec.w_site)},
              "x_site": rec.x_site, "w_site": rec.w_site, "weight": rec.w_site if weight else None,
              "bias": bias_key, "transpose_w": rec.transpose_w,
              "out": {"bits": accumulation.signed_bits(bound), "signed": True,
                      "f": (gx.f + gw.output_f).tolist(), "proven_max_abs": bound}}
    return OpRecord(rec.name, "matmul", inputs, rec.acc.astype(np.int64), {}, params)


def layout(source_shape: tuple, shape: tuple) -> str | None:
    """How an input is laid out from its producer's output: None (as it is), `split_heads`
    ([1, L, d] -> [1, h, L, d/h], head j = columns j d/h .. (j+1) d/h - 1) or `join_heads` (back)."""
    if len(source_shape) == 3 and len(shape) == 4:
        return "split_heads"
    if len(source_shape) == 4 and len(shape) == 3:
        return "join_heads"
    return None


def tensor_format(fmt: dict | None) -> dict:
    """bits, signed, f (and the proven bound) of a stored tensor: its declared format; None only
    for the softmax's bool mask, the one input without a producer or a declared format."""
    if fmt is None:
        return {"bits": 1, "signed": False, "f": 0}
    return {k: fmt[k] for k in ("bits", "signed", "f", "proven_max_abs") if k in fmt}


def _no_grid(_: dict) -> None:
    return None  # a value not on a power-of-two grid


def _integer(_: dict) -> int:
    return 0


# the kernels' intermediates: signedness and grid f, a function of the op's params
STEP_FORMATS = {
    "layer_norm": {"s": (True, lambda p: p["f_in"]), "c": (True, lambda p: p["f_in"]),
                   "W": (False, lambda p: 2 * p["f_in"]), "k": (True, _integer), "D": (False, _no_grid),
                   "r": (False, _no_grid), "n": (True, lambda p: p["F"]),
                   "y": (True, lambda p: p["f_gamma"] + p["F"])},
    "softmax": {"x": (True, lambda p: p["f"]), "x_F": (True, lambda p: p["F"]), "z": (False, _integer),
                "L": (False, _no_grid), "e": (False, _no_grid), "S": (False, _no_grid), "t": (True, _integer),
                "r": (False, _no_grid)},
}


def step_format(op: OpRecord, step: str) -> dict:
    """bits (from the kernel's proven bound), signedness and f of a kernel intermediate."""
    signed, grid = STEP_FORMATS[op.kind][step]
    bound = op.params["proven_max_abs"][step]
    bits = accumulation.signed_bits(bound) - (0 if signed else 1)
    return {"bits": bits, "signed": signed, "f": grid(op.params), "proven_max_abs": bound}


class _Writer:
    """Stores one sentence's tensors: vectors.npz and a mem file each."""

    def __init__(self, folder: str):
        self.folder, self.arrays = folder, {}
        os.makedirs(os.path.join(folder, export_format.MEM_DIR))

    def put(self, key: str, q: np.ndarray, fmt: dict) -> dict:
        q = np.asarray(q)
        self.arrays[key] = q.astype(np.uint8) if q.dtype == np.bool_ else q.astype(np.int64)
        f = "none" if fmt["f"] is None else fmt["f"] if np.ndim(fmt["f"]) == 0 else "vector"
        kind = f"{'int' if fmt['signed'] else 'uint'}{fmt['bits']}"
        header = f"{key} shape {list(q.shape)} {kind} f {f} row-major"
        path = os.path.join(self.folder, export_format.MEM_DIR, key + ".mem")
        export_format.write_mem(path, self.arrays[key], fmt["bits"], fmt["signed"], header)
        return {"key": key, "shape": list(q.shape), **fmt}

    def close(self) -> None:
        np.savez(os.path.join(self.folder, "vectors.npz"), **self.arrays)


_NOT_PARAMS = ("out", "proven_max_abs", "input_formats")  # formats, given with the tensors


def describe(ops: list[OpRecord], writer: _Writer | None = None) -> list[dict]:
    """Each op's entry: inputs (with the call that produced each and the layout), params, output and
    kernel intermediates, each with its bits, signedness, f and proven bound; with a writer the
    tensors are written too and the entries name their keys and shapes (the index), without one
    the entries are the export's op table (the manifest's `ops`, the data sheet's rows)."""

    def put(key: str, q: np.ndarray, fmt: dict) -> dict:
        return writer.put(key, q, fmt) if writer else fmt

    produced: dict[str, tuple[int, dict, tuple]] = {}  # op name -> (call, output format, shape)
    entries = []
    for call, op in enumerate(ops):
        stem = f"{call:04d}.{op.name.replace('/', '.')}"
        entry: dict = {"call": call, "op": op.kind, "name": op.name, "inputs": {}}
        for tag, q in op.inputs.items():
            source = op.sources.get(tag)
            declared = op.params.get("input_formats", {}).get(tag)  # the token ids
            call_from, fmt, shape = produced.get(source, (None, declared, None))
            item = put(f"{stem}.{tag}", q, tensor_format(fmt))
            if source is not None:
                item.update({"source": source, "from": call_from, "layout": layout(shape, np.shape(q))})
            entry["inputs"][tag] = item
        entry["params"] = {k: v for k, v in op.params.items() if k not in _NOT_PARAMS}
        entry["output"] = put(f"{stem}.out", op.output, tensor_format(op.params.get("out")))
        if op.steps:
            entry["steps"] = {step: put(f"{stem}.{step}", q, step_format(op, step))
                              for step, q in op.steps.items()}
            entry["proven_max_abs"] = op.params["proven_max_abs"]  # the steps' and the division's
        produced[op.name] = (call, op.params.get("out"), np.shape(op.output))
        entries.append(entry)
    return entries


def dump_vectors(engine: IntTransformer, src_ids: list[list[int]], out_dir: str) -> dict:
    """Golden vectors of each sentence in `src_ids` (token ids, EOS included) into `out_dir`,
    written atomically (a complete folder or the old one). Returns the index."""
    manifest = engine.manifest or {}
    index = {"format": "golden vectors 2 (docs/integer_only.md)",
             "engine": "integer_only" if isinstance(engine, IntOnlyTransformer) else "matmul_only",
             "export": {"npz_sha256": manifest.get("npz", {}).get("sha256"),
                        "rounding": engine.rounding},
             "sentences": []}
    with atomic_files.atomic_directory(out_dir) as tmp:
        for i, src in enumerate(src_ids):
            output, ops = sentence_pass(engine, list(src))
            writer = _Writer(os.path.join(tmp, f"sentence_{i}"))
            entries = describe(ops, writer)
            writer.close()
            index["sentences"].append({"dir": f"sentence_{i}", "src": [int(t) for t in src],
                                       "output": output.tolist(), "ops": entries})
        atomic_files.write_atomic(os.path.join(tmp, INDEX), json.dumps(index, indent=1))
    return index


def op_table(engine: IntTransformer, src: list[int]) -> list[dict]:
    """The export's ops in execution order, as the data sheet lists them: `describe` of one
    sentence's pass (formats, params, proven bounds; no tensors)."""
    return describe(sentence_pass(engine, src)[1])


def calls(index: dict) -> int:
    """How many ops the index holds over all its sentences."""
    return sum(len(s["ops"]) for s in index["sentences"])
