"""The hardware proof, NumPy and integer/ only on the Python side: the integer-only kernels in
SystemVerilog (rtl/), their cocotb and Verilator benches (bench/), the units' parameters from an
export (params), an export's golden vectors through the units (golden), a whole block composed from
them (block), running the simulators (sim) and the units' cost by yosys (cost). docs/hardware.md."""
