"""One whole Transformer block in RTL: the golden vectors' ops of a block become a program for
hw/rtl/tqt_block_engine.sv (the units composed with a sequencer), the export's arrays and the block's
input a scratchpad image; after the run every op's output in the scratchpad is compared with the
golden vectors, the block's output (its last LayerNorm) included. NumPy only.

    python -m hw.block --export DIR --vectors VEC [--block encoder/block_1 ...] [--sentence 0] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from hw import params as hw_params
from hw import sim
from integer import export_format

FIELDS = ("op", "dst", "a", "b", "c", "rows", "depth", "width", "a_row", "a_step", "b_step", "b_column",
          "dst_row", "dst_column", "shift", "extra")  # an instruction's 64-bit words (tqt_block_engine.sv)
OPCODES = {"requantize": 1, "matmul": 2, "softmax": 3, "relu": 4, "residual": 5, "layer_norm": 6}
LANES = 16


class Program:
    """The scratchpad image (64-bit words), the instructions, and where each op's output lives."""

    def __init__(self):
        self.words: list[np.ndarray] = []
        self.size = 0
        self.instructions: list[list[int]] = []
        self.regions: dict[int, tuple[int, tuple]] = {}  # call -> (base, storage shape)

    def place(self, values: np.ndarray) -> int:
        base = self.size
        flat = np.asarray(values, np.int64).ravel()
        self.words.append(flat)
        self.size += flat.size
        return base

    def region(self, call: int, shape: tuple) -> int:
        """A zeroed region for op `call`'s output, stored with `shape`."""
        base = self.place(np.zeros(int(np.prod(shape)), np.int64))
        self.regions[call] = (base, shape)
        return base

    def emit(self, op: str, **fields: int) -> None:
        values = {"op": OPCODES[op], "c": -1} | fields
        self.instructions.append([int(values.get(name, 0)) for name in FIELDS])

    def image(self) -> np.ndarray:
        return np.concatenate(self.words)


def _scalar(value, what: str) -> int:
    if np.ndim(value):
        raise ValueError(f"{what}: a shift per channel; the block engine takes per-tensor grids")
    return int(value)


def compile_block(index: dict, sentence: int, block: str, arrays, vectors, hw: dict) -> tuple[Program, list]:
    """The program of `block`'s ops in sentence `sentence`, and the ops."""
    ops = [op for op in index["sentences"][sentence]["ops"] if op["name"].startswith(block + "/")]
    if not ops:
        raise ValueError(f"no op of {block!r} in the golden vectors")
    calls = {op["call"] for op in ops}
    program = Program()
    first_input = None
    for op in ops:  # the block's input: the one tensor it reads from outside
        for item in op["inputs"].values():
            if item.get("from") is not None and item["from"] not in calls:
                first_input = item["from"] if first_input is None else first_input
                if item["from"] != first_input:
                    raise ValueError(f"{block} reads two tensors from outside it")
    outside = next(item for op in ops for item in op["inputs"].values() if item.get("from") == first_input)
    program.regions[first_input] = (program.place(vectors[outside["key"]]), tuple(outside["shape"][1:]))
    heads = None
    for op in ops:
        kind, p, out = op["op"], op["params"], op["output"]
        shape = tuple(out["shape"][1:])  # one sentence: the batch axis is 1
        source = {tag: program.regions.get(item.get("from")) for tag, item in op["inputs"].items()}
        if kind == "requantize":
            dst = program.region(op["call"], shape)
            program.emit("requantize", dst=dst, a=source["q"][0], depth=int(np.prod(shape)),
                         shift=_scalar(p["shift"], op["name"]), extra=0 if out["signed"] else 1)
        elif kind == "relu":
            dst = program.region(op["call"], shape)
            program.emit("relu", dst=dst, a=source["acc"][0], depth=int(np.prod(shape)))
        elif kind == "residual":
            dst = program.region(op["call"], shape)
            program.emit("residual", dst=dst, a=source["x"][0], b=source["a"][0], depth=int(np.prod(shape)),
                         a_row=_scalar(p["x_shift"], op["name"]), a_step=_scalar(p["a_shift"], op["name"]),
                         shift=_scalar(p["shift"], op["name"]))
        elif kind == "layer_norm":
            rows, d = shape
            dst = program.region(op["call"], shape)
            program.emit("layer_norm", dst=dst, a=source["input"][0], b=program.place(arrays[p["gamma"]]),
                         c=program.place(arrays[p["beta"]]), rows=rows, a_row=d, dst_row=d,
                         shift=hw["ops"][op["name"]]["out_shift"], extra=hw["ops"][op["name"]]["eps_q"])
        elif kind == "softmax":
            if not np.all(vectors[op["inputs"]["visible"]["key"]]):
                raise ValueError(f"{op['name']}: a masked key; the block engine's softmax sees every key")
            h, rows, length = shape
            dst = program.region(op["call"], shape)
            setting = hw["ops"][op["name"]]
            program.emit("softmax", dst=dst, a=source["scores"][0], rows=h * rows, depth=length, a_row=length,
                         dst_row=length, shift=setting["shift"], extra=setting["clamp"])
        elif kind == "matmul":
            heads = _matmul(program, op, source, arrays, heads)
        else:
            raise ValueError(f"{op['name']}: no block-engine instruction for {kind!r}")
    program.instructions.append([0] * len(FIELDS))
    return program, ops


