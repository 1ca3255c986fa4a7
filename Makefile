# Quick start:  make train   (set up, then train a small RetNet on the offline default corpus)
#               make test    (set up with test tools, then run the test suite)
# Extra Hydra overrides go in ARGS:  make train ARGS="model/mixer=hyena trainer.max_steps=2000"
#
# Every install takes exactly the versions in requirements.lock, the set the test suite last passed with, so the
# two commands above give the same environment on any day. `make lock` refreshes it from today's package index
# (within pyproject.toml's ranges) and runs the suite on the new set.
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
# What `make lock` starts from: torch is moved on deliberately (a new release is several GB and changes kernels);
# torchscale is the RetNet oracle of the tests, installed without its dependencies (its pins pull torchvision)
TORCH ?= torch==2.13.0
TORCHSCALE := torchscale==0.3.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q
# the editable install builds with the locked setuptools instead of fetching the newest into an isolated build
INSTALL := $(PIP) install -c $(LOCK) --no-build-isolation

.PHONY: setup setup-test train test lint lock clean clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) install -c $(LOCK) pip setuptools
	$(INSTALL) -e .
	touch $@

# torchscale is set aside for the check and put back after it (a re-run after a change to pyproject.toml finds it
# installed, and pip check would fail on the dependencies it was installed without)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) uninstall -y torchscale
	$(INSTALL) -e ".[test]"
	$(PIP) check
	$(INSTALL) --no-deps torchscale
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

train: setup
	$(BIN)/zoo-train $(ARGS)

# The suite runs on TEST_WORKERS processes (2: the CI machine's cores), each test file on one of them, so a file's
# session fixtures (the tokenised corpus, the interpreter's kernel results) are built once per worker that needs them.
# On a 2-core Intel Xeon it took 12 min 38 s this way against 17 min 50 s to 19 min 48 s on one process; most of its
# time is subprocess runs (zoo-train start-up, sweeps) that leave a core idle. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --timeout=900 -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: setup-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# A fresh environment from today's index, written down as the new lock (local build tags such as +cpu dropped, so
# the lock also serves machines that take torch from PyPI), then the whole suite on it. Commit the lock if it passes.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools
	$(PIP) install "$(TORCH)"
	$(PIP) install --no-build-isolation -e ".[test]"
	$(PIP) check
	$(PIP) install --no-deps "$(TORCHSCALE)"
	{ sed -n '/^#/p' $(LOCK); $(PIP) freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(VENV)/.installed $(VENV)/.installed-test
	$(MAKE) test

# the environment only: the runs made here (folders, checkpoints, the MLflow store, Optuna studies) stay
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# every run made in this folder, together: their folders and checkpoints and the MLflow and Optuna stores that point
# at them (clearing one without the other leaves MLflow runs whose files are gone)
clean-runs:
	rm -rf outputs multirun mlflow.db mlruns mlartifacts optuna.db
