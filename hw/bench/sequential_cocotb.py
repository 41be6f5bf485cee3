"""cocotb test of a start/done unit driven directly (tqt_div_round, tqt_isqrt) on Icarus: for each case
of each group in the cases file (HW_CASES), the group's `in_<port>` values go on the ports, `start` is
pulsed, and at `done` the port named by `out_port` is compared with `expect_out` (read as a signed
word unless `out_signed` is 0). Writes the counts to HW_RESULTS and prints `N passed, N failed`."""

import cocotb
from bench_io import PERIOD, Tally, groups, masked, signed
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge


@cocotb.test()
async def one_at_a_time(dut):
    Clock(dut.clk, PERIOD, "step").start()
    dut.start.value = 0
    dut.rst.value = 1
    await RisingEdge(dut.clk)
    dut.rst.value = 0
    tally = Tally()
    for g in groups():
        port = str(g["out_port"])
        out = getattr(dut, port)
        ports = {name[3:]: g[name] for name in g if name.startswith("in_")}
        for i, expected in enumerate(g["expect_out"].tolist()):
            for name, values in ports.items():
                handle = getattr(dut, name)
                handle.value = masked(values[i], len(handle))
            dut.start.value = 1
            await RisingEdge(dut.clk)
            dut.start.value = 0
            await RisingEdge(dut.done)
            await RisingEdge(dut.clk)
            got = signed(out) if int(g["out_signed"]) else int(out.value)
            tally.count(got == expected, {"case": i, "got": got, "expected": expected,
                                          "inputs": {name: int(v[i]) for name, v in ports.items()}})
    tally.finish()
