# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
REPO   ?= model_repository
PYTEST_ARGS ?= --durations=12

.PHONY: help setup tools demo lint test test-fast bench build-models proto clean

help:
	@echo "make demo   - set up, build the demo models, run the demo (see README)"
	@echo "make test   - set up, lint (ruff), type-check (mypy --strict) and run the whole test suite (what CI runs)"
	@echo "make test-fast - the test suite without the slow end-to-end tests"
	@echo "make bench  - benchmarks, with baselines measured in the same run"

$(PY):
	$(PYTHON) -m venv $(VENV)

# tritonclient's gRPC client pins protobuf 6, Ray Serve's gRPC side needs protobuf 7: the tests run
# that client from an environment of its own (docs/serving.md, "gRPC")
GRPC_CLIENT := .venv-grpc-client
GRPC_CLIENT_STAMP := $(GRPC_CLIENT)/.installed

$(GRPC_CLIENT_STAMP):
	$(PYTHON) -m venv $(GRPC_CLIENT)
	$(GRPC_CLIENT)/bin/python -m pip install --quiet "tritonclient[grpc]>=2.50" numpy
	@touch $(GRPC_CLIENT_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[build,test]"
	@touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests and the demo use: prometheus (server + promtool), kubectl, wrk (bench),
# chromium (the report's headless-browser test).
# Installed when missing and apt-get can run (root or passwordless sudo); otherwise this says
# which tests will be skipped and why.
TOOLS_PKGS := prometheus kubectl wrk chromium
tools:
	@missing=""; for b in prometheus promtool kubectl wrk chromium; do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	if command -v apt-get >/dev/null && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	  echo "installing Debian packages:$(TOOLS_PKGS) (missing:$$missing)"; \
	  $$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq $(TOOLS_PKGS) >/dev/null || \
	    echo "WARNING: apt-get install failed"; \
	else \
	  echo "WARNING: cannot install$$missing (no apt-get or no root)."; \
	  echo "  Skipped: promtool checks and the real-Prometheus test (prometheus), k8s render tests (kubectl), the report's browser test (chromium); bench falls back to a Python load generator (wrk)."; \
	fi

# the gRPC modules are committed; regenerate them after editing the .proto (a test checks they are current)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serving/proto/grpc_predict_v2.proto

build-models: $(STAMP)
	$(VENV)/bin/ecoserve build-models --repository $(REPO)

demo: build-models tools
	@bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) $(GRPC_CLIENT_STAMP) tools lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) $(GRPC_CLIENT_STAMP) tools lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: build-models tools
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(GRPC_CLIENT) $(REPO) .demo .pytest_cache .hypothesis
