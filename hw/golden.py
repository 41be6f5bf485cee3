"""Replay an export's golden vectors through the RTL units: every op of every sentence, its stored
inputs in, its stored output (and the kernel steps) compared integer for integer. NumPy only.

    python -m hw.golden --export DIR --vectors VEC [--work DIR] [--json out.json]

Each unit is built once on Icarus (widths: the largest any op needs) and fed all its ops through
cocotb; the LayerNorm and softmax ops are also run by the plain Verilator benches, which read the
golden vectors' and the export's own `$readmemh` files. Prints, per op kind, `N passed, N failed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hw import params as hw_params
from hw import sim


def _input_bits(item: dict) -> int:
    """A stored input's register width as a signed RTL port (an unsigned word gets a zero sign bit)."""
    return item["bits"] + (0 if item["signed"] else 1)


class _Plan:
    """The groups of cases and the widths each unit build needs, collected op by op."""

    def __init__(self, export_dir: str, hw: dict):
        self.arrays = np.load(os.path.join(export_dir, "model.npz"))
        self.hw = hw
        self.groups: dict[str, list[dict]] = defaultdict(list)  # build key -> groups
        self.widths: dict[str, dict] = defaultdict(dict)  # build key -> parameter maxima
        self.ops: dict[str, int] = defaultdict(int)  # op kind -> count
        self.verilator: list[tuple[str, dict, Path]] = []  # (unit, op, sentence mem folder)

    def widen(self, key: str, **values: int) -> None:
        for name, value in values.items():
            self.widths[key][name] = max(self.widths[key].get(name, value), value)

    def add(self, op: dict, vectors: dict, mem: Path) -> None:
        kind, name, out = op["op"], op["name"], op["output"]
        ins = {tag: vectors[item["key"]] for tag, item in op["inputs"].items()}
        expect = vectors[out["key"]]
        p = op["params"]
        self.ops[kind] += 1
        if kind == "embedding_sum":
            ids = ins["ids"][0]
            rows = self.arrays[p["positions"]][p["offset"]:p["offset"] + len(ids)]
            self.groups["embedding_sum"].append(
                {"in_lookup": self.arrays[p["lookup"]][ids], "in_position": rows, "expect_out": expect,
                 "out_bits": out["bits"], "out_signed": 1})
            self.widen("embedding_sum", W=out["bits"])
        elif kind in ("requantize", "align"):
            shift = np.broadcast_to(np.asarray(p["shift"]), expect.shape)
            key = f"requantize_{out['bits']}_{int(out['signed'])}"
            self.groups[key].append({"in_q": ins[next(iter(ins))], "in_shift": shift, "expect_out": expect,
                                     "out_bits": out["bits"], "out_signed": int(out["signed"])})
            item = next(iter(op["inputs"].values()))
            self.widen(key, IN_W=_input_bits(item), OUT_W=out["bits"], OUT_SIGNED=int(out["signed"]),
                       MAX_LEFT=max(-int(np.min(shift)), 0))
        elif kind == "relu":
            self.groups["relu"].append({"in_acc": ins["acc"], "expect_out": expect,
                                        "out_bits": out["bits"] + 1,
                                        "out_signed": 1})
            self.widen("relu", W=op["inputs"]["acc"]["bits"])
        elif kind == "residual":
            shape = expect.shape
            self.groups["residual"].append(
                {"in_x": ins["x"], "in_a": ins["a"],
                 "in_x_shift": np.broadcast_to(np.asarray(p["x_shift"]), shape),
                 "in_a_shift": np.broadcast_to(np.asarray(p["a_shift"]), shape),
                 "in_shift": np.broadcast_to(np.asarray(p["shift"]), shape), "expect_out": expect,
                 "out_bits": out["bits"], "out_signed": 1})
            self.widen("residual", X_W=op["inputs"]["x"]["bits"], A_W=op["inputs"]["a"]["bits"],
                       SUM_W=p["sum"]["bits"], OUT_W=out["bits"])
        elif kind == "matmul":
            self._matmul(op, ins, expect)
        elif kind == "layer_norm":
            d = expect.shape[-1]
            group = {"q": ins["input"].reshape(-1, d), "gamma": self.arrays[p["gamma"]],
                     "beta": self.arrays[p["beta"]], "eps_q": int(self.arrays[p["eps_q"]]),
                     "out_shift": self.hw["ops"][name]["out_shift"], "out_bits": out["bits"],
                     "expect_out": expect.reshape(-1, d)}
            group |= {f"expect_{s}": vectors[item["key"]].reshape(group["q"].shape[0], -1)
                      for s, item in op["steps"].items()}
            self.groups["layer_norm"].append(group)
            self.widen("layer_norm", ROWS=group["q"].shape[0])
            self.verilator.append(("layer_norm", op, mem))
        elif kind == "softmax":
            length = expect.shape[-1]
            setting = self.hw["ops"][name]
            group = {"scores": ins["scores"].reshape(-1, length), "visible": ins["visible"].reshape(-1,
                                                                                                    length),
                     "clamp": setting["clamp"], "shift": setting["shift"], "expect_out": expect.reshape(-1,
                                                                                                        length)}
            group |= {f"expect_{s}": vectors[item["key"]].reshape(group["scores"].shape[0], -1)
                      for s, item in op["steps"].items()}
            self.groups["softmax"].append(group)
            self.widen("softmax", ROWS=group["scores"].shape[0], L_MAX=length)
            self.verilator.append(("softmax", op, mem))
        elif kind == "argmax":
            logits = ins["logits"].reshape(-1, ins["logits"].shape[-1])
            self.groups["argmax"].append({"logits": logits, "expect_out": expect.reshape(-1, 1)})
            self.widen("argmax", ROWS=logits.shape[0], N=logits.shape[1], W=op["inputs"]["logits"]["bits"],
                       INDEX_W=hw_params.unsigned_bits(logits.shape[1] - 1))
        else:
            raise ValueError(f"op {op['call']} ({name}): no RTL unit for the op kind {kind!r}")

    def _matmul(self, op: dict, ins: dict, expect: np.ndarray) -> None:
        """A matmul as mac_bench groups: one per head of an attention matmul ([1, h, L, .]), else one."""
        p = op["params"]
        w = ins["w"] if p["weight"] is None else self.arrays[p["weight"]].astype(np.int64)
        if p["transpose_w"]:
            w = np.swapaxes(w, -1, -2)
        bias = self.arrays[p["bias"]].astype(np.int64) if p["bias"] else np.zeros(expect.shape[-1], np.int64)
        x = ins["x"]
        heads = x.shape[1] if x.ndim == 4 else 1
        for h in range(heads):
            xh, wh, eh = (x[0, h], w[0, h], expect[0, h]) if x.ndim == 4 else (
                x.reshape(-1, x.shape[-1]), w, expect.reshape(-1, expect.shape[-1]))
            self.groups["mac"].append({"x": xh, "w": wh, "bias": np.broadcast_to(bias, eh.shape[-1:]),
                                       "expect_acc": eh})
            self.widen("mac", ROWS=xh.shape[0], K=xh.shape[1], N=wh.shape[1])
        self.widen("mac", X_W=_input_bits(op["inputs"]["x"]),
                   W_W=_input_bits(op["inputs"]["w"]) if "w" in op["inputs"] else max(
                       int(np.abs(w).max()).bit_length() + 1, 2),
                   ACC_W=op["output"]["bits"])


