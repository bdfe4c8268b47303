#!/usr/bin/env bash
# GPU benchmark (benchmarks/gpu.py): a 7B-class model with random weights, bf16 and nf4;
# extraction, loss, an MMLU-like pass and QLoRA steps: tokens/s and peak GPU memory.
#
#   benchmarks/gpu.sh [gpu.py options]   run it (GPU machine: no network needed)
#   benchmarks/gpu.sh --tiny             the same paths on a 4-layer model, CPU included
#   benchmarks/gpu.sh wheels             here, with PyPI: put the wheels a bare GPU image lacks
#                                        into .whl/ (55 MB) to carry along
#
# On the GPU machine our package is read from this checkout (PYTHONPATH), and wheels found in
# .whl/ are unpacked to $SITE first: bitsandbytes (nf4), lm-eval (the MMLU pass's scorer
# subclasses its HFLM) and pydantic (layerprune.heal.run's config). Python: $PYTHON, else this
# checkout's .venv, else python3. Figures go to $OUT/gpu_bench.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the benchmark imports that the device image (its KINDS.md package list) lacks, at the
# versions of this project's CPU environment. Checked here by running --tiny with every other
# lm-eval dependency (datasets, evaluate, dill, sqlitedict, ...) made unimportable: HFLM and
# loglikelihood need none of them. bitsandbytes 0.50.2 ships CUDA 13.0 kernels (image: cu130).
WHEELS=(bitsandbytes==0.50.2 lm_eval==0.4.13 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)
SITE=${SITE:-/tmp/layerprune-gpu-site}

if [[ "${1:-}" == wheels ]]; then
    mkdir -p .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

PY=${PYTHON:-}
[[ -z "$PY" && -x .venv/bin/python ]] && PY=.venv/bin/python
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu.py "$@"