def _matmul(program: Program, op: dict, source: dict, arrays, heads: int | None) -> int | None:
    """A dense layer as one instruction; an attention matmul (scores Q K^T, context P V) as one per
    head, reading and writing the heads in place by strides (split and join cost no copy)."""
    p, shape = op["params"], tuple(op["output"]["shape"][1:])
    x_base, x_shape = source["x"]
    if p["weight"] is not None:  # a dense layer: x [L, in] @ W [in, out] (+ bias)
        w = arrays[p["weight"]]
        rows, (depth, width) = x_shape[0], w.shape
        dst = program.region(op["call"], shape)
        bias = program.place(arrays[p["bias"]]) if p["bias"] else -1
        program.emit("matmul", dst=dst, a=x_base, b=program.place(w), c=bias, rows=rows, depth=depth,
                     width=width, a_row=depth, a_step=1, b_step=width, b_column=1, dst_row=width,
                     dst_column=1)
        return heads
    w_base, w_shape = source["w"]
    heads = op["inputs"]["w"]["shape"][1]
    if p["transpose_w"]:  # scores: Q [Lq, d] and K [Lk, d] split into heads; out [h, Lq, Lk]
        (lq, d), lk = x_shape, w_shape[0]
        dk = d // heads
        dst = program.region(op["call"], (heads, lq, lk))
        for h in range(heads):
            program.emit("matmul", dst=dst + h * lq * lk, a=x_base + h * dk, b=w_base + h * dk, rows=lq,
                         depth=dk, width=lk, a_row=d, a_step=1, b_step=1, b_column=d, dst_row=lk,
                         dst_column=1)
    else:  # context: P [h, Lq, Lk] @ V [Lk, d] split into heads; out joined [Lq, d]
        _, lq, lk = x_shape
        d = w_shape[1]
        dk = d // heads
        dst = program.region(op["call"], (lq, d))
        for h in range(heads):
            program.emit("matmul", dst=dst + h * dk, a=x_base + h * lq * lk, b=w_base + h * dk, rows=lq,
                         depth=lk, width=dk, a_row=lk, a_step=1, b_step=d, b_column=1, dst_row=d,
                         dst_column=1)
    return heads


def _storage(values: np.ndarray, shape: tuple) -> np.ndarray:
    """An op's golden output in the scratchpad's layout: context [1, h, L, dk] joined to [L, d]."""
    values = values[0]
    if values.ndim == 3 and len(shape) == 2:
        return values.transpose(1, 0, 2).reshape(shape)
    return values.reshape(shape)


def engine_parameters(hw: dict, ops: list[dict], lanes: int, words: int, instructions: int) -> dict:
    """tqt_block_engine's parameters: the export's unit widths and the block's widest words."""
    acc_bits = max(op["output"]["bits"] for op in ops if op["op"] == "matmul")
    act_bits = max(op["output"]["bits"] for op in ops if op["op"] == "requantize")
    residual = [op for op in ops if op["op"] == "residual"]
    parameters = {"WORDS": words, "OPS": instructions, "LANES": lanes,
                  "ADDR_W": hw_params.unsigned_bits(words),
                  "ROUNDING": hw["layer_norm"]["ROUNDING"], "ACT_W": act_bits, "W_W": 8, "ACC_W": acc_bits,
                  "RES_W": residual[0]["output"]["bits"],
                  "SUM_W": max(op["params"]["sum"]["bits"] for op in residual)}
    shared = ("IN_W", "OUT_W", "ROUNDING", "SHIFT_W")  # the engine's own (RES_W, ROUNDING)
    parameters |= {f"LN_{k}": v for k, v in hw["layer_norm"].items() if k not in shared}
    parameters |= {f"SM_{k}": v for k, v in hw["softmax"].items() if k not in ("ROUNDING", "SHIFT_W")}
    return parameters


