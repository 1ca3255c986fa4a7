# Quick start:  make train   (set up, then train a small RetNet on the offline default corpus)
#               make test    (set up with test tools, then run the test suite)
# Extra Hydra overrides go in ARGS:  make train ARGS="model/mixer=hyena trainer.max_steps=2000"
PYTHON ?= python3
VENV ?= .venv
# torch is installed first so that pip does not replace it; set TORCH=torch (or a CUDA index) on GPU machines
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-test train test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps torchscale==0.3.0
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

train: setup
	$(BIN)/zoo-train $(ARGS)

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --timeout=900 $(ARGS)

lint: setup-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun
