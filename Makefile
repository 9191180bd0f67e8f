# The README's commands. `make run` and `make test` set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mnistops-installed

# No telemetry (these machines have no internet, and users don't want it either): `mnistops` applies
# the project's one list itself (common/settings.py, QUIET); any other command runs under QUIET, which
# applies the same list (an explicit setting wins).
QUIET := $(PY) -m common.settings

.PHONY: setup run test bench gpu-check clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	# gpu: onnxruntime-gpu with its CUDA/cuDNN extras; torch's CUDA build already brings those
	# libraries, so it adds only the runtime's own wheel. Never `serving` beside it (pyproject.toml).
	# Installed by uv, from the indexes, wheel folders and constraints pip is configured with
	# (infra/scripts/uv_install.py says why and what it saves).
	$(PY) infra/scripts/uv_install.py $(PY) -e '.[train,gpu,test]'
	touch $@

run: setup
	$(VENV)/bin/mnistops run

# The suite on pytest-xdist: a test file is the unit (its module fixtures, often a trained model, are
# made once); three processes keep a 2-core machine busy while tests wait on servers and subprocesses.
# `make test PYTEST_ARGS=-n0` runs it in one process.
PYTEST_ARGS ?= -n 3 --dist loadfile

test: setup
	$(QUIET) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(QUIET) $(PY) bench/run_all.py

# The GPU acceptance run (bench/gpu_check.py): on a CUDA machine it trains on every GPU to the gate,
# checks ONNX parity on the CUDA provider and measures the batch job there (< 5 minutes), figures in
# bench/out/gpu.json; without a GPU it prints one line and exits 0 (CI runs it so).
gpu-check: setup
	$(QUIET) $(PY) bench/gpu_check.py

clean:
	rm -rf .mnistops bench/out
