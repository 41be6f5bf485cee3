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
    residual_bits = max(op["params"]["sum"]["bits"] for op in manifest["ops"] if op["op"] == "residual")
    d, vocab = manifest["model"]["d_model"], manifest["model"]["vocab"]
    return {"d": d, "layer_norm": hw["layer_norm"], "softmax": hw["softmax"],
            **shared_units(d, dense_bits, residual_bits, hw["layer_norm"]["IN_W"],
                           matmuls["decoder/output_projection"],
                           vocab)}


def baseline_profile() -> dict:
    d, d_ff, d_k, vocab, positions, residual = 512, 2048, 64, 32000, 512, 16
    dense_bits = accumulation.signed_bits(d_ff * 255 * 128 + (1 << 20))  # dense2: unsigned ReLU input
    logits_bits = accumulation.signed_bits(d * 128 * 128)
    eps_q = kernels.layer_norm_eps_q(1e-6, 12)
    return {"d": d, "layer_norm": params.layer_norm_params(d, residual, 16, kernels.LN_MAX_ABS_BETA - 1,
                                                           eps_q,
                                                           residual, "half_even"),
            "softmax": params.softmax_params(d_k * 128 * 128, accumulation.signed_bits(d_k * 128 * 128),
                                             list(range(6,
                                                        16)), positions, 8, "half_even", kernels.EXP_F, d_k),
            **shared_units(d, dense_bits, dense_bits + 1, residual, logits_bits, vocab)}


def shared_units(d: int, dense_bits: int, sum_bits: int, residual_bits: int, logits_bits: int,
                 vocab: int) -> dict:
    return {"mac_row": {"LANES": MAC_LANES, "X_W": 9, "W_W": 8, "ACC_W": dense_bits, "OUT_W": 8,
                        "ROUNDING": 2},
            "requantize": {"IN_W": dense_bits, "OUT_W": 8, "ROUNDING": 2},
            "relu": {"W": dense_bits},
            "residual": {"X_W": residual_bits, "A_W": dense_bits, "SUM_W": sum_bits, "OUT_W": residual_bits,
                         "ROUNDING": 2},
            "embedding_sum": {"W": residual_bits},
            "argmax": {"W": logits_bits, "INDEX_W": params.unsigned_bits(vocab - 1)}}


def cycles(profile: dict, work: str) -> dict:
    """Cycles per row measured in simulation: a LayerNorm row of d values, softmax rows of 16, 64 and
    the longest keys, and one MAC-row output of K = d pairs."""
    rng = np.random.default_rng(0)
    d, ln = profile["d"], profile["layer_norm"]
    q = rng.integers(-(1 << 12), 1 << 12, (1, d))
    steps: dict = {}
    out = kernels.layer_norm(q, np.full(d, 1 << 12), np.zeros(d, np.int64), 1, 12, 12, ln["OUT_W"],
                             "half_even",
                             steps=steps)
    group = {"q": q, "gamma": np.full(d, 1 << 12), "beta": np.zeros(d, np.int64), "eps_q": 1,
             "out_shift": 12 + kernels.LN_F - 12, "out_bits": ln["OUT_W"], "expect_out": out,
             **{f"expect_{k}": v for k, v in steps.items()}}
    result = sim.run_cocotb("layer_norm_bench", "layer_norm_cocotb", {**ln, "ROWS": 1}, [group], f"{work}/ln")
    found = {"layer_norm_row": {"d": d, "cycles": result["cycles"][0], "correct": result["failed"] == 0}}
    sm = profile["softmax"]
    longest = (1 << sm["LEN_W"]) - 1
    rows = []
    for length in (16, 64, min(longest, 512)):
        scores = rng.integers(-(1 << 10), 1 << 10, (1, length))
        visible = np.ones((1, length), bool)
        f = kernels.EXP_F - sm["MAX_LEFT"]
        steps = {}
        out, _ = kernels.softmax_with_sums(scores, f, visible, sm["B_P"], "half_even", kernels.EXP_F,
                                           _m_of(sm), steps)
        group = {"scores": scores, "visible": visible.astype(np.uint8), "shift": f - kernels.EXP_F,
                 "clamp": params.clamp_setting(kernels.exp_clamp(f, _m_of(sm)), sm["X_W"]), "expect_out": out,
                 **{f"expect_{k}": v for k, v in steps.items()}}
        result = sim.run_cocotb("softmax_bench", "softmax_cocotb", {**sm, "ROWS": 1, "L_MAX": length},
                                [group],
                                f"{work}/sm{length}")
        rows.append({"keys": length, "cycles": result["cycles"][0], "correct": result["failed"] == 0})
    found["softmax_row"] = rows
    mac = profile["mac_row"]
    x, w = rng.integers(-128, 128, (1, d)), rng.integers(-128, 128, (d, 1))
    result = sim.run_cocotb("mac_bench", "mac_cocotb", {**mac, "ROWS": 1, "K": d, "N": 1},
                            [{"x": x, "w": w, "bias": np.zeros(1, np.int64),
                              "expect_acc": x @ w}], f"{work}/mac")
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
