"""The RTL units' cost at the demo export's widths and at the baseline's: yosys generic synthesis
(operators by kind and width, flip-flop bits, generic gates) and cycles per row measured in
simulation (cocotb on Icarus), written as JSON.

    python scripts/bench_hw.py --export runs/demo/export_intonly_w8a8 --json bench/hw/cost.json

The demo's widths come from its export (hw/params.py; the MAC, requantizer, residual and argmax from
its manifest's proven accumulator widths). The baseline's (d = 512, d_ff = 2048, 8 heads, vocab 32000,
W8A8, 16-bit residual stream, rows of up to 512 keys) from the same proven bounds, with two stated
assumptions where the widths depend on trained grids: softmax scores on grids f = 6..15 and the
LayerNorm eps_q of eps = 1e-6 on an input grid f_in = 12.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hw import cost, params, sim  # noqa: E402
from integer import accumulation, kernels  # noqa: E402

MAC_LANES = 16  # the MAC row's lanes: 16 outputs of a matmul per K cycles


def demo_profile(export_dir: str) -> dict:
    """Each unit's parameters for the export's widths (the largest any of its ops needs)."""
    hw = params.export_params(export_dir)
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    matmuls = {name: acc["proven_bits"] for name, acc in manifest["accumulators"].items()
               if not name.endswith(("/residual_sum", "/variance", "/softmax_sum"))}
    dense_bits = max(bits for name, bits in matmuls.items() if not name.endswith("output_projection"))
    sum_bits = max(op["params"]["sum"]["bits"] for op in manifest["ops"] if op["op"] == "residual")
    d, vocab = manifest["model"]["d_model"], manifest["model"]["vocab"]
    return {"d": d, **normalizations(hw["layer_norm"], hw["softmax"]),
            **shared_units(dense_bits, sum_bits, hw["layer_norm"]["IN_W"],
                           matmuls["decoder/output_projection"],
                           vocab)}


def baseline_profile() -> dict:
    d, d_ff, d_k, vocab, positions, residual = 512, 2048, 64, 32000, 512, 16
    dense_bits = accumulation.signed_bits(d_ff * 255 * 128 + (1 << 20))  # dense2: unsigned ReLU input
    score_max = d_k * 128 * 128
    layer_norm = params.layer_norm_params(d, residual, 16, kernels.LN_MAX_ABS_BETA - 1,
                                          kernels.layer_norm_eps_q(1e-6, 12), residual, "half_even")
    softmax = params.softmax_params(score_max, accumulation.signed_bits(score_max), list(range(6, 16)),
                                    positions,
                                    8, "half_even", kernels.EXP_F, d_k)
    return {"d": d, **normalizations(layer_norm, softmax),
            **shared_units(dense_bits, dense_bits + 1, residual, accumulation.signed_bits(d * 128 * 128),
                           vocab)}


def normalizations(layer_norm: dict, softmax: dict) -> dict:
    """The LayerNorm and softmax units in both variants: a division per element, or one per row."""
    return {"layer_norm": layer_norm | {"RECIPROCAL": 0}, "softmax": softmax | {"RECIPROCAL": 0},
            "layer_norm_reciprocal": layer_norm | {"RECIPROCAL": 1},
            "softmax_reciprocal": softmax | {"RECIPROCAL": 1}}


def shared_units(dense_bits: int, sum_bits: int, residual_bits: int, logits_bits: int, vocab: int) -> dict:
    return {"mac_row": {"LANES": MAC_LANES, "X_W": 9, "W_W": 8, "ACC_W": dense_bits, "OUT_W": 8,
                        "ROUNDING": 2},
            "requantize": {"IN_W": dense_bits, "OUT_W": 8, "ROUNDING": 2},
            "relu": {"W": dense_bits},
            "residual": {"X_W": residual_bits, "A_W": dense_bits, "SUM_W": sum_bits, "OUT_W": residual_bits,
                         "ROUNDING": 2},
            "embedding_sum": {"W": residual_bits},
            "argmax": {"W": logits_bits, "INDEX_W": params.unsigned_bits(vocab - 1)}}


def layer_norm_cycles(unit: dict, d: int, rng, work: str) -> dict:
    """One row of d values through the LayerNorm unit (checked against the kernel)."""
    normalization = "reciprocal" if unit["RECIPROCAL"] else "exact"
    q, gamma, beta = rng.integers(-(1 << 12), 1 << 12, (1, d)), np.full(d, 1 << 12), np.zeros(d, np.int64)
    steps: dict = {}
    out = kernels.layer_norm(q, gamma, beta, 1, 12, 12, unit["OUT_W"], "half_even", steps=steps,
                             normalization=normalization)
    group = {"q": q, "gamma": gamma, "beta": beta, "eps_q": 1, "out_shift": kernels.LN_F,
             "out_bits": unit["OUT_W"],
             "expect_out": out, **{f"expect_{k}": v for k, v in steps.items()}}
    result = sim.run_cocotb("layer_norm_bench", "layer_norm_cocotb", {**unit, "ROWS": 1}, [group], work)
    return {"d": d, "cycles": result["cycles"][0], "correct": result["failed"] == 0}


def softmax_cycles(unit: dict, length: int, rng, work: str) -> dict:
    """One row of `length` visible keys through the softmax unit (checked against the kernel)."""
    m, f = _m_of(unit), kernels.EXP_F - unit["MAX_LEFT"]
    scores, visible = rng.integers(-(1 << 10), 1 << 10, (1, length)), np.ones((1, length), bool)
    steps: dict = {}
    out, _ = kernels.softmax_with_sums(scores, f, visible, unit["B_P"], "half_even", kernels.EXP_F, m, steps)
    if unit["RECIPROCAL"]:
        out = kernels.normalize_reciprocal(steps["e"], unit["B_P"], "half_even", steps)
    group = {"scores": scores, "visible": visible.astype(np.uint8), "shift": f - kernels.EXP_F,
             "clamp": params.clamp_setting(kernels.exp_clamp(f, m), unit["X_W"]), "expect_out": out,
             **{f"expect_{k}": v for k, v in steps.items()}}
    result = sim.run_cocotb("softmax_bench", "softmax_cocotb", {**unit, "ROWS": 1, "L_MAX": length},
                            [group], work)
    return {"keys": length, "cycles": result["cycles"][0], "correct": result["failed"] == 0}


def cycles(profile: dict, work: str) -> dict:
    """Cycles per row measured in simulation, both normalizations: a LayerNorm row of d values, softmax
    rows of 16, 64 and 512 keys; and one MAC-row group of outputs of K = d pairs."""
    rng = np.random.default_rng(0)
    d = profile["d"]
    found = {}
    for variant in ("", "_reciprocal"):
        found[f"layer_norm{variant}_row"] = layer_norm_cycles(profile[f"layer_norm{variant}"], d, rng,
                                                              f"{work}/ln{variant}")
        unit = profile[f"softmax{variant}"]
        found[f"softmax{variant}_row"] = [softmax_cycles(unit, n, rng, f"{work}/sm{variant}{n}")
                                          for n in (16, 64, 512)]
    x, w = rng.integers(-128, 128, (1, d)), rng.integers(-128, 128, (d, 1))
    group = {"x": x, "w": w, "bias": np.zeros(1, np.int64), "expect_acc": x @ w}
    mac = {**profile["mac_row"], "ROWS": 1, "K": d, "N": 1}
    result = sim.run_cocotb("mac_bench", "mac_cocotb", mac, [group], f"{work}/mac")
    found["mac_row_output"] = {"K": d, "cycles": result["cycles"][0], "correct": result["failed"] == 0}
    return found


def _m_of(softmax: dict) -> int:
    """The scale divisor m whose exp constants the profile's Q_LN2 is."""
    for m in range(1, kernels.EXP_M_MAX + 1):
        if kernels.exp_constants(kernels.EXP_F, m)[0] == softmax["Q_LN2"]:
            return m
    raise ValueError("no m gives these softmax constants")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="the demo's integer-only export")
    parser.add_argument("--json", required=True, help="write the results here")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.export, "manifest.json")):
        sys.exit(f"--export {args.export}: no manifest.json there (run make demo first)")
    missing = sim.missing_tools()
    if missing:
        sys.exit(f"{', '.join(missing)} not found: {sim.INSTALL}")
    start = time.time()
    results = {"command": "python scripts/bench_hw.py " + " ".join(argv or sys.argv[1:]),
               "tools": sim.environment(), "profiles": {}}
    for name, profile in (("demo", demo_profile(args.export)), ("baseline", baseline_profile())):
        units = {}
        for unit in cost.UNITS:
            units[unit] = {"parameters": profile[unit], **cost.synthesize(unit, profile[unit])}
            print(f"{name:8s} {unit:14s} {units[unit]['gates']:7d} gates, {units[unit]['flip_flop_bits']:5d} "
                  "flip-flop bits", flush=True)
        with tempfile.TemporaryDirectory() as work:
            measured = cycles(profile, work)
        results["profiles"][name] = {"d": profile["d"], "units": units, "cycles": measured}
        print(f"{name:8s} cycles: {json.dumps(measured)}", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
