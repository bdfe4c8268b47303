"""Benchmark: the `sweep` flow at scale, on Prefect's SQLite server and on the production stack
(PostgreSQL + Redis), M models per sweep (issue 19, item 9).

What it runs. M tiny random-weight models built here (Llama, Qwen2, GPT-2; hidden 32,
4 to 8 layers; SmolLM2's tokenizer), swept by the real `sweep/nightly` deployment: the parent on
the `cpu` pool, one `prune-and-heal/default` child per model on the `gpu` pool, 3 process
workers there and a `gpu` concurrency limit of 3, as deployments/deploy.sh (GPU_SLOTS=3) and
deployments/workers.sh set them up. Each child does the whole pipeline at toy size:
calibration, hidden states, distances, prune (similarity and heuristic, fraction 0.25), next-
token loss (no lm-eval benchmarks, no speed), a linear heal of the heuristic variant and its
loss, the report. Every (backend, M) gets a fresh server, database and artifact store, so
nothing is cached and one sweep's rows do not slow the next.

What it measures, and why: whether orchestration, not compute, limits a nightly sweep as the
number of models grows.
- flow runs and task runs the server recorded;
- wall time: submission of the sweep to its final state; time per model = wall / M;
- compute: the stage bodies summed (each stage manifest's `seconds` + `publish_seconds`);
- overhead per stage task: its task run's duration in the Prefect API minus its body (median,
  p95), i.e. what caching checks, state changes, result records and leases cost per task;
- API errors: errors in the server, services, worker and flow-run logs (and PostgreSQL's)
  saying "database is locked", a timeout, an HTTP 5xx or a connection-pool / deadlock error
  (matching lines; an exception and the one it caused, chained in a traceback, count once).
Targets: PostgreSQL completes the largest M (40) with zero errors; overhead median <= 100 ms;
time per model flat from the smallest M to the largest (within 20%).

    python benchmarks/sweep_scale.py [--models 10 20 40] [--backends sqlite postgres]
                                     [--apis 2] [--poll-s S] [--out FILE] [--logs DIR]
Smoke size: --models 2 (a few minutes a backend). Everything binds to 127.0.0.1 and is stopped
at the end, on Ctrl-C or on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
for _k, _v in (("OMP_NUM_THREADS", "1"), ("DO_NOT_TRACK", "1"),
               ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TQDM_DISABLE", "1")):
    os.environ[_k] = _v  # before prefect and torch load

from sweep_scale_stack import REPO, Stack, build_models, measure, write_texts  # noqa: E402

TARGET_OVERHEAD_MS = 100.0
TARGET_FLAT = 0.20


def sweep_params(models: list[str], data: str, artifacts: str, timeout_s: int) -> dict:
    """SweepParams at toy size: loss only, heal enabled with method linear."""
    text = {"data": data, "samples": 4, "seq_len": 16}
    return {"models": models, "fractions": [0.25], "strategies": ["similarity", "heuristic"],
            "calibration": text, "loss": text, "benchmarks": {"tasks": {}},
            "speed": {"enabled": False}, "batch_size": 4, "artifacts": artifacts,
            "child_timeout_s": timeout_s,
            # heuristic (the last n but the final layer) never starts at layer 0, which a
            # linear patch refuses; n = round(0.25 x depth) is 1 or 2 for 4 to 8 layers.
            "heal": {"enabled": True, "block_sizes": [1, 2], "strategies": ["heuristic"],
                     "methods": ["linear"], "data": data,
                     "config": {"steps": 1, "seq_len": 16, "batch_size": 2, "save_every": None,
                                "linear_samples": 8}}}


def checkout_commit() -> str:
    """deploy.sh's version of this checkout (HEAD, -dirty if tracked files differ), taken once:
    given to deploy.sh and the workers as LAYERPRUNE_COMMIT (as an image pins it), so a commit
    landing in this shared checkout mid-benchmark cannot make the runs refuse their code."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
    head = git("rev-parse", "HEAD").stdout.strip() or "unknown"
    return head + ("-dirty" if git("diff", "--quiet", "HEAD").returncode else "")


