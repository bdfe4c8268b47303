"""No configuration can deadlock: a sweep with `heal.dispatch: deployment` on ONE GPU worker.

The stack is the production one (PostgreSQL, Redis, a `--no-services` API server, the services
process; tests/e2e_services.py), the deployments are registered by deployments/deploy.sh with
the `gpu` limit at 1, and the workers are those deployments/workers.sh starts on a one-GPU host
(GPU_IDS=0): the GPU's worker (`--limit 1`, queues `default` and `heal`), the heal worker
reserved for that GPU (`--limit 1`, only its queue `heal-<host>-gpu-0`), and the cpu worker
(the sweep parent).
"""

from __future__ import annotations

import json
import os
import time

import pytest
from e2e_services import REPO, ProductionServer, run_deploy_script, start_workers_script
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.children import QUEUED_AHEAD
from tasks.results import read_run_summary

pytestmark = pytest.mark.e2e
TEXTS = [f"Record {i}: the quick brown fox jumps over the lazy dog and keeps running." for i in
         range(8)]
# How long the sweep may take. Three tiny models, each healed by one child run, take 3 to 5
# minutes on 2 cores; the old design never ends.
SWEEP_BOUND_S = 900


@pytest.fixture(scope="module")
def one_gpu_host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-gpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_UI_ENABLED="false")
    # The commit deploy.sh records and the runs check (tasks/version.py), fixed: a commit made
    # in this checkout while the test runs must not make the workers refuse the deployments.
    env["LAYERPRUNE_COMMIT"] = "e2e-test"
    server = ProductionServer(env, tmp)
    started = []
    try:
        env["PREFECT_API_URL"] = server.api
        deploy = run_deploy_script(env, gpu_slots=1)  # one GPU: `make deploy` says 1
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "LAYERPRUNE_REPO": str(REPO),
                      "LAYERPRUNE_ARTIFACTS": str(tmp / "store")}
        # `make worker` on a one-GPU host; it also sets the runs' heartbeat to 30 s, which the
        # zombie automation deploy.sh created relies on.
        started.append(start_workers_script(worker_env, tmp, GPU_IDS="0", POOLS="gpu cpu"))
        with temporary_settings(updates={PREFECT_API_URL: server.api}):
            yield {"tmp": tmp, "workers": started}
    finally:
        for svc in started:
            svc.stop()
        server.stop()
        assert not [s.name for s in started if s.alive()] + server.alive(), \
            "a service outlived the test"


def _children(client, flow_run_id) -> list:
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def test_a_sweep_healing_in_deployments_completes_on_one_gpu_worker(one_gpu_host, tiny_models):
    """Three models, one GPU worker, `gpu` limit 1, each model's variant healed by a
    `heal-variant` run (`linear`). Catches the old design's deadlock: the parent
    prune-and-heal run occupies the GPU's only `--limit 1` worker while it waits on its heal
    child, which waited in the same pool and queue for that very worker, for ever (no timeout):
    the sweep would still be Running at SWEEP_BOUND_S. Catches too: a heal child run by the
    parent's own worker (impossible while the parent holds it), a parent that does not wait
    for its child, and unbounded fan-out (at most limit + QUEUED_AHEAD model runs exist at once,
    the others not yet created)."""
    tmp = one_gpu_host["tmp"]
    data = tmp / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    models = [tiny_models[f] for f in ("llama", "qwen2", "gpt2")]
    params = {"models": models, "block_sizes": [1], "strategies": ["heuristic"],
              "artifacts": str(tmp / "store"), "child_timeout_s": 600, "batch_size": 4,
              "calibration": {"data": str(data), "samples": 5, "seq_len": 12},
              "loss": {"data": str(data), "samples": 3, "seq_len": 12},
              "benchmarks": {"tasks": {}}, "speed": {"enabled": False},
              "heal": {"enabled": True, "block_sizes": [1], "data": str(data),
                       "dispatch": "deployment", "strategies": ["heuristic"],
                       "methods": ["linear"],
                       "config": {"steps": 2, "seq_len": 8, "batch_size": 2,
                                  "save_every": None, "linear_samples": 5}}}
    started = time.time()
    sweep = run_deployment("sweep/nightly", parameters={"params": params},
                           timeout=SWEEP_BOUND_S, poll_interval=5)
    took = time.time() - started
    with get_client(sync_client=True) as client:
        sweep = client.read_flow_run(sweep.id)
        assert sweep.state.is_completed(), (
            f"sweep {sweep.state.name} after {took:.0f} s (bound {SWEEP_BOUND_S} s): "
            f"{sweep.state.message}")
        parents = _children(client, sweep.id)
        heals = {p.id: _children(client, p.id) for p in parents}
    print(f"sweep of 3 models healed in deployments on one GPU worker: {took:.0f} s")
    summary = read_run_summary(params["artifacts"], str(sweep.id))
    assert len(summary["completed"]) == 3 and not summary["failed"]
    assert len(parents) == 3 and all(p.work_queue_name == "default" for p in parents)
    for parent in parents:
        child, = heals[parent.id]
        assert child.state.is_completed() and child.parameters["method"] == "linear"
        # On the heal worker reserved for this GPU, never the queue the parent's worker polls.
        assert child.work_queue_name.startswith("heal-") and child.work_queue_name.endswith(
            "-gpu-0"), child.work_queue_name
        # It ran while its parent ran: the parent held the GPU worker all along.
        assert parent.start_time < child.start_time < child.end_time < parent.end_time
    # Bounded fan-out: when each model run was created, how many existed unfinished.
    for p in parents:
        alive = [q for q in parents if q.created <= p.created and q.end_time > p.created]
        assert len(alive) <= 1 + QUEUED_AHEAD, [(q.created, q.end_time) for q in parents]
