"""Replay golden vectors through the NumPy kernels alone: no engine, no model, only the export's
arrays, the index's params and integer/kernels.py, as an RTL bench would use them."""

from __future__ import annotations

import json
import os

import numpy as np

from integer import export_format, fixed_point, kernels


def arrange(q: np.ndarray, layout: str | None, heads: int) -> np.ndarray:
    """A producer's output as its consumer reads it: split_heads [1, L, d] -> [1, h, L, d/h]
    (head j = columns j d/h .. (j+1) d/h - 1), join_heads back."""
    if layout == "split_heads":
        b, length, d = q.shape
        return q.reshape(b, length, heads, d // heads).transpose(0, 2, 1, 3)
    if layout == "join_heads":
        b, h, length, dk = q.shape
        return q.transpose(0, 2, 1, 3).reshape(b, length, h * dk)
    return q


def recompute(op: dict, ins: dict[str, np.ndarray], arrays: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(output, intermediates) of one op from its stored inputs, its params and the export arrays."""
    p, out = op["params"], op["output"]
    steps: dict[str, np.ndarray] = {}
    kind = op["op"]
    if kind == "embedding_sum":
        ids = ins["ids"]
        total = arrays[p["lookup"]][ids].astype(np.int64) + arrays[p["positions"]][
            p["offset"]:p["offset"] + ids.shape[1]]
        return kernels.clip_to(total, out["bits"], out["signed"]), steps
    if kind == "requantize":
        q = ins["q"]
    if kind == "residual":
        q = (kernels.shift_round(ins["x"], -np.asarray(p["x_shift"]), "floor")
             + kernels.shift_round(ins["a"], -np.asarray(p["a_shift"]), "floor"))
    if kind in ("requantize", "residual"):
        return kernels.requantize(q, np.asarray(p["shift"]), out["bits"], out["signed"], p["rounding"]), steps
    if kind == "matmul":
        w = ins["w"] if p["weight"] is None else arrays[p["weight"]].astype(np.int64)
        if p["transpose_w"]:
            w = np.swapaxes(w, -1, -2)
        acc = np.matmul(ins["x"].astype(np.int64), w)
        return acc + (arrays[p["bias"]] if p["bias"] else 0), steps
    if kind == "relu":
        return np.maximum(ins["acc"], 0), steps
    if kind == "layer_norm":
        y = kernels.layer_norm(ins["input"], arrays[p["gamma"]], arrays[p["beta"]], arrays[p["eps_q"]],
                               p["f_gamma"], out["f"], out["bits"], p["rounding"], p["K"], p["F"], steps,
                               p["normalization"])
        return y, steps
    if kind == "softmax":
        probs, _ = kernels.softmax_with_sums(ins["scores"], p["f"], ins["visible"].astype(bool), out["bits"],
                                             p["rounding"], p["F"], p["m"], steps, p["normalization"])
        return probs, steps
    if kind == "align":
        return kernels.shift_round(ins["acc"], np.asarray(p["shift"]), "floor"), steps
    if kind == "argmax":
        return np.argmax(ins["logits"], axis=-1), steps
    raise AssertionError(f"unknown op {kind!r}")


def replay(vectors_dir: str, export_dir: str) -> dict[str, int]:
    """Check every op of every sentence: each input with a producer equals that producer's stored
    output (laid out as the index says), each output and intermediate equals the kernels' result
    from the stored inputs, every tensor lies within its declared bits and proven bound, the mem
    files hold the npz's values, and the argmax is the decoded output. Returns counts per kind."""
    with open(os.path.join(vectors_dir, "index.json")) as f:
        index = json.load(f)
    manifest = export_format.read_manifest(export_dir)
    arrays = export_format.load_arrays(export_dir, manifest)
    heads = manifest["model"]["num_heads"]
    counts: dict[str, int] = {}
    for n, sentence in enumerate(index["sentences"]):
        folder = os.path.join(vectors_dir, sentence["dir"])
        with np.load(os.path.join(folder, "vectors.npz")) as npz:
            v = {key: npz[key] for key in npz.files}
        outputs: dict[int, np.ndarray] = {}
        for op in sentence["ops"]:
            ins = {tag: v[item["key"]] for tag, item in op["inputs"].items()}
            for tag, item in op["inputs"].items():
                if item.get("from") is not None:
                    expected = arrange(outputs[item["from"]], item["layout"], heads)
                    np.testing.assert_array_equal(ins[tag], expected, err_msg=f"{op['name']} {tag}")
            got, steps = recompute(op, ins, arrays)
            stored = v[op["output"]["key"]]
            np.testing.assert_array_equal(stored, got, err_msg=op["name"])
            for step, item in op.get("steps", {}).items():
                np.testing.assert_array_equal(v[item["key"]], steps[step], err_msg=f"{op['name']} {step}")
            for item in [*op["inputs"].values(), op["output"], *op.get("steps", {}).values()]:
                check_format(v[item["key"]], item, op["name"])
                if n == 0:  # the mem files of the first sentence
                    mem = export_format.read_mem(os.path.join(folder, "mem", item["key"] + ".mem"),
                                                 item["bits"], item["signed"])
                    np.testing.assert_array_equal(mem, v[item["key"]].ravel().astype(np.int64))
            outputs[op["call"]] = stored
            counts[op["op"]] = counts.get(op["op"], 0) + 1
        if index["engine"] == "integer_only":
            np.testing.assert_array_equal(outputs[len(sentence["ops"]) - 1][0], sentence["output"])
    return counts


def check_format(q: np.ndarray, item: dict, name: str) -> None:
    """q fits its declared bits and signedness, and its proven bound where one is given."""
    lo, hi = fixed_point.integer_range(item["bits"], item["signed"])
    q = q.astype(np.int64)
    assert lo <= q.min(initial=0) and q.max(initial=0) <= hi, (name, item["key"], item["bits"])
    if "proven_max_abs" in item:
        assert np.abs(q).max(initial=0) <= item["proven_max_abs"], (name, item["key"])
