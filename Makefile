# Two commands on a fresh machine: `make run` (the whole pipeline) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= default

# Keep every run offline and quiet (the library itself sets nothing at import time).
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_UI_ENABLED := false
export PREFECT_LOGGING_LEVEL := WARNING
export PREFECT_HOME := $(CURDIR)/.prefect
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup data run test bench clean help

help:
	@echo "make run    set up, get the data, run the whole pipeline (PROFILE=$(PROFILE))"
	@echo "make test   set up, run the test suite"
	@echo "make bench  run the benchmarks (not part of the tests)"

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first: if any torch is installed (a CUDA build on a GPU worker) keep it; else the CPU wheel.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/.installed
	@test -d .dvc || { git rev-parse --git-dir >/dev/null 2>&1 || git init -q; dvc init -q; }
	@dvc config core.check_update false >/dev/null 2>&1 || true

# data/raw: kept when it already matches data.dvc; else `dvc pull` from the default remote; else rebuilt
# from the pinned sources, checked against the md5 committed in data.dvc, and pushed to the remote.
data: setup
	@if [ "$$(dvc status --json data.dvc 2>/dev/null)" = "{}" ]; then echo "data/raw: up to date"; \
	elif dvc pull -q data.dvc 2>/dev/null; then echo "data/raw: pulled from the DVC remote"; \
	else echo "data/raw: no remote copy; rebuilding from the pinned sources (about 1-4 minutes)"; \
	  pigeon data fetch >/dev/null || exit 1; \
	  expected="$$(grep -m1 md5: data.dvc)"; mkdir -p .dvc/tmp; cp data.dvc .dvc/tmp/data.dvc.pinned; dvc commit -f -q data.dvc; \
	  if [ "$$(grep -m1 md5: data.dvc)" != "$$expected" ]; then mv .dvc/tmp/data.dvc.pinned data.dvc; \
	    echo "data/raw does not match the md5 pinned in data.dvc ($$expected)" >&2; exit 1; fi; \
	  rm -f .dvc/tmp/data.dvc.pinned; dvc push -q data.dvc || true; fi

run: data
	@if [ "$(PROFILE)" = default ]; then dvc repro; else dvc exp run -S profile=$(PROFILE); fi
	@echo; echo "Results: reports/results.md, reports/metrics.json, reports/samples/; models: models/"
	@echo "Browse runs: mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: setup
	@$(BIN)/python -m pytest -q -x --timeout=900

bench: setup
	@$(BIN)/python -m benchmarks

clean:
	rm -rf .pigeon .prefect .prefect-results mlruns mlartifacts mlflow.db artifacts reports/samples
