# prune-and-heal: `make demo` runs the pipeline on real SmolLM2, `make test` runs the tests.
# Both install into .venv on first use, from a lock file with every dependency pinned and
# hash-checked: requirements/cpu.txt (torch's CPU build) by default; on a Linux GPU box,
# `make install LOCK=requirements/cuda.txt` (PyPI's CUDA torch). The locks cover CPython 3.11
# on Linux x86_64 (requirements/check_python.py says so, in one line, anywhere else). `make lock`
# regenerates the locks (requirements/lock.py) after a change to pyproject.toml.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The lock .venv was installed from (.venv/.lock) stays the lock: a plain `make demo` after
# `make install LOCK=requirements/cuda.txt` keeps CUDA torch. Give LOCK=... to change it.
LOCK ?= $(or $(shell cat $(VENV)/.lock 2>/dev/null),requirements/cpu.txt)
STAMP := $(VENV)/.installed-$(notdir $(LOCK))
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check
# The CPU lock pins torch's CPU build (x.y.z+cpu), which PyPI does not host: it comes from
# PyTorch's CPU index, unless pip's own configuration already has that very file (a local wheel
# directory, as on these machines; --require-hashes checks it is the same file either way).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
torch_cpu_pin = $(shell grep -o '^torch==[^ ]*+cpu' $(LOCK) 2>/dev/null)
torch_found_here = $(shell $(PYTHON) -m pip install --quiet --dry-run --no-index --no-deps \
	--ignore-installed '$(torch_cpu_pin)' >/dev/null 2>&1 && echo yes)
torch_index = $(if $(torch_cpu_pin),$(if $(torch_found_here),,--extra-index-url $(TORCH_CPU_INDEX)))
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export LAYERPRUNE_ARTIFACTS ?= $(CURDIR)/artifacts

.PHONY: install lock assets demo test test-fast bench clean browser services

install: $(STAMP)

# The pinned pip first, then exactly the lock: --require-hashes refuses any file whose sha256 the
# lock lacks, --no-deps installs nothing the lock does not name (so a lock missing a dependency
# fails `pip check` instead of pulling in an unpinned one), and the project itself is built by
# the locked setuptools (--no-build-isolation: no unpinned build-time download). An existing
# .venv is updated in place when the lock changes; what a newer lock dropped stays in it until
# `make clean install`.
$(STAMP): pyproject.toml requirements/pip.txt $(LOCK)
	@$(PYTHON) requirements/check_python.py
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --require-hashes --no-deps -r requirements/pip.txt
	$(PIP_INSTALL) --require-hashes --no-deps $(torch_index) -r $(LOCK)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f $(VENV)/.installed*
	echo $(LOCK) > $(VENV)/.lock
	touch $(STAMP)

# Needs PyPI; keeps every pin that still resolves. Upgrades: make lock LOCK_ARGS=--upgrade,
# or LOCK_ARGS='--upgrade-package prefect'. Then `make install` and `make test`.
lock:
	$(PYTHON) requirements/lock.py $(LOCK_ARGS)

assets: install
	$(VENV)/bin/layerprune fetch

demo: assets
	$(PY) -m flows.prune_and_heal

# tests/test_leaderboard.py looks at the leaderboard page in a real browser, Debian's
# `chromium`; it is a system package (not on PyPI), so it is installed here when missing, by
# apt-get as root. Elsewhere install it yourself: the test skips without it, and fails under
# CI=true (a CI run that skipped the only look at the page would prove nothing).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "chromium is missing and cannot be installed here (needs apt-get as root):" \
	         "tests/test_leaderboard.py will skip its browser checks"; \
	  fi; }

# tests/test_production_server.py runs the production server stack for real: PostgreSQL (its
# server binaries; Debian's `postgresql`) and Redis (Debian's `redis-server`), each started by
# the test on 127.0.0.1 in a temporary directory. Installed here when missing, as chromium is.
services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	    systemctl disable --now redis-server postgresql >/dev/null 2>&1 || true; \
	  else \
	    echo "missing:$$missing (install them: tests/test_production_server.py needs them)"; \
	  fi; \
	fi

# lint-imports first: a wrong import fails here with a message that names it (the contracts are
# in pyproject.toml; docs/architecture.md). OMP_NUM_THREADS=1: with another process busy,
# torch's default threads ran 100x slower here.
test: assets browser services
	$(VENV)/bin/lint-imports --no-cache
	OMP_NUM_THREADS=1 PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/lint-imports --no-cache
	OMP_NUM_THREADS=1 PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -m "not real and not e2e and not chaos"

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

# The real three-model sweep of docs/ (benchmarks/real_sweep.sh: its own Prefect server and
# workers on 127.0.0.1, CPU, ~47 min on 2 cores). MODELS=SmolLM2-135M-Instruct: a dry run.
REAL_SWEEP_ARTIFACTS ?= $(CURDIR)/artifacts/real-sweep
.PHONY: real-sweep
real-sweep: assets
	LAYERPRUNE_ARTIFACTS=$(REAL_SWEEP_ARTIFACTS) benchmarks/real_sweep.sh
