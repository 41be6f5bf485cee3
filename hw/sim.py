"""Running the RTL: cocotb benches on Icarus Verilog, plain Verilator `--binary` benches, and the check
that the simulators are installed. NumPy only (cocotb is imported only to run a bench).

A cocotb bench is `hw/bench/<unit>_bench.sv` (the unit with its memories) driven by
`hw/bench/<unit>_cocotb.py`; the cases go in as an .npz of groups (`<group>/<name>` keys: the inputs,
the port settings and the expected integers `expect_<name>`, one row each), the counts come back as
JSON.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

HW = Path(__file__).resolve().parent
RTL = HW / "rtl"
BENCH = HW / "bench"
TOOLS = ("iverilog", "verilator", "yosys")
INSTALL = "apt-get install --no-install-recommends iverilog verilator yosys (`make hw-tools` does it as root)"


def missing_tools(tools: tuple[str, ...] = TOOLS) -> list[str]:
    """The simulators and synthesizers not on PATH."""
    return [tool for tool in tools if shutil.which(tool) is None]


def rtl_sources() -> list[Path]:
    return sorted(RTL.glob("*.sv"))


def write_cases(path: Path, groups: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{i}/{name}": np.asarray(value) for i, group in enumerate(groups)
                      for name, value in group.items()})


def run_cocotb(toplevel: str, test_module: str, parameters: dict, groups: list[dict],
               work_dir: str | Path) -> dict:
    """Build `toplevel` (a unit, or a `hw/bench/*_bench.sv` around one) with `parameters` on Icarus, run
    the cocotb test `hw/bench/<test_module>.py` on `groups`, return its results: passed, failed, the
    first mismatches, and (row benches) the cycles of each row."""
    from cocotb_tools.runner import get_runner

    work = Path(work_dir).resolve()  # the simulator runs in hw/bench/: every path it gets is absolute
    work.mkdir(parents=True, exist_ok=True)
    cases, results, memories = work / "cases.npz", work / "results.json", work / "memories"
    memories.mkdir(exist_ok=True)
    write_cases(cases, groups)
    results.unlink(missing_ok=True)
    runner = get_runner("icarus")
    runner.build(sources=[*rtl_sources(), *sorted(BENCH.glob("*_bench.sv"))], hdl_toplevel=toplevel,
                 parameters=verilog_parameters(parameters), build_dir=work / "build", always=True,
                 build_args=["-g2012"], log_file=work / "build.log")
    runner.test(hdl_toplevel=toplevel, test_module=test_module, test_dir=BENCH,
                results_xml=str(work / "results.xml"),
                build_dir=work / "build", plusargs=[f"+mem_dir={memories}"],
                extra_env={"HW_CASES": str(cases), "HW_RESULTS": str(results), "HW_MEM_DIR": str(memories)},
                log_file=work / "test.log")
    if not results.exists():
        raise RuntimeError(f"the {toplevel} bench wrote no results: see {work / 'test.log'}")
    with open(results) as f:
        return json.load(f)


def verilog_parameters(parameters: dict) -> dict:
    """Parameter values as the simulators read them: wide ones as sized 64-bit literals."""
    return {name: f"64'sd{value}" if abs(int(value)) >= 1 << 31 else int(value)
            for name, value in parameters.items()}


def build_verilator(top: Path, parameters: dict, work_dir: str | Path) -> Path:
    """`verilator --binary` of the testbench `top` (hw/bench/tb_*.sv) with `parameters`: the program."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    defines = [f"-G{name}={value}" for name, value in verilog_parameters(parameters).items()]
    build = subprocess.run(["verilator", "--binary", "-j", "2", "-Wno-fatal", "-Wno-WIDTH", "--top-module",
                            top.stem, "-Mdir", str(work / "obj"), *defines, *map(str, rtl_sources()),
                            *map(str, sorted(BENCH.glob("*_bench.sv"))), str(top)],
                           capture_output=True, text=True)
    if build.returncode:
        raise RuntimeError(f"verilator failed on {top.name}:\n{build.stderr[-3000:]}")
    return work / "obj" / f"V{top.stem}"


def run_verilator(top: Path, parameters: dict, plusargs: dict, work_dir: str | Path,
                  binary: Path | None = None, counted: bool = True) -> dict:
    """Run the Verilator testbench `top` (built by build_verilator unless `binary` is given) with
    `+name=value` plusargs, and parse its `N passed, N failed` line (unless not `counted`: a bench
    whose results are compared outside it) and its `cycles N`."""
    binary = binary or build_verilator(top, parameters, work_dir)
    run = subprocess.run([str(binary), *(f"+{k}={v}" for k, v in plusargs.items())],
                         capture_output=True, text=True)
    counts = re.search(r"(\d+) passed, (\d+) failed", run.stdout)
    if run.returncode or (counted and counts is None) or "cycles" not in run.stdout:
        raise RuntimeError(f"{top.name} did not finish:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    cycles = re.search(r"cycles (\d+)", run.stdout)
    return {"passed": int(counts[1]) if counts else None, "failed": int(counts[2]) if counts else None,
            "output": run.stdout,
            "cycles": int(cycles[1]) if cycles else None, "binary": binary}


def environment() -> dict[str, str]:
    """The versions of the tools that ran (for bench JSON)."""
    versions = {}
    for tool, flag in (("iverilog", "-V"), ("verilator", "--version"), ("yosys", "-V")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True).stdout
            versions[tool] = out.splitlines()[0] if out else "?"
    return versions | {"python": platform.python_version()}
