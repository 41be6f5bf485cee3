"""cocotb test of tqt_softmax_row (through softmax_bench) on Icarus: each group of rows in the cases
file (HW_CASES, written by hw/sim.py) is loaded into the bench's memories, each row's softmax computed,
and the probabilities and every step compared with the expected integers (integer/kernels.py's).
Writes the counts to HW_RESULTS and prints `N passed, N failed` (a row passes when all its integers
are equal)."""

import cocotb
import numpy as np
from bench_io import Bench, groups, masked, read_words


@cocotb.test()
async def softmax_rows(dut):
    bench = Bench(dut)
    await bench.reset()
    l_max = len(dut.mem_p) // len(dut.mem_s)
    for g in groups():
        rows, length = g["scores"].shape
        padded = {name: np.zeros((rows, l_max), np.int64) for name in ("scores", "visible")}
        for name, array in padded.items():
            array[:, :length] = g[name]
        await bench.load({"mem_score": padded["scores"], "mem_visible": padded["visible"]})
        dut.len.value = length
        dut.clamp.value = masked(g["clamp"], len(dut.clamp))
        dut.shift.value = masked(g["shift"], len(dut.shift))
        for r in range(rows):
            dut.row.value = r
            await bench.run_row()
        await bench.dump()
        out = read_words("mem_p", len(dut.mem_p[0]), signed_words=False)
        steps = {step: read_words(f"mem_{name}", 64) for step, name in
                 (("x", "x"), ("x_F", "x_f"), ("z", "z"), ("L", "l"), ("e", "e"), ("S", "s"), ("t", "t"),
                  ("r", "r"))}
        per_row = [step for step in ("S", "t", "r") if f"expect_{step}" in g]  # t, r: the variant's
        for r in range(rows):
            base = r * l_max
            got = {"out": out[base:base + length], **{step: steps[step][r:r + 1] for step in per_row},
                   **{step: steps[step][base:base + length] for step in ("x", "x_F", "z", "L", "e")}}
            bench.check(g, r, got)
    bench.finish()
