"""What the cocotb benches share: the cases file, the clock and a row's start/done handshake, moving
whole memories in and out of the bench by `$readmemh`/`$writememh` files (setting each word through the
simulator would take most of the run), the comparison with the expected integers and the results file
(hw/sim.py writes the cases and reads the results)."""

import json
import os

import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge
from cocotb.utils import get_sim_time

PERIOD = 2  # the clock period in simulator steps


def groups() -> list[dict]:
    """The cases file's groups: {name: array} each (keys `<group>/<name>` in HW_CASES)."""
    data = np.load(os.environ["HW_CASES"])
    out: dict[int, dict] = {}
    for key in data.files:
        group, name = key.split("/", 1)
        out.setdefault(int(group), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def masked(value, bits: int) -> int:
    """A (possibly negative) integer as the bits of a `bits`-bit word (two's complement)."""
    return int(value) & ((1 << bits) - 1)


def signed(handle, bits: int | None = None) -> int:
    """A signal's value as a signed integer of its width, or of its low `bits` bits."""
    word = int(handle.value)
    bits = bits or len(handle)
    word &= (1 << bits) - 1
    return word - (1 << bits) if word >> (bits - 1) else word


def memory_file(name: str) -> str:
    return os.path.join(os.environ["HW_MEM_DIR"], f"{name}.hex")


def read_words(name: str, bits: int, signed_words: bool = True) -> list[int | None]:
    """The words a bench's `dump` wrote for its memory `name` (None where a word holds x or z), each
    read as `bits` bits, two's complement when signed_words."""
    words = []
    with open(memory_file(name + ".out")) as f:
        for line in f:
            line = line.split("//", 1)[0].strip()
            if not line:
                continue
            try:
                word = int(line, 16) & ((1 << bits) - 1)
            except ValueError:
                words.append(None)
                continue
            words.append(word - (1 << bits) if signed_words and word >> (bits - 1) else word)
    return words


class Tally:
    """The rows or elements passed and failed, the first mismatches, and the results file (HW_RESULTS)
    with the `N passed, N failed` line every bench prints."""

    def __init__(self):
        self.passed, self.failed, self.mismatches = 0, 0, []

    def count(self, ok: bool, mismatch: dict) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            if len(self.mismatches) < 5:
                self.mismatches.append(mismatch)

    def finish(self, **extra) -> None:
        with open(os.environ["HW_RESULTS"], "w") as f:
            json.dump({"passed": self.passed, "failed": self.failed, "mismatches": self.mismatches, **extra},
                      f)
        print(f"{self.passed} passed, {self.failed} failed")


class Bench(Tally):
    """The clock, the row handshake (row-start pulse, wait for done, count cycles) and the tally."""

    def __init__(self, dut):
        super().__init__()
        self.dut, self.cycles = dut, []
        cocotb_clock = Clock(dut.clk, PERIOD, "step")
        cocotb_clock.start()

    async def reset(self) -> None:
        self.dut.start.value = 0
        self.dut.load.value = 0
        self.dut.dump.value = 0
        self.dut.rst.value = 1
        await RisingEdge(self.dut.clk)
        await RisingEdge(self.dut.clk)
        self.dut.rst.value = 0

    async def load(self, memories: dict[str, np.ndarray]) -> None:
        """Write each array (row-major) as the bench memory of that name's file, then pulse `load`."""
        for name, values in memories.items():
            width = len(getattr(self.dut, name)[0])
            digits = -(-width // 4)
            with open(memory_file(name), "w") as f:
                words = np.asarray(values).ravel().tolist()
                f.write("".join(f"{masked(v, width):0{digits}x}\n" for v in words))
        await self.pulse("load")

    async def dump(self) -> None:
        """Pulse `dump`: the bench writes its result memories (read_words reads them)."""
        await self.pulse("dump")

    async def pulse(self, port: str) -> None:
        getattr(self.dut, port).value = 1
        await RisingEdge(self.dut.clk)
        getattr(self.dut, port).value = 0
        await RisingEdge(self.dut.clk)

    async def run_row(self) -> None:
        """Pulse start, wait for done (no Python at each clock edge between: the simulator runs alone),
        and one more edge so the bench's memories hold the results. The cycles from start to done are
        counted from the simulated time."""
        dut = self.dut
        dut.start.value = 1
        await RisingEdge(dut.clk)
        begin = get_sim_time("step")
        dut.start.value = 0
        await RisingEdge(dut.done)
        self.cycles.append((get_sim_time("step") - begin) // PERIOD + 1)
        await RisingEdge(dut.clk)

    def check(self, group: dict, row: int, got: dict) -> None:
        """Compare one row's integers with the group's expected arrays (`expect_<name>`, a row each)."""
        wrong = [name for name, values in got.items()
                 if None in values or not np.array_equal(np.asarray(values, np.int64),
                                                         group[f"expect_{name}"][row].astype(np.int64).ravel())]
        self.count(not wrong, {"row": row, "steps": wrong})

    def finish(self) -> None:
        super().finish(cycles=self.cycles)
