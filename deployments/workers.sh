#!/usr/bin/env bash
# Process workers on the `gpu` and `cpu` pools (or $POOLS) until interrupted; `make worker`.
# Each worker needs PREFECT_API_URL, LAYERPRUNE_REPO, LAYERPRUNE_ARTIFACTS and the AWS_*
# variables in its environment (docs/operations.md).
#
# On the gpu pool, each run owns the GPUs of its worker: one worker per GPU group, started with
# CUDA_VISIBLE_DEVICES set to the group and `--limit 1`, so two runs never share a device. It
# polls the queues `default` and `heal` (and `gpus-<k>`, below), never a group's heal queue.
# Beside it, on the same GPUs, a reserved heal worker (`--limit 1`) that polls only that
# group's queue `heal-<host>-gpu-<ids>`: the main worker's runs get its name in
# LAYERPRUNE_HEAL_QUEUE and send their heal-variant children there (flows/heal.py). A
# prune-and-heal run waiting on its heals holds the main worker, never the heal worker, so no
# number of models and GPUs can deadlock; the parent has freed the GPUs its children use.
#   GPU_GROUPS  groups of device ids, space-separated, e.g. "0,1 2,3": two workers for 2-GPU
#               runs; a worker of k > 1 GPUs also polls the work queue `gpus-<k>`, where
#               runs asking for k GPUs go (tasks/gpus.py)
#   GPU_IDS     comma-separated ids, one worker each, e.g. 0,1,2,3 (default: `nvidia-smi -L`)
# No GPU found and none given: one gpu worker without a limit, polling every queue of the pool
# (heal children included), as on a CPU machine.
set -uo pipefail
PREFECT=${PREFECT:-prefect}
# Flow runs emit a heartbeat this often (seconds, >= 30; Prefect's default is 180): with the
# automation of deployments/zombie-automation.yaml, a run whose worker or machine died is marked
# Crashed about 90 s later instead of staying Running.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}

gpu_groups() {  # one group per line
  if [ -n "${GPU_GROUPS:-}" ]; then
    tr -s ' ' '\n' <<<"$GPU_GROUPS" | sed '/^$/d'
  elif [ -n "${GPU_IDS:-}" ]; then
    tr -s ', ' '\n' <<<"$GPU_IDS" | sed '/^$/d'
  elif command -v nvidia-smi >/dev/null 2>&1; then
    # "GPU 0: NVIDIA H200 (UUID: GPU-...)" -> 0
    nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p'
  fi
}

# Job control: without it, background jobs start with SIGINT ignored, and a Prefect worker
# answers SIGTERM by sending itself SIGINT, so it would never stop (seen here).
set -m
pids=()
host=$(hostname)
for pool in ${POOLS:-gpu cpu}; do
  if [ "$pool" = gpu ] && groups=$(gpu_groups) && [ -n "$groups" ]; then
    while read -r group; do
      k=$(tr ',' '\n' <<<"$group" | sed '/^$/d' | wc -l)
      queues=(--work-queue default --work-queue heal)
      [ "$k" -gt 1 ] && queues+=(--work-queue "gpus-$k")
      heal_queue="heal-$host-gpu-${group//,/_}"
      CUDA_VISIBLE_DEVICES=$group LAYERPRUNE_HEAL_QUEUE=$heal_queue \
        $PREFECT worker start --pool gpu --type process --limit 1 \
        --name "$host-gpu-$group" "${queues[@]}" </dev/null &
      pids+=($!)
      CUDA_VISIBLE_DEVICES=$group $PREFECT worker start --pool gpu --type process --limit 1 \
        --name "$host-gpu-$group-heal" --work-queue "$heal_queue" </dev/null &
      pids+=($!)
    done <<<"$groups"
  else
    $PREFECT worker start --pool "$pool" --type process &
    pids+=($!)
  fi
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
wait
