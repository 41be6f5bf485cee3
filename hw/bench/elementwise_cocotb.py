"""cocotb test of a combinational unit (tqt_shift_round, tqt_relu, tqt_residual, tqt_embedding_sum) on
Icarus: for each element of each group in the cases file (HW_CASES), the group's `in_<port>` values
(arrays, or one value for all) are put on the ports and `out` compared with `expect_out` read as
`out_bits` bits, signed or not (`out_signed`). Writes the counts to HW_RESULTS and prints
`N passed, N failed` (per element)."""

import json
import os

import cocotb
import numpy as np
from bench_io import groups, masked
from cocotb.triggers import Timer


@cocotb.test()
async def elementwise(dut):
    passed = failed = 0
    mismatches = []
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
            word = int(dut.out.value) & ((1 << bits) - 1)
            got = word - (1 << bits) if is_signed and word >> (bits - 1) else word
            if got == expect[i]:
                passed += 1
            else:
                failed += 1
                if len(mismatches) < 5:
                    mismatches.append({"element": i, "got": got, "expected": int(expect[i]),
                                       "inputs": {p: int(v[i]) for p, v in ports.items()}})
    with open(os.environ["HW_RESULTS"], "w") as f:
        json.dump({"passed": passed, "failed": failed, "mismatches": mismatches}, f)
    print(f"{passed} passed, {failed} failed")