def base_env(tmp: Path, commit: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env.update(LAYERPRUNE_COMMIT=commit, DO_NOT_TRACK="1", OMP_NUM_THREADS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", PREFECT_HOME=str(tmp / "prefect-home"))
    return env


def run_one(backend: str, models: list[str], data: str, tmp: Path, args) -> dict:
    """One sweep of `models` on a fresh stack of `backend`; its numbers."""
    from prefect.deployments import run_deployment

    m = len(models)
    base = tmp / f"{backend}-{m}"
    artifacts = base / "artifacts"
    artifacts.mkdir(parents=True)
    print(f"[{backend}, M={m}] starting the stack ...", flush=True)
    started = time.time()
    stack = Stack(backend, base, base_env(base, args.commit), str(artifacts), args.apis,
                  args.poll_s)
    try:
        setup_s = time.time() - started
        timeout_s = args.timeout_s or 1800 + 120 * m
        params = sweep_params(models, data, str(artifacts), timeout_s)
        print(f"[{backend}, M={m}] stack up in {setup_s:.0f} s; sweeping ...", flush=True)
        with stack.client() as c:  # on the stack's API (run_deployment too)
            t0 = time.time()
            run = run_deployment("sweep/nightly", parameters={"params": params}, timeout=0)
            while not (state := c.read_flow_run(run.id).state).is_final():
                if time.time() - t0 > timeout_s:
                    break
                time.sleep(1)
            wall = time.time() - t0
        print(f"[{backend}, M={m}] sweep {state.name} after {wall:.0f} s; reading back ...",
              flush=True)
        result = {"backend": backend, "models": m, "sweep_state": state.name,
                  "sweep_message": state.message, "wall_s": round(wall, 2),
                  "time_per_model_s": round(wall / m, 2), "setup_s": round(setup_s, 1),
                  "api_servers": len(stack.apis), **measure(stack, artifacts)}
        result["errors"] = stack.errors()
        return result
    finally:
        stack.close()
        shutil.rmtree(artifacts, ignore_errors=True)
        if args.logs:  # kept whatever happened, shutdown included
            shutil.copytree(stack.logs, Path(args.logs) / f"{backend}-{m}", dirs_exist_ok=True)


def errors_total(r: dict) -> int:
    return sum(v for k, v in r["errors"].items() if k != "examples")


def ok_runs(r: dict) -> bool:
    return r["sweep_state"] == "Completed" and \
        set(r["flow_run_states"]) == {"Completed"} and r["flow_runs"] == r["models"] + 1


def table(results: list[dict]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    rows = [
        ("sweep state", lambda r: r["sweep_state"]),
        ("flow runs (not Completed)", lambda r: f"{r['flow_runs']} "
         f"({r['flow_runs'] - r['flow_run_states'].get('Completed', 0)})"),
        ("task runs", lambda r: r["task_runs"]),
        ("wall time (s)", lambda r: r["wall_s"]),
        ("compute, stage bodies summed (s)", lambda r: r["compute_s"]),
        ("stage tasks timed / reused", lambda r: f"{r['stage_tasks_timed']} / "
         f"{r['stage_tasks_reused']}"),
        ("overhead per stage task, median (ms)", lambda r: r["overhead_ms_median"]),
        ("overhead per stage task, p95 (ms)", lambda r: r["overhead_ms_p95"]),
        ("API errors (locked/timeout/5xx/db)", lambda r: "/".join(
            str(r["errors"][k]) for k in ("locked", "timeout", "http_5xx", "db"))),
        ("time per model (s)", lambda r: r["time_per_model_s"]),
    ]
    width = max(14, *(len(f"{r['backend']} M={r['models']}") + 2 for r in results))
    lines = [f"{'':38s}" + "".join(f"{r['backend'] + ' M=' + str(r['models']):>{width}s}"
                                   for r in results)]
    for name, get in rows:
        lines.append(f"{name:38s}" + "".join(f"{cell(get(r)):>{width}s}" for r in results))
    return "\n".join(lines)


def targets(results: list[dict]) -> list[dict]:
    found = []
    pg = [r for r in results if r["backend"] == "postgres"]
    if pg:
        r = max(pg, key=lambda r: r["models"])
        found.append({"target": f"PostgreSQL completes M={r['models']} with zero errors",
                      "value": f"{r['sweep_state']}, {errors_total(r)} errors",
                      "pass": ok_runs(r) and errors_total(r) == 0})
    for backend in dict.fromkeys(r["backend"] for r in results):
        rs = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["models"])
        worst = max((r["overhead_ms_median"] for r in rs if r["overhead_ms_median"] is not None),
                    default=None)
        found.append({"target": f"{backend}: overhead per stage task median <= "
                      f"{TARGET_OVERHEAD_MS:.0f} ms (worst M)",
                      "value": "-" if worst is None else f"{worst:.0f} ms",
                      "pass": worst is not None and worst <= TARGET_OVERHEAD_MS})
        if len(rs) > 1:
            ratio = rs[-1]["time_per_model_s"] / rs[0]["time_per_model_s"]
            found.append({"target": f"{backend}: time per model flat M={rs[0]['models']} -> "
                          f"M={rs[-1]['models']} (within {TARGET_FLAT:.0%})",
                          "value": f"x{ratio:.2f}", "pass": abs(ratio - 1) <= TARGET_FLAT})
    return found


def write_out(path: str | None, results: list[dict], found: list[dict] | None = None) -> None:
    if path:
        Path(path).write_text(json.dumps({"argv": sys.argv[1:], "results": results,
                                          "targets": found}, indent=2, default=str))


def _interrupted(*_) -> None:
    """SIGTERM as Ctrl-C: the `finally` clauses stop every service."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, nargs="+", default=[10, 20, 40], help="values of M")
    p.add_argument("--backends", nargs="+", choices=["sqlite", "postgres"],
                   default=["sqlite", "postgres"])
    p.add_argument("--apis", type=int, default=2, help="API servers of the postgres stack, "
                   "as docs/operations.md (gpu workers spread over them)")
    p.add_argument("--poll-s", type=float, default=None, help="workers' "
                   "PREFECT_WORKER_QUERY_SECONDS (default: Prefect's, 10 s)")
    p.add_argument("--timeout-s", type=int, default=None,
                   help="per sweep (default 1800 + 120 x M)")
    p.add_argument("--out", help="write the raw numbers here (JSON)")
    p.add_argument("--logs", help="keep every service's log under this directory")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    results, started, args.commit = [], time.time(), checkout_commit()
    with tempfile.TemporaryDirectory(prefix="layerprune-sweep-scale-") as tmp:
        tmp = Path(tmp)
        os.environ["PREFECT_HOME"] = str(tmp / "client-home")  # never the user's profile
        print(f"building {max(args.models)} tiny models ...", flush=True)
        models = build_models(max(args.models), tmp / "models")
        data = write_texts(tmp / "texts.jsonl")
        for backend in args.backends:
            for m in sorted(set(args.models)):
                results.append(run_one(backend, models[:m], data, tmp, args))
                write_out(args.out, results)  # so far: a later failure keeps these numbers
    print()
    print(table(results))
    found = targets(results)
    write_out(args.out, results, found)
    print()
    for t in found:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}")
    for r in results:
        for line in r["errors"]["examples"][:3]:
            print(f"  [{r['backend']} M={r['models']}] {line}")
    print(f"\ntotal {time.time() - started:.0f} s (repo {REPO})")
    return 0 if all(t["pass"] for t in found) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every service was stopped", file=sys.stderr)
        sys.exit(130)
