# `make demo`: set up .venv and run the whole pipeline on the embedded corpus.
# `make setup VARIANT=gpu`: only set up .venv, with the GPU build of TensorFlow.
# `make test`: set up .venv, build the gradient kernel, lint, run the tests.
# `make kernel`: build csrc/quant_grad.cc, the one-pass QAT backward (skipped, with a note, without a C++
# compiler: training then takes TF's slower kernels, with the same results).
# `make mutation`: mutation testing of the integer core (slow; not part of `make test`).
# `make hw-tools`: install Icarus Verilog, Verilator and yosys from Debian where missing (as root;
# elsewhere one line says how). `make hw`: the RTL benches and their cost on the demo's export.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# the TensorFlow build: cpu (tensorflow-cpu, the default) or gpu (tensorflow[and-cuda]); switching
# uninstalls the other one, so the two never sit side by side
VARIANT ?= cpu
OTHER_TF := $(if $(filter gpu,$(VARIANT)),tensorflow-cpu,tensorflow)
$(if $(filter-out cpu gpu,$(VARIANT)),$(error VARIANT must be cpu or gpu, not $(VARIANT)))
# pytest-xdist processes for `make test`: the suite is mostly single-threaded Python and small TF
# graphs, so two processes keep two cores busy (TEST_WORKERS=0 runs it in this process); whole
# groups of tests go to one process, so fixtures (trained tiny models) are built once (conftest.py)
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(VARIANT)
KERNEL := _quant_grad.so
CXX ?= g++
# TensorFlow's headers warn by the hundred: -w; -fno-trapping-math lets the masked loop vectorize
KERNEL_FLAGS := -shared -fPIC -O3 -fopenmp-simd -fno-trapping-math -w
DEMO := runs/demo
# the demo model: small enough to train on 2 CPU cores in a few minutes
DEMO_MODEL := --d_model 128 --d_ff 512 --num_blocks 2 --num_heads 4 --vocab_size 2000 \
	--dropout_rate 0.1 --lr 2e-3 --warmup_steps 300 --batch_tokens 3000 --dev_max_sentences 200
# quantization-aware fine-tuning of the float demo model (W8A8, thresholds trained by Adam)
DEMO_QAT := --quant w8a8 --num_epochs 2 --lr 2e-4 --warmup_steps 100 --dev_max_sentences 200
# integer-only fine-tuning of the W8A8 model (only the new sites are calibrated)
DEMO_INTONLY := --quant w8a8 --integer_only --num_epochs 1 --lr 1e-4 --warmup_steps 50 \
	--dev_max_sentences 200

# the integer core: grids, roundings, frac bits (integer/fixed_point.py), mem files
# (integer/export_format.py); the TQT op, its fused path and the bias grid (quant.py); the threshold
# searches (integer/calibration.py); exact accumulation and the engine's matmul (integer/
# accumulation.py, integer/matmul_engine.py); the integer-only kernels (integer/kernels.py).
# Names as mutmut spells them.
MUTANTS ?= 'integer.fixed_point.x_check_bits_and_rounding*' 'integer.fixed_point.x_magnitude_bits*' \
	'integer.fixed_point.x_integer_range*' 'integer.fixed_point.x_frac_bits*' \
	'integer.fixed_point.x_round_to_integer*' 'integer.fixed_point.x_int_dtype*' 'integer.fixed_point.xǁGridǁ*' \
	'integer.export_format.x_write_mem*' 'integer.export_format.x_read_mem*' \
	'quant.x__round*' 'quant.x_frac_bits_tensor*' 'quant.x__scale*' 'quant.x__sum_to*' 'quant.x__inputs*' \
	'quant.x_tqt_fake_quant*' 'quant.x__int32_max*' 'quant.x_quantize_bias*' \
	'integer.calibration.xǁObservationsǁ*' 'integer.calibration.x_log2_threshold*' \
	'integer.calibration.x_percentile_threshold*' 'integer.calibration.x_mse_log2_t*' \
	'integer.calibration.x_least_error_log2_t*' 'integer.calibration.x_kl_j*' \
	'integer.calibration.x_kl_threshold*' 'integer.calibration.x_activation_log2_t*' \
	'integer.calibration.x_weight_log2_t*' \
	'integer.accumulation.x_accumulator_bound*' 'integer.accumulation.x_bias_dtype*' \
	'integer.accumulation.x_check_exact*' 'integer.matmul_engine.xǁIntTransformerǁmatmul*' \
	'integer.matmul_engine.xǁIntTransformerǁ_plan*' 'integer.matmul_engine.xǁIntTransformerǁaccumulate*' \
	'integer.kernels.x*'

