"""cocotb test of a combinational unit (tqt_shift_round, tqt_relu, tqt_residual, tqt_embedding_sum) on
Icarus: for each element of each group in the cases file (HW_CASES), the group's `in_<port>` values
(arrays, or one value for all) are put on the ports and `out` compared with `expect_out` read as
`out_bits` bits, signed or not (`out_signed`). Writes the counts to HW_RESULTS and prints
`N passed, N failed` (per element)."""

import cocotb
import numpy as np
from bench_io import Tally, groups, masked, signed
from cocotb.triggers import Timer


@cocotb.test()
async def elementwise(dut):
    tally = Tally()
    for g in groups():
        expect = g["expect_out"].astype(np.int64).ravel()
        ports = {name[3:]: np.broadcast_to(np.asarray(v, np.int64).ravel() if np.ndim(v) else v, expect.shape)
                 for name, v in g.items() if name.startswith("in_")}
        bits, is_signed = int(g["out_bits"]), bool(g["out_signed"])
        for i in range(expect.size):
            for port, values in ports.items():
                handle = getattr(dut, port)
                handle.value = masked(values[i], len(handle))
            await Timer(1, "step")
            got = signed(dut.out, bits) if is_signed else int(dut.out.value) & ((1 << bits) - 1)
            tally.count(got == expect[i], {"element": i, "got": got, "expected": int(expect[i]),
                                           "inputs": {p: int(v[i]) for p, v in ports.items()}})
    tally.finish()
