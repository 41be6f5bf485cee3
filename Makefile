# `make demo`: set up .venv and run the whole pipeline on the embedded corpus.
# `make test`: set up .venv, lint, run the tests.
# `make mutation`: mutation testing of the integer core (slow; not part of `make test`).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
# the demo model: small enough to train on 2 CPU cores in a few minutes
DEMO_MODEL := --d_model 128 --d_ff 512 --num_blocks 2 --num_heads 4 --vocab_size 2000 \
	--dropout_rate 0.1 --lr 2e-3 --warmup_steps 300 --batch_tokens 3000 --dev_max_sentences 200
# quantization-aware fine-tuning of the float demo model (W8A8, thresholds trained by Adam)
DEMO_QAT := --quant w8a8 --num_epochs 2 --lr 2e-4 --warmup_steps 100 --dev_max_sentences 200

# the integer core: the TQT op, the bias grid, calibration (quant.py); the grid quantizer, the
# exact-GEMM planner and matmul, mem files (intmodel.py). Names as mutmut spells them.
MUTANTS ?= 'quant.x_check_bits_and_rounding*' 'quant.x_integer_range*' 'quant.x__round*' \
	'quant.x__quantize_dequantize*' 'quant.x_frac_bits*' 'quant.x__inside_mask*' 'quant.x__dot_to*' \
	'quant.x_tqt_fake_quant*' 'quant.x__int32_max*' 'quant.x_quantize_bias*' \
	'quant.xǁ_Observationsǁ*' 'quant.x__log2*' 'quant.x__percentile_threshold*' 'quant.x__mse_log2_t*' \
	'quant.x__kl_j*' 'quant.x__kl_threshold*' 'quant.xǁQuantSiteǁcalibrate*' \
	'intmodel.x_int_dtype*' 'intmodel.x_write_mem*' 'intmodel.x_read_mem*' 'intmodel.xǁGridǁ*' \
	'intmodel.x_accumulator_bound*' 'intmodel.x_bias_dtype*' 'intmodel.x_check_exact*' \
	'intmodel.xǁIntTransformerǁmatmul*' \
	'intmodel.xǁIntTransformerǁ_plan*'

.PHONY: demo test lint mutation clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -f $(DEMO)/summary.json
	$(BIN)/python train.py --logdir $(DEMO)/float $(DEMO_MODEL) --num_epochs 10
	$(BIN)/python eval.py --logdir $(DEMO)/float --summary $(DEMO)/summary.json --summary_key float
	$(BIN)/python train.py --logdir $(DEMO)/w8a8 --init_from $(DEMO)/float $(DEMO_QAT)
	$(BIN)/python eval.py --logdir $(DEMO)/w8a8 --export $(DEMO)/export_w8a8 \
		--summary $(DEMO)/summary.json --summary_key qat_w8a8
	$(BIN)/python eval.py --engine int --export $(DEMO)/export_w8a8 \
		--agree_with $(DEMO)/w8a8/test_hyp_tf.txt --summary $(DEMO)/summary.json --summary_key int_w8a8
	$(BIN)/python scripts/summary_table.py $(DEMO)/summary.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

mutation: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run $(MUTANTS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data mutants $(VENV)