def run_block(vectors_dir: str, export_dir: str, work_dir: str, block: str = "encoder/block_1",
              sentence: int = 0) -> dict:
    """Compile, run on Verilator, compare. Returns per-op results, the block output's and the cycles."""
    with open(os.path.join(vectors_dir, "index.json")) as f:
        index = json.load(f)
    if index["engine"] != "integer_only":
        raise ValueError(f"{vectors_dir}: golden vectors of a {index['engine']} export")
    arrays = np.load(os.path.join(export_dir, "model.npz"))
    folder = Path(vectors_dir) / index["sentences"][sentence]["dir"]
    vectors = np.load(folder / "vectors.npz")
    hw = hw_params.export_params(export_dir)
    program, ops = compile_block(index, sentence, block, arrays, vectors, hw)
    weight_bits = max(int(arrays[op["params"]["w_site"] + ".bits"]) for op in ops
                      if op["op"] == "matmul" and op["params"]["weight"])
    if weight_bits > 8:
        raise ValueError(f"{block}: {weight_bits}-bit weights; the block engine reads 8-bit weights")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    image = program.image()
    _write_hex(work / "image.hex", image.tolist(), 64)
    _write_hex(work / "program.hex", [_pack(i) for i in program.instructions], 64 * len(FIELDS))
    parameters = engine_parameters(hw, ops, LANES, image.size, len(program.instructions))
    top = sim.BENCH / "tb_encoder_block.sv"
    result = sim.run_verilator(top, parameters, {"image": work / "image.hex", "program": work / "program.hex",
                                                 "out": work / "out.hex"}, work / "build", counted=False)
    scratch = export_format.read_mem(str(work / "out.hex"), 64, signed=True)  # every word was initialized
    per_op = []
    for op in ops:
        base, shape = program.regions[op["call"]]
        expected = _storage(vectors[op["output"]["key"]], shape)
        got = scratch[base:base + expected.size].reshape(shape)
        differing = int(np.count_nonzero(got != expected))
        per_op.append({"call": op["call"], "op": op["op"], "name": op["name"], "equal": differing == 0,
                       "differing": differing, "values": int(expected.size)})
    last = ops[-1]
    return {"block": block, "sentence": sentence, "ops": per_op, "cycles": result["cycles"],
            "instructions": len(program.instructions) - 1, "output": last["name"],
            "output_equal": per_op[-1]["equal"], "passed": sum(o["equal"] for o in per_op),
            "failed": sum(not o["equal"] for o in per_op)}


def _pack(fields: list[int]) -> int:
    """An instruction as one word: field f at bits [64 f, 64 f + 64)."""
    return sum((v & ((1 << 64) - 1)) << (64 * f) for f, v in enumerate(fields))


def _write_hex(path: Path, words: list[int], bits: int) -> None:
    digits = bits // 4
    with open(path, "w") as f:
        f.write("".join(f"{w & ((1 << bits) - 1):0{digits}x}\n" for w in words))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="the integer-only export folder")
    parser.add_argument("--vectors", required=True, help="its golden vectors (eval.py --dump_vectors)")
    parser.add_argument("--block", action="append",
                        help="a block to run, repeatable (default: encoder/block_1)")
    parser.add_argument("--sentence", type=int, default=0, help="which sentence of the vectors (default 0)")
    parser.add_argument("--work", default="hw_work/block", help="build folder")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    for flag, path, name in (("--export", args.export, "manifest.json"),
                             ("--vectors", args.vectors, "index.json")):
        if not os.path.isfile(os.path.join(path, name)):
            sys.exit(f"{flag} {path}: no {name} there")
    if sim.missing_tools(("verilator",)):
        sys.exit(f"verilator not found: {sim.INSTALL}")
    results = []
    for name in args.block or ["encoder/block_1"]:
        try:
            work = os.path.join(args.work, name.replace("/", "_"))
            result = run_block(args.vectors, args.export, work, name, args.sentence)
        except (ValueError, IndexError) as e:
            sys.exit(f"--block {name}: {e}")
        for op in result["ops"]:
            print(f"{op['call']:4d} {op['op']:11s} {op['name']:50s} {'equal' if op['equal'] else 'DIFFERS'}")
        print(f"{result['passed']} passed, {result['failed']} failed; {result['output']} "
              f"{'equal' if result['output_equal'] else 'DIFFERS'}; {result['cycles']} cycles")
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"export": args.export, "vectors": args.vectors, "blocks": results}, f, indent=1)
    sys.exit(0 if all(r["failed"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
