#!/usr/bin/env bash
# Create the work pools and the `gpu` concurrency limit if missing, (re)create the automation
# that marks runs without heartbeats Crashed, then register every deployment of
# deployments/prefect.yaml. Idempotent; `make deploy` and the e2e test run it.
#
#   PREFECT           the prefect CLI (default: prefect on PATH)
#   GPU_SLOTS         GPUs that runs may hold at once (global concurrency limit `gpu`; a
#                     k-GPU run holds k): default, the GPUs `nvidia-smi -L` lists here, else 1
#   GPU_POOL_TYPE     process (default), docker or kubernetes
#   GPU_POOL_TEMPLATE base job template of the gpu pool: deployments/process-pool.json for a
#                     process pool (default), deployments/docker-gpu-pool.json or
#                     deployments/kubernetes-gpu-pool.json (needs prefect-docker /
#                     prefect-kubernetes). The templates fix what a run must not choose (command,
#                     image, privileges, volumes, namespace, ...): an existing pool gets the
#                     template again on every deploy.
#   ZOMBIE_AFTER_S    seconds without any event after a run's heartbeat before the run is marked
#                     Crashed (default 90: two missed heartbeats at the 30 s of workers.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}
# The commit deployed: each deployment's `version` (prefect.yaml), which a run checks against the
# code it runs (tasks/version.py). -dirty: tracked files differ from the commit.
if [ -z "${LAYERPRUNE_COMMIT:-}" ]; then
  LAYERPRUNE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD 2>/dev/null || LAYERPRUNE_COMMIT="$LAYERPRUNE_COMMIT-dirty"
fi
export LAYERPRUNE_COMMIT
source deployments/gpus.sh
GPU_SLOTS=$(gpu_slots)
GPU_POOL_TYPE=${GPU_POOL_TYPE:-process}
if [ -z "${GPU_POOL_TEMPLATE:-}" ]; then
  if [ "$GPU_POOL_TYPE" != process ]; then
    echo "GPU_POOL_TEMPLATE is required for a $GPU_POOL_TYPE pool:" \
         "deployments/$GPU_POOL_TYPE-gpu-pool.json" >&2
    exit 2
  fi
  GPU_POOL_TEMPLATE=deployments/process-pool.json
fi
ZOMBIE_AFTER_S=${ZOMBIE_AFTER_S:-90}
case "$ZOMBIE_AFTER_S" in
  ''|*[!0-9]*) echo "ZOMBIE_AFTER_S must be a whole number of seconds, got '$ZOMBIE_AFTER_S'" >&2
               exit 2 ;;
esac

create_pool() {  # name type template: created, or its template brought up to date
  if $PREFECT work-pool inspect "$1" >/dev/null 2>&1; then
    $PREFECT work-pool update "$1" --base-job-template "$3"
  else
    $PREFECT work-pool create "$1" --type "$2" --base-job-template "$3"
  fi
}

ensure_gpu_limit() {
  if $PREFECT gcl inspect gpu >/dev/null 2>&1; then
    $PREFECT gcl update gpu --limit "$GPU_SLOTS"
  else
    $PREFECT gcl create gpu --limit "$GPU_SLOTS"
  fi
}

ensure_zombie_automation() {  # deployments/zombie-automation.yaml, `within` from ZOMBIE_AFTER_S
  local file name
  file=$(mktemp --suffix=.yaml)
  sed "s/^\(  within:\).*/\1 $ZOMBIE_AFTER_S/" deployments/zombie-automation.yaml >"$file"
  name=$(sed -n 's/^name: *//p' "$file")
  # Replace it: the CLI updates automations by id only, and this keeps deploy.sh idempotent.
  $PREFECT --no-prompt automation delete "$name" >/dev/null 2>&1 || true
  local rc=0
  $PREFECT automation create --from-file "$file" || rc=$?
  rm -f "$file"
  return $rc
}

# Independent, so in parallel (each prefect CLI call spends seconds importing).
create_pool gpu "$GPU_POOL_TYPE" "$GPU_POOL_TEMPLATE" & gpu_pool=$!
# The sweep parent waits on its children: it gets a pool of its own so it can never take the
# slot a child needs.
create_pool cpu process deployments/process-pool.json & cpu_pool=$!
ensure_gpu_limit & gpu_limit=$!
ensure_zombie_automation & zombie=$!
wait $gpu_pool && wait $cpu_pool && wait $gpu_limit && wait $zombie
$PREFECT --no-prompt deploy --all --prefect-file deployments/prefect.yaml
