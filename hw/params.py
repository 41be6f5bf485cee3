"""The RTL units' parameters (widths, constants) and per-op settings (shifts, eps, clamps) of an export,
derived from its manifest and arrays and the kernels' proven bounds: nothing is typed by hand per
model. NumPy only.

    python -m hw.params --export DIR --out hw_params.json [--svh hw_params.svh]

One LayerNorm unit and one softmax unit serve all of an export's LayerNorms and softmaxes (their
widths are the largest any op needs); what differs between ops is set on the units' ports (the
`ops` table). Every width is the proven bound's (integer/kernels.py `layer_norm_bounds`,
`softmax_bounds`), never an observed maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from integer import accumulation, kernels

ROUNDING_CODES = {"floor": 0, "half_up": 1, "half_even": 2}
SHIFT_W = 8  # every shift port: signed, |shift| <= 62 (kernels.shift_round's domain)
LN_MAX_LEFT = 13  # the LayerNorm output shift is >= -13 (kernels.check_layer_norm_args)


def unsigned_bits(magnitude: int) -> int:
    """Bits of an unsigned register holding 0 .. magnitude (at least 1)."""
    return max(int(magnitude).bit_length(), 1)


def layer_norm_params(d: int, in_bits: int, gamma_bits: int, beta_max_abs: int, eps_q_max: int,
                      out_bits: int, rounding: str, K: int = kernels.LN_K, F: int = kernels.LN_F,
                      normalization: str = "exact") -> dict:
    """tqt_layer_norm_row's parameters for rows of d values on a signed in_bits grid, gammas of
    gamma_bits, |beta| <= beta_max_abs (y's width; beta's word is the export's 49 bits) and
    eps_q <= eps_q_max. ValueError where the unit's shortcut
    does not hold: it shifts the numerator (k + F >= 0 for every W the bounds allow)."""
    bounds = kernels.layer_norm_bounds(d, in_bits, 1 << (gamma_bits - 1), beta_max_abs, eps_q_max, out_bits,
                                       K, F)
    k_min = (2 * K - bounds["W"].bit_length()) >> 1
    if k_min + F < 0:
        raise ValueError(f"LayerNorm with d={d}, {in_bits}-bit inputs and eps_q={eps_q_max} can have "
                         f"k + F = {k_min + F} < 0: the RTL unit shifts only the numerator")
    q_max = 1 << (in_bits - 1)
    return {"D": d, "ADDR_W": unsigned_bits(d - 1), "IN_W": in_bits, "GAMMA_W": gamma_bits,
            "BETA_W": accumulation.signed_bits(kernels.LN_MAX_ABS_BETA - 1),
            "EPS_W": unsigned_bits(eps_q_max) + 1,
            "OUT_W": out_bits, "K": K, "F": F, "ROUNDING": ROUNDING_CODES[rounding],
            "S_W": accumulation.signed_bits(bounds["s"]), "SQ_W": unsigned_bits(d * q_max * q_max),
            "W_W": unsigned_bits(bounds["W"]), "C_W": accumulation.signed_bits(bounds["c"]),
            "NUM_W": accumulation.signed_bits(bounds["numerator"]), "N_Q_W": unsigned_bits(bounds["n"]),
            "Y_W": accumulation.signed_bits(bounds["y"]), "SHIFT_W": SHIFT_W,
            "RECIPROCAL": int(normalization == "reciprocal"), "G": kernels.LN_RECIPROCAL_G}


def division_by_constant(divisor: int, n_bits: int) -> tuple[int, int]:
    """(M, s): floor(n / divisor) = (n M) >> s for every 0 <= n < 2^n_bits, with the least s.
    M = ceil(2^s / divisor) is exact when e = M divisor - 2^s <= 2^(s - n_bits): then
    n M / 2^s = n / divisor + n e / (divisor 2^s), the second term < 1 / divisor, which cannot carry
    n / divisor past the next integer (its fraction is at most (divisor - 1) / divisor)."""
    s = 0
    while True:
        magic = -(-(1 << s) // divisor)
        if (magic * divisor - (1 << s)) << n_bits <= 1 << s:
            return magic, s
        s += 1


def softmax_params(score_max_abs: int, score_bits: int, f_values: list[int], length_max: int,
                   out_bits: int, rounding: str, F: int = kernels.EXP_F, m: int = 1,
                   normalization: str = "exact") -> dict:
    """tqt_softmax_row's parameters for rows of up to length_max scores (|q| <= score_max_abs in
    score_bits) on the grids f_values (one unit serves them all: widths are the largest any needs)."""
    bounds = [kernels.softmax_bounds(score_max_abs, f, length_max, out_bits, F, m) for f in f_values]
    x_f_max = max(b["x_F"] for b in bounds)
    q_ln2, q_b, q_c = kernels.exp_constants(F, m)
    z_in_bits = unsigned_bits(x_f_max)
    magic, magic_shift = division_by_constant(q_ln2, z_in_bits)
    return {"LEN_W": unsigned_bits(length_max), "SC_W": score_bits,
            "X_W": accumulation.signed_bits(max(b["x"] for b in bounds)),
            "XF_W": accumulation.signed_bits(x_f_max), "Z_IN_W": z_in_bits,
            "Z_W": unsigned_bits(max(b["z"] for b in bounds)), "L_W": unsigned_bits(bounds[0]["L"]),
            "S_W": unsigned_bits(max(b["S"] for b in bounds)), "B_P": out_bits,
            "ROUNDING": ROUNDING_CODES[rounding], "SHIFT_W": SHIFT_W,
            "MAX_LEFT": max(max(F - f for f in f_values), 0), "Q_LN2": q_ln2, "Q_B": q_b, "Q_C": q_c,
            "MAGIC": magic, "MAGIC_S": magic_shift, "RECIPROCAL": int(normalization == "reciprocal")}


def clamp_setting(clamp: int, x_bits: int) -> int:
    """The softmax unit's clamp port: the spec's clamp, or the least x_bits-bit value when the clamp
    lies below it (then it never binds: x = q - top >= -2^(x_bits-1) by the proven bound, so
    max(x, clamp) is the same)."""
    return max(int(clamp), -(1 << (x_bits - 1)))


def export_params(export_dir: str) -> dict:
    """The units' parameters and every LayerNorm's and softmax's port settings for the export in
    `export_dir` (an integer-only export: its manifest's `ops` and `model.npz`)."""
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = np.load(os.path.join(export_dir, "model.npz"))
    ops = manifest.get("ops") or []
    norms = [op for op in ops if op["op"] == "layer_norm"]
    softmaxes = [op for op in ops if op["op"] == "softmax"]
    if not norms or not softmaxes:
        raise ValueError(f"{export_dir}: not an integer-only export (its manifest lists no LayerNorm "
                         "or softmax op)")
    rounding = manifest["model"]["rounding"]
    normalization = manifest["model"].get("normalization", "exact")
    settings: dict[str, dict] = {}
    for op in norms:
        p = op["params"]
        settings[op["name"]] = {"unit": "layer_norm", "eps_q": int(arrays[p["eps_q"]]),
                                "out_shift": p["f_gamma"] + p["F"] - op["output"]["f"]}
    ln = norms[0]["params"]
    layer_norm = layer_norm_params(
        manifest["model"]["d_model"], max(op["inputs"]["input"]["bits"] for op in norms),
        max(int(arrays[op["params"]["gamma"] + ".bits"]) for op in norms),
        max(int(np.abs(arrays[op["params"]["beta"]]).max()) for op in norms),
        max(int(arrays[op["params"]["eps_q"]]) for op in norms),
        max(op["output"]["bits"] for op in norms), rounding, ln["K"], ln["F"], normalization)
    scores = [op["inputs"]["scores"] for op in softmaxes]
    sm = softmaxes[0]["params"]
    softmax = softmax_params(max(s["proven_max_abs"] for s in scores), max(s["bits"] for s in scores),
                             sorted({op["params"]["f"] for op in softmaxes}),
                             arrays["embedding_sum/positions"].shape[0],  # max_positions: the longest row
                             max(op["output"]["bits"] for op in softmaxes), rounding, sm["F"], sm["m"],
                             normalization)
    for op in softmaxes:
        p = op["params"]
        settings[op["name"]] = {"unit": "softmax", "shift": p["f"] - p["F"],
                                "clamp": clamp_setting(p["clamp"], softmax["X_W"])}
    return {"export": os.path.basename(os.path.normpath(export_dir)), "layer_norm": layer_norm,
            "softmax": softmax, "ops": settings}


def svh(params: dict) -> str:
    """The units' parameters as SystemVerilog localparams (LN_<NAME>, SM_<NAME>)."""
    lines = [f"// generated by hw/params.py from the export {params['export']}: do not edit"]
    for prefix, unit in (("LN", "layer_norm"), ("SM", "softmax")):
        for name, value in params[unit].items():
            kind = "longint" if abs(value) >= 1 << 31 else "int"
            literal = f"64'sd{value}" if kind == "longint" else str(value)
            lines.append(f"localparam {kind} {prefix}_{name} = {literal};")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an integer-only export folder")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--svh", help="also write the units' parameters as SystemVerilog localparams")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.export, "manifest.json")):
        sys.exit(f"--export {args.export}: no manifest.json there (not an export folder)")
    try:
        params = export_params(args.export)
    except ValueError as e:
        sys.exit(f"--export {args.export}: {e}")
    with open(args.out, "w") as f:
        json.dump(params, f, indent=1)
    if args.svh:
        with open(args.svh, "w") as f:
            f.write(svh(params))


if __name__ == "__main__":
    main()
