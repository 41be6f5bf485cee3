"""What the RTL units cost: yosys generic synthesis (no FPGA or cell library: technology-independent
cells) of each unit at given parameters. NumPy only.

Two views of the same netlist:
  word level  (`proc; flatten; opt; wreduce`): the operators by kind with their widths: adders
              (add, sub, neg), multipliers, dividers, comparators, shifters, multiplexers, and the
              flip-flop bits;
  gate level  (`synth -flatten`): the total of yosys' generic gates ($_AND_, $_XOR_, $_MUX_, ...) and
              flip-flops, one number to compare units and variants by.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

from hw import sim

# each unit: its top module and the RTL files it needs
UNITS = {
    "requantize": ("tqt_shift_round", ["tqt_shift_round.sv"]),
    "mac_row": ("tqt_mac_row", ["tqt_shift_round.sv", "tqt_mac_row.sv"]),
    "relu": ("tqt_relu", ["tqt_relu.sv"]),
    "residual": ("tqt_residual", ["tqt_shift_round.sv", "tqt_residual.sv"]),
    "embedding_sum": ("tqt_embedding_sum", ["tqt_embedding_sum.sv"]),
    "argmax": ("tqt_argmax", ["tqt_argmax.sv"]),
    "layer_norm": ("tqt_layer_norm_row", ["tqt_shift_round.sv", "tqt_isqrt.sv", "tqt_div_round.sv",
                                          "tqt_layer_norm_row.sv"]),
    "softmax": ("tqt_softmax_row", ["tqt_shift_round.sv", "tqt_exp.sv", "tqt_div_round.sv",
                                    "tqt_softmax_row.sv"]),
}
UNITS |= {f"{unit}_reciprocal": UNITS[unit] for unit in ("layer_norm", "softmax")}  # RECIPROCAL = 1
KINDS = {"adders": ("$add", "$sub", "$neg", "$alu"), "multipliers": ("$mul", "$macc"),
         "dividers": ("$div", "$mod", "$divfloor", "$modfloor"),
         "comparators": ("$lt", "$le", "$gt", "$ge", "$eq", "$ne", "$eqx", "$nex"),
         "shifters": ("$shl", "$shr", "$sshl", "$sshr", "$shift", "$shiftx"),
         "multiplexers": ("$mux", "$pmux")}
_CELL = re.compile(r"^\s+(\$\w+)\s+(\d+)$", re.M)


def _yosys(script: str) -> str:
    run = subprocess.run(["yosys", "-q", "-p", script], capture_output=True, text=True, cwd=sim.RTL)
    if run.returncode:
        raise RuntimeError(f"yosys failed:\n{run.stderr[-3000:]}")
    return run.stdout


def _statistics(log: str) -> list[Counter]:
    """The cell counts of each `tee -q ... stat` block in a yosys log."""
    return [Counter({m[1]: int(m[2]) for m in _CELL.finditer(block)})
            for block in log.split("Number of cells:")[1:]]


def synthesize(unit: str, parameters: dict) -> dict:
    """The unit's cells: `operators` {kind: {width: count}}, `flip_flop_bits`, `gates` (the generic
    gate-level total, flip-flops included) and `gate_flip_flops`."""
    top, files = UNITS[unit]
    chparam = " ".join(f"-set {k} {v}" for k, v in sim.verilog_parameters(parameters).items())
    script = (f"read_verilog -sv {' '.join(files)}; "
              + (f"chparam {chparam} {top}; " if chparam else "")
              + f"hierarchy -top {top}; proc; flatten; opt; wreduce; opt_clean; "
              "tee -o /dev/stdout stat -width; "
              f"synth -flatten -top {top}; tee -o /dev/stdout stat")
    word, gate = _statistics(_yosys(script))
    operators: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    flip_flop_bits = 0
    for cell, count in word.items():
        name, _, width = cell.rpartition("_")
        if name.startswith(("$dff", "$sdff", "$adff", "$aldff", "$dffe", "$sdffe", "$sdffce", "$adffe")):
            flip_flop_bits += int(width) * count
            continue
        for kind, types in KINDS.items():
            if name in types:
                operators[kind][int(width)] += count
    return {"operators": {kind: dict(sorted(c.items())) for kind, c in operators.items()},
            "flip_flop_bits": flip_flop_bits, "gates": sum(gate.values()),
            "gate_flip_flops": sum(n for cell, n in gate.items() if "DFF" in cell)}