.PHONY: setup kernel demo test lint mutation clean hw-tools hw

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip uninstall -q -y $(OTHER_TF)
	$(BIN)/python -m pip install -q -e '.[dev,$(VARIANT)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

$(KERNEL): csrc/quant_grad.cc $(STAMP)
	@if command -v $(CXX) >/dev/null; then \
		flags=$$($(BIN)/python -c "import tensorflow as tf; \
			print(*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags())" 2>/dev/null) && \
		$(CXX) $(KERNEL_FLAGS) csrc/quant_grad.cc -o $(KERNEL).tmp $$flags && mv $(KERNEL).tmp $(KERNEL); \
	else echo "note: no C++ compiler '$(CXX)': $(KERNEL) not built, QAT takes TF's slower gradient kernels"; fi

kernel: $(KERNEL)

demo: $(STAMP) $(KERNEL)
	rm -f $(DEMO)/summary.json
	$(BIN)/python train.py --logdir $(DEMO)/float $(DEMO_MODEL) --num_epochs 10
	$(BIN)/python eval.py --logdir $(DEMO)/float --summary $(DEMO)/summary.json --summary_key float
	$(BIN)/python train.py --logdir $(DEMO)/w8a8 --init_from $(DEMO)/float $(DEMO_QAT)
	$(BIN)/python eval.py --logdir $(DEMO)/w8a8 --export_to $(DEMO)/export_w8a8 \
		--summary $(DEMO)/summary.json --summary_key qat_w8a8
	$(BIN)/python eval.py --engine int --export $(DEMO)/export_w8a8 \
		--agree_with $(DEMO)/w8a8/test_hyp_tf.txt --summary $(DEMO)/summary.json --summary_key int_w8a8
	$(BIN)/python train.py --logdir $(DEMO)/intonly_w8a8 --init_from $(DEMO)/w8a8 $(DEMO_INTONLY)
	$(BIN)/python eval.py --logdir $(DEMO)/intonly_w8a8 --export_to $(DEMO)/export_intonly_w8a8 \
		--summary $(DEMO)/summary.json --summary_key qat_intonly_w8a8
	$(BIN)/python eval.py --engine int --export $(DEMO)/export_intonly_w8a8 \
		--agree_with $(DEMO)/intonly_w8a8/test_hyp_tf.txt --summary $(DEMO)/summary.json \
		--summary_key intonly_w8a8
	$(BIN)/python scripts/summary_table.py $(DEMO)/summary.json

HW_TOOLS := iverilog verilator yosys
HW_DEBS := iverilog verilator yosys

# as root (CI) a missing simulator is installed, and the RTL tests then fail rather than skip without
# one (TQT_REQUIRE_HW=1); elsewhere they skip, and this says how to install them
hw-tools:
	@missing=$$(for t in $(HW_TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(HW_DEBS) from Debian"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends $(HW_DEBS) >/dev/null; \
		else echo "note:" $$missing "not found: the RTL benches skip (as root: make hw-tools, or" \
			"apt-get install --no-install-recommends $(HW_DEBS))"; fi; \
	fi

REQUIRE_HW := $(shell [ "$$(id -u)" = 0 ] && echo 1)

test: $(STAMP) $(KERNEL) hw-tools
	$(BIN)/ruff check .
	TQT_REQUIRE_HW=$(REQUIRE_HW) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

HW_EXPORT ?= $(DEMO)/export_intonly_w8a8
HW_VECTORS ?= $(DEMO)/vectors_intonly_w8a8
# the demo export's golden vectors through the RTL units (run `make demo` first), and the units' cost
hw: $(STAMP) hw-tools
	@test -f $(HW_EXPORT)/manifest.json || { echo "no export in $(HW_EXPORT): run make demo first"; exit 1; }
	$(BIN)/python eval.py --engine int --export $(HW_EXPORT) --dump_vectors 3 --out $(HW_VECTORS)
	$(BIN)/python -m hw.golden --export $(HW_EXPORT) --vectors $(HW_VECTORS) --work $(DEMO)/hw_work \
		--json bench/hw/demo_golden.json
	$(BIN)/python -m hw.block --export $(HW_EXPORT) --vectors $(HW_VECTORS) --block encoder/block_1 \
		--block encoder/block_2 --work $(DEMO)/hw_work/block --json bench/hw/demo_block.json
	$(BIN)/python scripts/bench_hw.py --export $(HW_EXPORT) --json bench/hw/cost.json

mutation: $(STAMP) $(KERNEL)
	rm -rf mutants
	$(BIN)/mutmut run $(MUTANTS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data mutants $(VENV) $(KERNEL)
