# `make demo` and `make test` do all set-up on a fresh machine: a .venv, torch from the local wheels, the package,
# and transformers' own common model tests (from its sdist, for tests/test_transformers_common.py).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitreg-installed
TORCH := torch==2.14.1 torchvision==0.29.1
# DINOv2's own code (April 2023), which the recipe tests compare against; its pins (torch 2.0, xFormers, CUDA
# packages) do not install here and none of the modules the tests import needs them.
DINOV2 := dinov2==0.0.1.dev2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench check-install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DINOV2)
	$(PY) scripts/fetch_transformers_tests.py
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not benchmark" tests

demo: $(STAMP)
	$(PY) -m vitreg.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

# The built wheel installs one import name and resolves with the newest torch on the registry (needs the network).
check-install: $(STAMP)
	PYTHON=$(PY) bash scripts/check_install.sh

clean:
	rm -rf $(VENV) build *.egg-info demo-output
