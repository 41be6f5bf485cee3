"""NumPy only, never TensorFlow: everything an FPGA team reads. The fixed-point contract
(fixed_point, site_names, token_ids, export_format), the integer-only kernels (kernels), the two
engines that run an export (matmul_engine, intonly_engine, with accumulation, float_ops, decoding,
loader), golden vectors for test benches and each export's data sheet (golden_vectors, datasheet),
and the threshold searches and bit budget of the recipe (calibration, bitbudget)."""