# the cocotb build of each group key: (toplevel, test module, fixed parameters)
def _build(key: str, widths: dict, hw: dict, rounding: int) -> tuple[str, str, dict]:
    if key.startswith("requantize"):
        return "tqt_shift_round", "elementwise_cocotb", widths | {"ROUNDING": rounding,
                                                                  "SHIFT_W": hw_params.SHIFT_W}
    if key == "relu":
        return "tqt_relu", "elementwise_cocotb", widths
    if key == "residual":
        return "tqt_residual", "elementwise_cocotb", widths | {"ROUNDING": rounding,
                                                               "SHIFT_W": hw_params.SHIFT_W}
    if key == "embedding_sum":
        return "tqt_embedding_sum", "elementwise_cocotb", widths
    if key == "mac":
        return "mac_bench", "mac_cocotb", widths | {"OUT_W": 8, "ROUNDING": rounding}
    if key == "argmax":
        return "argmax_bench", "argmax_cocotb", widths
    if key == "layer_norm":
        return "layer_norm_bench", "layer_norm_cocotb", hw["layer_norm"] | widths
    if key == "softmax":
        return "softmax_bench", "softmax_cocotb", hw["softmax"] | widths
    raise KeyError(key)


def replay(vectors_dir: str, export_dir: str, work_dir: str, verilator: bool = True,
           kinds: tuple[str, ...] | None = None) -> dict:
    """Every op of the vectors (or only those of `kinds`) through the RTL units (cocotb on Icarus;
    LayerNorm and softmax also on Verilator). Returns {"cocotb": {build: counts}, "verilator": {unit:
    counts}, "ops": {kind: n}}."""
    with open(os.path.join(vectors_dir, "index.json")) as f:
        index = json.load(f)
    if index["engine"] != "integer_only":
        raise ValueError(f"{vectors_dir}: golden vectors of a {index['engine']} export; the RTL units "
                         "replay integer-only exports")
    hw = hw_params.export_params(export_dir)
    plan = _Plan(export_dir, hw)
    for sentence in index["sentences"]:
        folder = Path(vectors_dir) / sentence["dir"]
        vectors = np.load(folder / "vectors.npz")
        for op in sentence["ops"]:
            if kinds is None or op["op"] in kinds:
                plan.add(op, vectors, folder / "mem")
    rounding = hw_params.ROUNDING_CODES[index["export"]["rounding"]]
    work = Path(work_dir)
    results: dict = {"ops": dict(plan.ops), "cocotb": {}, "verilator": {}}
    for key, groups in plan.groups.items():
        toplevel, module, parameters = _build(key, plan.widths[key], hw, rounding)
        counts = sim.run_cocotb(toplevel, module, parameters, groups, work / key)
        results["cocotb"][key] = {"groups": len(groups), **counts}
    if verilator:
        results["verilator"] = _verilator(plan, hw, export_dir, work)
    return results


