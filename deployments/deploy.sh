#!/usr/bin/env bash
# Create the work pools and the `gpu` concurrency limit if missing, then register every
# deployment of deployments/prefect.yaml. Idempotent; `make deploy` and the e2e test run it.
#
#   PREFECT           the prefect CLI (default: prefect on PATH)
#   GPU_SLOTS         GPUs that runs may hold at once (global concurrency limit `gpu`; a
#                     k-GPU run holds k): default, the GPUs `nvidia-smi -L` lists here, else 1
#   GPU_POOL_TYPE     process (default), docker or kubernetes
#   GPU_POOL_TEMPLATE base job template for a docker/kubernetes gpu pool, e.g.
#                     deployments/docker-gpu-pool.json (needs prefect-docker / prefect-kubernetes)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}
if [ -z "${GPU_SLOTS:-}" ]; then
  GPU_SLOTS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  [ "$GPU_SLOTS" -ge 1 ] 2>/dev/null || GPU_SLOTS=1
fi
GPU_POOL_TYPE=${GPU_POOL_TYPE:-process}

create_pool() {  # name type [template]
  if $PREFECT work-pool inspect "$1" >/dev/null 2>&1; then
    echo "work pool $1 exists"
  elif [ -n "${3:-}" ]; then
    $PREFECT work-pool create "$1" --type "$2" --base-job-template "$3"
  else
    $PREFECT work-pool create "$1" --type "$2"
  fi
}

ensure_gpu_limit() {
  if $PREFECT gcl inspect gpu >/dev/null 2>&1; then
    $PREFECT gcl update gpu --limit "$GPU_SLOTS"
  else
    $PREFECT gcl create gpu --limit "$GPU_SLOTS"
  fi
}

# Independent, so in parallel (each prefect CLI call spends seconds importing).
create_pool gpu "$GPU_POOL_TYPE" "${GPU_POOL_TEMPLATE:-}" & gpu_pool=$!
# The sweep parent waits on its children: it gets a pool of its own so it can never take the
# slot a child needs.
create_pool cpu process & cpu_pool=$!
ensure_gpu_limit & gpu_limit=$!
wait $gpu_pool && wait $cpu_pool && wait $gpu_limit
$PREFECT --no-prompt deploy --all --prefect-file deployments/prefect.yaml
