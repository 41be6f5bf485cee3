# `make demo`: set up .venv and run the whole pipeline on the embedded corpus.
# `make test`: set up .venv, lint, run the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
# the demo model: small enough to train on 2 CPU cores in a few minutes
DEMO_MODEL := --d_model 128 --d_ff 512 --num_blocks 2 --num_heads 4 --vocab_size 2000 \
	--dropout_rate 0.1 --lr 1e-3 --warmup_steps 400 --batch_tokens 2048

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --logdir $(DEMO)/float $(DEMO_MODEL) --num_epochs 8
	$(BIN)/python eval.py --logdir $(DEMO)/float --summary $(DEMO)/summary.json --summary_key float

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data $(VENV)
