"""cocotb test of tqt_argmax (through argmax_bench) on Icarus: each group's logits [ROWS, N] are loaded,
streamed row by row, and each row's index compared with `expect_out` (the first maximum). Writes the
counts to HW_RESULTS and prints `N passed, N failed` (per row)."""

import cocotb
from bench_io import Bench, groups, read_words


@cocotb.test()
async def argmax_rows(dut):
    bench = Bench(dut)
    await bench.reset()
    for g in groups():
        rows, n = g["logits"].shape
        await bench.load({"mem_logits": g["logits"]})
        dut.rows.value, dut.width.value = rows, n
        await bench.run_row()
        await bench.dump()
        index = read_words("mem_index", len(dut.mem_index[0]), signed_words=False)
        for r in range(rows):
            bench.check(g, r, {"out": [index[r]]})
    bench.finish()
