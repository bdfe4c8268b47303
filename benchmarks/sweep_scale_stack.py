"""Helpers of benchmarks/sweep_scale.py: the tiny models, one Prefect stack per backend (server,
deployments, workers), and what is read back after a sweep (API, artifact store, service logs).

The services are those of tests/e2e_services.py (each in its own process group, bound to
127.0.0.1 on a free port, its output in a log file); the stack is the one of production:
deployments/deploy.sh with GPU_SLOTS=3, and the workers of deployments/workers.sh (3 process
workers on `gpu`, one per GPU id with `--limit 1`, and one on `cpu` for the sweep parent).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from e2e_services import (  # noqa: E402
    BIN,
    Postgres,
    Service,
    production_env,
    run_cli,
    run_deploy_script,
    start_prefect_api,
    start_prefect_server,
    start_prefect_services,
    start_redis,
)

GPU_WORKERS = 3  # = GPU_SLOTS of deploy.sh: the `gpu` limit and one worker per "GPU"
# Families the linear heal applies to: Gemma3's post-feed-forward norm makes the library refuse
# the patch (layerprune.heal.linear_fit), which would fail a quarter of the children.
FAMILIES = ("llama", "qwen2", "gpt2")
TOKENIZER = "bundled:SmolLM2-135M-Instruct"
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars fade slowly "
         "above quiet rivers and old stone bridges near Paris in early spring").split()
# Lines of the service and worker logs (flow-run output included) counted as API errors.
ERRORS = {
    "locked": r"database is locked",
    "timeout": r"TimeoutError|ReadTimeout|ConnectTimeout|PoolTimeout|WriteTimeout|timed out",
    "http_5xx": r"\b5\d\d (Internal Server Error|Service Unavailable|Bad Gateway|Gateway "
                r"Timeout)\b|Server error '5\d\d|Exception in ASGI application",
    "db": r"deadlock detected|too many clients|remaining connection slots|QueuePool limit",
}
WRITTEN = re.compile(r"\b(\w+)/([0-9a-f]{20}) written in ")  # tasks/common.py run_stage
REUSED = re.compile(r"\b(\w+)/([0-9a-f]{20}) is complete in the store")


def _config(family: str, depth: int, vocab: int):
    """tests/conftest.py's tiny configs (hidden 32), `depth` layers."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                           max_window_layers=depth // 2)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=4, layer_types=[
            ("sliding_attention", "full_attention")[i % 2] for i in range(depth)])
    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=depth, n_head=4, n_positions=512)


