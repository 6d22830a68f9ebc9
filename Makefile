# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
REPO   ?= model_repository
PYTEST_ARGS ?=

.PHONY: help setup demo test test-fast bench build-models clean

help:
	@echo "make demo   - set up, build the demo models, run the demo (see README)"
	@echo "make test   - set up and run the whole test suite (what CI runs)"
	@echo "make test-fast - the test suite without the slow end-to-end tests"
	@echo "make bench  - benchmarks, with baselines measured in the same run"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[build,test]"
	@touch $(STAMP)

setup: $(STAMP)

build-models: $(STAMP)
	$(VENV)/bin/ecoserve build-models --repository $(REPO)

demo: build-models
	@bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: build-models
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(REPO) .demo .pytest_cache .hypothesis
