"""cocotb test of tqt_layer_norm_row (through layer_norm_bench) on Icarus: each group of rows in the
cases file (HW_CASES, written by hw/sim.py) is loaded into the bench's memories, normalized row by row,
and every output and step compared with the expected integers (integer/kernels.py's). Writes the counts
to HW_RESULTS and prints `N passed, N failed` (a row passes when all its integers are equal)."""

import cocotb
from bench_io import Bench, groups, masked, read_words


@cocotb.test()
async def layer_norm_rows(dut):
    bench = Bench(dut)
    await bench.reset()
    for g in groups():
        rows, d = g["q"].shape
        await bench.load({"mem_q": g["q"], "mem_gamma": g["gamma"], "mem_beta": g["beta"]})
        dut.eps_q.value = int(g["eps_q"])
        dut.out_shift.value = masked(g["out_shift"], len(dut.out_shift))
        for r in range(rows):
            dut.row.value = r
            await bench.run_row()
        await bench.dump()
        out = read_words("mem_out", int(g["out_bits"]))
        steps = {step: read_words(f"mem_{name}", 64) for step, name in
                 (("c", "c"), ("n", "n"), ("y", "y"), ("s", "s"), ("W", "w"), ("k", "k"), ("D", "root"),
                  ("r", "r"))}
        per_row = [step for step in ("s", "W", "k", "D", "r") if f"expect_{step}" in g]  # r: the variant's
        for r in range(rows):
            got = {"out": out[r * d:(r + 1) * d], **{step: steps[step][r * d:(r + 1) * d] for step in "cny"},
                   **{step: steps[step][r:r + 1] for step in per_row}}
            bench.check(g, r, got)
    bench.finish()