def _verilator(plan: _Plan, hw: dict, export_dir: str, work: Path) -> dict:
    """Each LayerNorm and softmax op through the Verilator benches, from the mem files."""
    export_mem = Path(export_dir) / "mem"
    out: dict[str, dict] = {}
    for unit, top, parameters in (("layer_norm", "tb_layer_norm", hw["layer_norm"]),
                                  ("softmax", "tb_softmax", hw["softmax"])):
        ops = [(op, mem) for kind, op, mem in plan.verilator if kind == unit]
        if not ops:
            continue
        sizes = {k: v for k, v in plan.widths[unit].items() if k in ("ROWS", "L_MAX")}
        totals = {"ops": 0, "passed": 0, "failed": 0, "cycles": 0}
        binary = None
        for op, mem in ops:
            files = {tag: mem / f"{item['key']}.mem" for tag, item in op["inputs"].items()}
            expect = mem / f"{op['output']['key']}.mem"
            shape = op["output"]["shape"]
            setting = hw["ops"][op["name"]]
            if unit == "layer_norm":
                p = op["params"]
                plusargs = {"input": files["input"], "expect": expect, "rows": int(np.prod(shape[:-1])),
                            "gamma": export_mem / f"{p['gamma'].replace('/', '.')}.mem",
                            "beta": export_mem / f"{p['beta'].replace('/', '.')}.mem",
                            "eps_q": setting["eps_q"], "out_shift": setting["out_shift"]}
            else:
                plusargs = {"scores": files["scores"], "visible": files["visible"], "expect": expect,
                            "rows": int(np.prod(shape[:-1])), "length": shape[-1], "clamp": setting["clamp"],
                            "shift": setting["shift"]}
            counts = sim.run_verilator(sim.BENCH / f"{top}.sv", parameters | sizes, plusargs, work / top,
                                       binary)
            binary = counts["binary"]
            totals["ops"] += 1
            for k in ("passed", "failed", "cycles"):
                totals[k] += counts[k] or 0
        out[unit] = totals
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="the integer-only export folder")
    parser.add_argument("--vectors", required=True, help="its golden vectors (eval.py --dump_vectors)")
    parser.add_argument("--work", default="hw_work", help="build folder (default: hw_work)")
    parser.add_argument("--json", help="write the counts here")
    parser.add_argument("--no_verilator", action="store_true", help="skip the Verilator benches")
    args = parser.parse_args(argv)
    for flag, path, name in (("--export", args.export, "manifest.json"), ("--vectors", args.vectors,
                                                                          "index.json")):
        if not os.path.isfile(os.path.join(path, name)):
            sys.exit(f"{flag} {path}: no {name} there")
    missing = sim.missing_tools(("iverilog",) if args.no_verilator else ("iverilog", "verilator"))
    if missing:
        sys.exit(f"{', '.join(missing)} not found: {sim.INSTALL}")
    try:
        results = replay(args.vectors, args.export, args.work, verilator=not args.no_verilator)
    except ValueError as e:
        sys.exit(str(e))
    failed = 0
    for engine in ("cocotb", "verilator"):
        for key, counts in results[engine].items():
            print(f"{engine:9s} {key:22s} {counts['passed']} passed, {counts['failed']} failed")
            failed += counts["failed"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"export": args.export, "vectors": args.vectors, **results}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