def build_models(count: int, out: Path) -> list[str]:
    """`count` random-weight models saved with SmolLM2's tokenizer: families in turn, 4 to 8
    layers (all 20 pairs before one repeats), each its own seed (so its own fingerprint)."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerprune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    refs = []
    for i in range(count):
        family, depth = FAMILIES[i % len(FAMILIES)], 4 + i % 5
        path = out / f"{family}-L{depth}-{i:02d}"
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(_config(family, depth, len(tokenizer))) \
            .save_pretrained(path)
        tokenizer.save_pretrained(path)
        refs.append(str(path))
    return refs


def write_texts(path: Path, records: int = 32) -> str:
    lines = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i % 9)) + "."
             for i in range(records)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)


class Stack:
    """One backend (`sqlite`: `prefect server start`; `postgres`: PostgreSQL + Redis, the
    database migrated once, `apis` API servers without services, the services once), the
    deployments and the workers. `close()` stops everything, workers first."""

    def __init__(self, backend: str, base: Path, env: dict, artifacts: str, apis: int = 2,
                 poll_s: float | None = None):
        self.logs, self.services, self.postgres, self.apis = base / "logs", [], None, []
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**env, "PREFECT_HOME": str(base / "prefect-home")}
        try:
            if backend == "sqlite":
                self._start(*start_prefect_server(env, self.logs))
            else:
                self.postgres = Postgres()
                redis, redis_url = self._start(*start_redis(env, self.logs))
                server_env = {**production_env(env, self.postgres.url, redis_url),
                              # per API server, as deployments/server/compose.yaml
                              "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
                              "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20"}
                self._check(run_cli(["server", "database", "upgrade", "-y"], server_env))
                for i in range(apis):
                    self._start(*start_prefect_api(server_env, self.logs, f"api-{i + 1}"))
                self.services.append(start_prefect_services(server_env, self.logs))
            self.env = {**env, "PREFECT_API_URL": self.apis[0]}
            self._check(run_deploy_script(self.env, gpu_slots=GPU_WORKERS))
            self._pause_schedules()
            worker_env = {**self.env, "LAYERPRUNE_REPO": str(REPO),
                          "LAYERPRUNE_ARTIFACTS": artifacts,
                          "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}  # as workers.sh
            if poll_s:
                worker_env["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_s)
            host = socket.gethostname()
            for i in range(GPU_WORKERS):  # workers.sh: one per GPU id, spread over the APIs
                self.services.insert(0, Service(f"worker-gpu-{i}", [
                    str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type",
                    "process", "--limit", "1", "--name", f"{host}-gpu-{i}"],
                    {**worker_env, "CUDA_VISIBLE_DEVICES": str(i),
                     "PREFECT_API_URL": self.apis[i % len(self.apis)]}, self.logs))
            self.services.insert(0, Service("worker-cpu", [
                str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                worker_env, self.logs))
            self._wait_for_workers()
        except BaseException:
            self.close()
            raise

    def _start(self, service: Service, url: str):
        self.services.append(service)
        if url.startswith("http"):
            self.apis.append(url)
        return service, url

    @staticmethod
    def _check(done) -> None:
        if done.returncode != 0:
            raise RuntimeError(f"{done.args} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    @contextlib.contextmanager
    def client(self):
        """Prefect's sync client on this stack's first API server (run_deployment too)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.apis[0]}), \
                get_client(sync_client=True) as client:
            yield client

    def _pause_schedules(self) -> None:
        """The nightly's cron stays off: only the sweep this benchmark submits runs."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with self.client() as c:
            nightly = c.read_deployment_by_name("sweep/nightly")
            for schedule in c.read_deployment_schedules(nightly.id):
                c.update_deployment_schedule(nightly.id, schedule.id, active=False)
            for run in c.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))):
                c.delete_flow_run(run.id)

    def _wait_for_workers(self, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        with self.client() as c:
            while True:
                online = {p: sum(w.status == "ONLINE" for w in c.read_workers_for_work_pool(p))
                          for p in ("gpu", "cpu")}
                if online["gpu"] >= GPU_WORKERS and online["cpu"] >= 1:
                    return
                dead = [s.name for s in self.services if not s.alive()]
                if dead or time.time() > deadline:
                    raise RuntimeError(f"workers not online ({online}; exited: {dead})")
                time.sleep(1)

    def errors(self) -> dict:
        """{category: matching lines} over every log of this stack (and PostgreSQL's)."""
        files = sorted(self.logs.glob("*.log"))
        if self.postgres is not None:
            files.append(self.postgres.log)
        found = {k: 0 for k in ERRORS}
        examples = []
        for f in files:
            lines = f.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if _chained(lines, i):  # the cause of the exception below: one error, not two
                    continue
                for kind, pattern in ERRORS.items():
                    if re.search(pattern, line):
                        found[kind] += 1
                        if len(examples) < 10:
                            examples.append(f"{f.name}: {line.strip()[:300]}")
        return {**found, "examples": examples}

    def close(self) -> None:
        for service in self.services:  # workers first: no flow run outlives its server
            service.stop()
        self.services = []
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


def _chained(lines: list[str], i: int) -> bool:
    """Whether line i ends a traceback that the next one continues ("The above exception ...",
    "During handling of the above exception ...")."""
    following = next((x for x in lines[i + 1:i + 4] if x.strip()), "")
    return "above exception" in following


def _pages(read, **kwargs) -> list:
    found, offset = [], 0
    while True:
        page = read(limit=200, offset=offset, **kwargs)
        found += page
        offset += len(page)
        if len(page) < 200:
            return found


def _settled_task_runs(client, settle_s: float) -> list:
    """Every task run, once the server has recorded each one's final state (task runs reach it
    as events, after their flow run ended) and the count stopped changing."""
    deadline, last = time.time() + settle_s, -1
    while True:
        runs = _pages(client.read_task_runs)
        if (len(runs) == last and all(r.state and r.state.is_final() for r in runs)) \
                or time.time() > deadline:
            return runs
        last = len(runs)
        time.sleep(2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(stack: Stack, artifacts: Path, settle_s: float = 120) -> dict:
    """Counts, stage bodies and per-stage-task overhead of the sweep the stack ran.

    A stage task's body is what its manifest records: `seconds` (building the artifact) plus
    `publish_seconds` (publishing it); the task run is matched to its manifest by the log line
    run_stage writes ("<stage>/<key> written in ..."). Overhead = the task run's duration in the
    API (start to end time) minus its body. Task runs that reused a stored artifact are counted
    apart and left out."""
    from prefect.client.schemas.sorting import LogSort

    with stack.client() as c:
        task_runs = _settled_task_runs(c, settle_s)
        flow_runs = [r for r in _pages(c.read_flow_runs) if r.state and r.state.name != "Scheduled"]
        logs = _pages(c.read_logs, sort=LogSort.TIMESTAMP_ASC)
    written, reused = {}, set()
    for log in logs:
        if log.task_run_id is None:
            continue
        if m := WRITTEN.search(log.message):
            written[log.task_run_id] = m.groups()
        elif REUSED.search(log.message):
            reused.add(log.task_run_id)
    bodies, overhead, per_stage, untimed = {}, [], {}, {}
    for run in task_runs:
        if run.id not in written or not (run.start_time and run.end_time):
            if run.id not in reused:  # not a stage task (describe-model, run-model, ...)
                task = run.task_key.rsplit("-", 1)[0]  # the function's name
                untimed[task] = untimed.get(task, 0) + 1
            continue
        stage, key = written[run.id]
        manifest = json.loads((artifacts / stage / key / "manifest.json").read_text())
        body = manifest["seconds"] + manifest.get("publish_seconds", 0.0)
        bodies[stage] = bodies.get(stage, 0.0) + body
        extra = (run.end_time - run.start_time).total_seconds() - body
        overhead.append(extra)
        per_stage.setdefault(stage, []).append(extra)
    states: dict[str, int] = {}
    for r in flow_runs:
        states[r.state.name] = states.get(r.state.name, 0) + 1
    return {
        "flow_runs": len(flow_runs), "flow_run_states": states, "task_runs": len(task_runs),
        "task_runs_unfinished": sum(not (r.state and r.state.is_final()) for r in task_runs),
        "stage_tasks_timed": len(overhead), "stage_tasks_reused": len(reused),
        "other_task_runs": dict(sorted(untimed.items())),
        "compute_s": round(sum(bodies.values()), 3),
        "compute_s_by_stage": {k: round(v, 3) for k, v in sorted(bodies.items())},
        "overhead_ms_median": _ms(statistics.median(overhead) if overhead else None),
        "overhead_ms_p95": _ms(percentile(overhead, 0.95)),
        "overhead_ms_median_by_stage": {k: _ms(statistics.median(v))
                                        for k, v in sorted(per_stage.items())},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
