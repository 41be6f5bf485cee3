"""The data sheet of one export (`datasheet.md` in the export folder), generated from its manifest:
every op in execution order with its grids, shifts, roundings and proven widths, the kernels'
constants and intermediates, and (integer-only) the proven accumulator bounds beside the maxima
observed on dev sentences. The algorithms behind each row: docs/integer_only.md."""

from __future__ import annotations

import numpy as np

from integer import kernels

DATASHEET = "datasheet.md"

# What a matmul-only export computes in float32 before each matmul's x operand (by the matmul's
# last name part; the x operand is then quantized onto the matmul's input site).
FLOAT_BEFORE = {
    "wq": "the block input (the embedding or the previous LayerNorm's output, float32)",
    "wk": "the block input, or (cross-attention) the encoder output",
    "wv": "the block input, or (cross-attention) the encoder output",
    "scores": "Q = acc(wq) 2^-f as float32, split into heads; K likewise from wk",
    "context": "P = softmax(scores 2^-f / sqrt(d_k) + mask bias -1e9), float64 rounded to float32; V from wv",
    "wo": "the heads of the context joined (acc 2^-f as float32)",
    "dense1": "the LayerNorm output before the FFN",
    "dense2": "ReLU(acc(dense1) 2^-f), float32",
    "output_projection": "the last decoder LayerNorm's output; the embedding table transposed",
}


def fmt(item: dict) -> str:
    """`int8 f4`, `uint8 f8`, `int23 f12 (<= 2097237)`; a per-channel f as its range."""
    f = item.get("f")
    if isinstance(f, list):
        flat = np.asarray(f).ravel()
        f = f"{flat.min()}..{flat.max()}" if len(flat) else "-"
    text = f"{'int' if item['signed'] else 'uint'}{item['bits']}" + ("" if f is None else f" f{f}")
    return text + (f" (<= {item['proven_max_abs']})" if "proven_max_abs" in item else "")


def _params(op: dict) -> str:
    p = op["params"]
    kind = op["op"]
    if kind == "requantize":
        return f"shift right {_shift(p['shift'])}, {p['rounding']}, clip"
    if kind == "residual":
        total = f"(x << {_shift(p['x_shift'])}) + (a << {_shift(p['a_shift'])})"
        return f"sum = {total}, exact, {fmt(p['sum'])}; then " + _params({**op, "op": "requantize"})
    if kind == "matmul":
        w = f"`{p['weight']}`" if p["weight"] else "the activation w"
        return f"x @ {w}{'^T' if p['transpose_w'] else ''}" + (f" + `{p['bias']}`" if p["bias"] else "")
    if kind == "embedding_sum":
        return f"`{p['lookup']}`[ids] + `{p['positions']}`[offset + i], clip"
    if kind == "layer_norm":
        product = p["f_gamma"] + p["F"]  # the grid of gamma n + beta
        return (f"K={p['K']} F={p['F']}, `{p['gamma']}` f{p['f_gamma']}, `{p['beta']}` f{product}, "
                f"`{p['eps_q']}`, {p['rounding']}; output shift right {product - op['output']['f']}")
    if kind == "softmax":
        return (f"scores f{p['f']}, clamp x >= {p['clamp']}, onto F={p['F']} {p['exp_rounding']}, "
                f"m={p['m']}, divide {p['rounding']}")
    if kind == "relu":
        return "max(acc, 0)"
    if kind == "align":
        return f"shift left {_shift([-s for s in np.ravel(p['shift'])])}"
    return "first maximum" if kind == "argmax" else ""


def _shift(shift) -> str:
    flat = np.ravel(shift)
    return str(int(flat[0])) if len(set(flat.tolist())) == 1 else f"{flat.min()}..{flat.max()} (a vector)"


def _reads(op: dict) -> str:
    parts = []
    for tag, item in op["inputs"].items():
        where = f"#{item['from']}" if item.get("from") is not None else "pass input"
        layout = f", {item['layout']}" if item.get("layout") else ""
        parts.append(f"{tag}: {where}{layout}, {fmt(item)}")
    return "; ".join(parts)


