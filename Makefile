# prune-and-heal: `make demo` runs the pipeline on real SmolLM2, `make test` runs the tests.
# Both install into .venv on first use. CPU machines get torch's CPU wheel via
# constraints-cpu.txt; on a GPU box run `pip install -e '.[eval]'` instead.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export LAYERPRUNE_ARTIFACTS ?= $(CURDIR)/artifacts

.PHONY: install assets demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[eval,dev]'
	touch $(STAMP)

assets: install
	$(VENV)/bin/layerprune fetch

demo: assets
	$(PY) -m flows.prune_and_heal

# OMP_NUM_THREADS=1: with another process busy, torch's default threads ran 100x slower here.
test: assets
	OMP_NUM_THREADS=1 PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q

test-fast: install
	OMP_NUM_THREADS=1 PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -m "not real and not e2e"

bench: assets
	$(PY) benchmarks/extract.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache

# --- Production orchestration (docs/operations.md) -------------------------------------------
# `make server` in one terminal, `make worker` in another, then `make deploy` once.
# PREFECT_API_URL is set for these targets only: demo and test keep Prefect's temporary server.
PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
GPU_SLOTS ?=
server worker deploy: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
worker: export LAYERPRUNE_REPO ?= $(CURDIR)

.PHONY: server worker deploy

server: install
	$(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

# Process workers on both pools; Ctrl-C stops them. On a GPU host, one gpu worker per GPU
# (CUDA_VISIBLE_DEVICES, --limit 1): GPU_IDS=0,1 or GPU_GROUPS="0,1 2,3" (k-GPU runs) override
# what nvidia-smi lists. On GPU hosts run only those (POOLS=gpu), with LAYERPRUNE_ARTIFACTS and
# the AWS_* variables set.
worker: install
	PREFECT=$(PREFECT) deployments/workers.sh

# GPU_SLOTS: the `gpu` limit; empty = the GPUs nvidia-smi lists here, else 1.
deploy: install
	PREFECT=$(PREFECT) GPU_SLOTS=$(GPU_SLOTS) deployments/deploy.sh
