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
	OMP_NUM_THREADS=1 PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -m "not real"

bench: assets
	$(PY) benchmarks/extract.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
