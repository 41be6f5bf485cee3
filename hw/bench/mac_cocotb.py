"""cocotb test of tqt_mac_row (through mac_bench) on Icarus: each group's x [rows, K], w [K, N], bias
[N] and shifts (one, or one per column) are loaded, the bench's sequencer runs every output through
the unit's lanes, and acc (and, where the group has `expect_q`, the requantized q) compared with the
expected integers. Writes the counts to HW_RESULTS and prints `N passed, N failed` (per output row)."""

import cocotb
import numpy as np
from bench_io import Bench, groups, read_words


@cocotb.test()
async def mac_rows(dut):
    bench = Bench(dut)
    await bench.reset()
    for g in groups():
        rows, k = g["x"].shape
        n = g["w"].shape[1]
        shift = np.broadcast_to(g.get("shift", 0), (n,))
        await bench.load({"mem_x": g["x"], "mem_w": g["w"], "mem_bias": g["bias"], "mem_shift": shift})
        dut.rows.value, dut.depth.value, dut.width.value = rows, k, n
        await bench.run_row()
        await bench.dump()
        acc, q = read_words("mem_acc", 64), read_words("mem_q", 64)
        for r in range(rows):
            got = {"acc": acc[r * n:(r + 1) * n]}
            if "expect_q" in g:
                got["q"] = q[r * n:(r + 1) * n]
            bench.check(g, r, got)
    bench.finish()
