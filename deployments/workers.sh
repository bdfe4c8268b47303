#!/usr/bin/env bash
# Process workers on the `gpu` and `cpu` pools (or $POOLS) until interrupted; `make worker`.
# Each worker needs PREFECT_API_URL, LAYERPRUNE_REPO, LAYERPRUNE_ARTIFACTS and the AWS_*
# variables in its environment (docs/operations.md).
set -uo pipefail
PREFECT=${PREFECT:-prefect}
# Job control: without it, background jobs start with SIGINT ignored, and a Prefect worker
# answers SIGTERM by sending itself SIGINT, so it would never stop (seen here).
set -m
pids=()
for pool in ${POOLS:-gpu cpu}; do
  $PREFECT worker start --pool "$pool" --type process &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM
wait