def render(manifest: dict, title: str = "export") -> str:
    """The data sheet of `manifest` as Markdown."""
    model, ops = manifest["model"], manifest.get("ops", [])
    integer_only = model.get("integer_only", False)
    d_model, heads = model["d_model"], model["num_heads"]
    lines = [f"# Data sheet: {title}", "",
             "Generated from `manifest.json` by `integer/datasheet.py`; the algorithms of each op are in "
             "docs/integer_only.md. An integer q on grid f stands for q 2^-f; `intN`/`uintN` are N-bit "
             "two's-complement / unsigned words; `(<= M)` is the proven bound on |value| (the design "
             "value); `f a..b` a grid that is a vector (per output channel or per table row: min..max, "
             "each in the manifest's site table); `#n` the op that produced an input, `pass input` the "
             "token ids or the mask.", "",
             f"- kind: {'integer-only' if integer_only else 'matmul-only'}, format version "
             f"{manifest['format_version']}, rounding R = `{model['rounding']}`",
             f"- d_model {d_model}, {heads} heads of d_k {d_model // heads}, {model['num_blocks']} encoder "
             f"and {model['num_blocks']} decoder blocks, vocabulary {model['vocab']}",
             f"- ops of one sentence's pass: {len(ops)} (L_s source and L_t target positions; every op "
             "below runs once per pass)", ""]
    if integer_only:
        q_ln2, q_b, q_c = model["softmax_constants"]
        lines += ["## Kernel constants", "",
                  "| softmax F | m = d_k | q_ln2 | q_b | q_c | shift onto F | LayerNorm K | LayerNorm F |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {model['softmax_F']} | {model['softmax_m']} | {q_ln2} | {q_b} | {q_c} | "
                  f"{kernels.EXP_ROUNDING} | {model['layer_norm_K']} | {model['layer_norm_F']} |", ""]
    else:
        lines += _float_steps()
    lines += ["## Order of operations", "",
              "| # | op | writes | reads | computes | output |", "|---|---|---|---|---|---|"]
    for op in ops:
        lines.append(f"| {op['call']} | {op['op']} | `{op['name']}` | {_reads(op)} | {_params(op)} | "
                     f"{fmt(op['output'])} |")
    traced = [op for op in ops if op.get("steps")]  # LayerNorms and softmaxes
    if traced:
        lines += ["", "## Kernel intermediates (proven widths)", ""]
        for kind in ("layer_norm", "softmax"):
            rows = [op for op in traced if op["op"] == kind]
            if not rows:
                continue
            steps = list(rows[0]["proven_max_abs"])
            lines += [f"| {kind} | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
            for op in rows:
                widths = [fmt(op["steps"][s]) if s in op["steps"] else f"<= {op['proven_max_abs'][s]}"
                          for s in steps]
                lines.append(f"| `{op['name']}` | " + " | ".join(widths) + " |")
            lines.append("")
    if "accumulators" in manifest:
        lines += ["## Accumulators and reductions: proven bound and observed maximum", "",
                  f"Observed: {manifest['observed_on']}. The observed maxima are what that text reached, "
                  "not bounds (other text goes higher); size registers by the proven bound.", "",
                  "| matmul or reduction | proven max abs | proven bits | observed max abs | observed bits |",
                  "|---|---|---|---|---|"]
        for name, entry in manifest["accumulators"].items():
            lines.append(f"| `{name}` | {entry['proven_max_abs']} | {entry['proven_bits']} | "
                         f"{entry['observed_max_abs']} | {entry['observed_bits']} |")
    return "\n".join(lines) + "\n"


def _float_steps() -> list[str]:
    return ["## What stays float (matmul-only)", "",
            "Only the matmuls are integer. Before each, the x operand is computed in float32 as below and "
            "quantized onto the matmul's input site, q = clip(R(x 2^f)); the accumulator (bias included, "
            "int32 on f_x + f_w) leaves the matmul as acc 2^-(f_x + f_w) rounded once to float32. Float: "
            "the embedding E_q[id] 2^-f_E sqrt(d_model) + the sinusoidal positions; each residual add "
            "x + sublayer(x) and the LayerNorm after it (gamma, beta float32 in model.npz as "
            "`<block>/lnK/gamma|beta`: encoder ln1 after self-attention, ln2 after the FFN; decoder ln1 "
            "after self-attention, ln2 after cross-attention, ln3 after the FFN; eps in the manifest); the "
            "scores' 1/sqrt(d_k), the -1e9 mask bias and the softmax; ReLU. The bounds below are for K of "
            "the traced sentence: the `context` matmul's grows with the key count L (L max|P| max|V|).", "",
            "| matmul | its x operand is, before quantization |", "|---|---|",
            *[f"| `{leaf}` | {text} |" for leaf, text in FLOAT_BEFORE.items()], ""]


def write(manifest: dict, path: str, title: str = "export") -> None:
    with open(path, "w") as f:
        f.write(render(manifest, title))
