"""Production orchestration end to end, on loopback: a real S3 endpoint (moto), the production
Prefect server stack (PostgreSQL, Redis, an API server started with `--no-services` and the
background services in a process of their own: tests/e2e_services.py, ProductionServer),
process workers on the `gpu` and `cpu` pools, the deployments of deployments/prefect.yaml
registered by deployments/deploy.sh (what `make deploy` runs).

Covers: a deployment run writing every artifact and Prefect's JSON results to S3, a second run
that is all cache hits, a CLI run holding the `gpu` limit and healing its variants as
`heal-variant` runs, a sweep fanned out through run_deployment (one child on 2 GPUs) where a bad
model fails alone and a retried parent re-attaches to its children, a run that cannot redirect
the worker's S3 endpoint, an artifact store that does not exist failing the run fast with one
clear error, bad parameters refused at submission, and a run whose worker
and process were SIGKILLed marked Crashed by the heartbeat automation, its `gpu` slot back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import s3fs
from e2e_services import (
    REPO,
    ProductionServer,
    flow_run_pids,
    free_port,
    run_cli,
    run_deploy_script,
    start_moto,
    start_worker,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import AwaitingRetry

from layerprune.store.artifacts import ArtifactStore
from layerprune.store.remote import StoreUnavailable, check_reachable
from tasks.results import read_run_summary

pytestmark = pytest.mark.e2e
BUCKET = "e2e"
ROOT = f"s3://{BUCKET}/runs"
STAGES = {"calibration", "hidden_states", "distances", "prune", "eval", "speed", "report"}
ZOMBIE_AFTER_S = 60  # deploy.sh: runs silent this long after a heartbeat are marked Crashed
GPU_LEASE_S = 60  # tasks/gpus.py: the shortest lease the server grants
TEXTS = [f"Record {i}: the quick brown fox jumps over the lazy dog and keeps running." for i in
         range(8)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto + the production Prefect stack + deploy + two workers; all stopped (workers first,
    the server's database last) afterwards."""
    tmp = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_UI_ENABLED="false",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    # The commit deploy.sh records and the runs check (tasks/version.py), fixed: a commit made
    # in this checkout while the test runs must not make the workers refuse the deployments.
    env["LAYERPRUNE_COMMIT"] = "e2e-test"
    started = []
    server = None
    mp = pytest.MonkeyPatch()  # this process reads results and artifacts from S3 too
    try:
        moto, endpoint = start_moto(env, tmp)
        started.append(moto)
        env["AWS_ENDPOINT_URL"] = endpoint
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                  "AWS_ENDPOINT_URL"):
            mp.setenv(k, env[k])
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir(BUCKET)  # no region: moto refuses a LocationConstraint
        # The services free expired `gpu` leases every 5 s (default 15 s): a shorter last test.
        server = ProductionServer(
            env, tmp, services_env={"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5"})
        api = env["PREFECT_API_URL"] = server.api
        deploy = run_deploy_script({**env, "ZOMBIE_AFTER_S": str(ZOMBIE_AFTER_S)}, gpu_slots=2)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        # Workers poll every 2 s (default 10 s) to keep the test short; runs send heartbeats
        # every 30 s, as workers.sh has them do.
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "LAYERPRUNE_REPO": str(REPO),
                      "LAYERPRUNE_ARTIFACTS": ROOT, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                      "LAYERPRUNE_GPU_LEASE_S": str(GPU_LEASE_S)}
        workers = {pool: start_worker(pool, worker_env, tmp) for pool in ("gpu", "cpu")}
        started[:0] = workers.values()  # stopped first: a flow run must not outlive its server

        def replace_worker(pool: str) -> None:  # after the test killed it
            workers[pool] = start_worker(pool, worker_env, tmp, name=f"worker-{pool}-again")
            started.insert(0, workers[pool])

        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield {"env": env, "tmp": tmp, "fs": fs, "workers": workers,
                   "replace_worker": replace_worker}
    finally:
        mp.undo()
        for svc in started:
            svc.stop()
        if server is not None:
            server.stop()
        assert not [s.name for s in started if s.alive()] + (server.alive() if server else []), \
            "a service outlived the test"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("e2e-data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def _text_specs(data: str) -> dict:
    """Tiny runs: a few records, loss only (no lm-eval benchmarks, no healing)."""
    return {"calibration": {"data": data, "samples": 5, "seq_len": 12},
            "loss": {"data": data, "samples": 3, "seq_len": 12}, "batch_size": 4,
            "benchmarks": {"tasks": {}}, "heal": {"enabled": False}}


def _model_params(model: str, data: str, root: str = ROOT) -> dict:
    return {"model": {"ref": model}, "prune": {"block_sizes": [1]}, "artifacts": root,
            **_text_specs(data)}


def _cli_run(stack, deployment: str, params: dict, *extra: str, ends: str = "Completed") -> str:
    """`prefect deployment run ... --watch`, as documented; returns the flow run id."""
    out = run_cli(["deployment", "run", deployment, "--param", f"params={json.dumps(params)}",
                   "--watch", "--watch-interval", "2", "--watch-timeout", "480", *extra],
                  stack["env"], timeout_s=540)
    text = out.stdout + out.stderr
    assert (out.returncode == 0) == (ends == "Completed") and f"{ends!r}" in text, text[-3000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", text).group(1)


def _flow_run(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_deployment_writes_to_s3_and_reruns_from_cache(stack, tiny_models, data):
    params = _model_params(tiny_models["llama"], data)
    flow_run_id = _cli_run(stack, "prune-and-heal/default", params)
    summary = read_run_summary(ROOT, flow_run_id)  # what a sweep reads, from S3
    assert summary["report_uri"].startswith(f"{ROOT}/report/")
    assert [r["n"] for r in summary["rows"]] == [1, 1]

    fs = stack["fs"]
    manifests = fs.glob(f"{BUCKET}/runs/*/*/manifest.json")
    assert {m.split("/")[2] for m in manifests} == STAGES
    for m in manifests:  # every file a manifest lists is in the bucket with its size
        doc = json.loads(fs.cat(m))
        for rel, meta in doc["files"].items():
            assert fs.size(m.rsplit("/", 1)[0] + f"/{doc['attempt']}/" + rel) == meta["bytes"]
    records = fs.ls(f"{BUCKET}/runs/prefect-results")
    assert len(records) >= len(STAGES)
    # Everything there is a task cache record (named `<stage key>@<store>`), JSON, not pickle:
    # flows persist no return value (summaries go to runs/<flow run id>/summary.json).
    docs = {r.rsplit("/", 1)[1]: json.loads(fs.cat(r)) for r in records}
    assert all("@" in name for name in docs), sorted(docs)
    assert all(d["metadata"]["serializer"]["type"] == "json" for d in docs.values())

    again = run_deployment("prune-and-heal/default", parameters={"params": params},
                           timeout=480, poll_interval=2)
    assert again.state.is_completed(), again.state
    states = _task_states(again.id)
    # Every stage is a cache hit; describe-model and report-artifacts (the Prefect artifacts,
    # published on every run, cache hit or not: tasks/artifacts.py) are not cached by design.
    assert {s for n, s in states.items()
            if not n.startswith(("describe-model", "report-artifacts"))} == {"Cached"}, states
    assert read_run_summary(ROOT, again.id)["report_uri"] == summary["report_uri"]


def _children(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def _gpu_slots_in_use() -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name("gpu").active_slots


def test_cli_run_holds_the_gpu_limit_and_heals_in_heal_variant_runs(stack, tiny_models, data):
    """With the `gpu` limit at 1, a run started by `prefect deployment run` that dispatches its
    healing finishes only if it holds its slot outside the healing and gives it back while its
    children, which take slots of their own, heal."""
    params = {**_model_params(tiny_models["llama"], data), "heal": {
        "block_sizes": [1], "data": data, "dispatch": "deployment",
        "strategies": ["heuristic"], "methods": ["linear", "lora"],
        "config": {"steps": 2, "seq_len": 8, "batch_size": 2, "save_every": None,
                   "linear_samples": 5}}}
    assert run_cli(["gcl", "update", "gpu", "--limit", "1"], stack["env"]).returncode == 0
    try:
        with ThreadPoolExecutor(1) as pool:
            cli = pool.submit(_cli_run, stack, "prune-and-heal/default", params)
            in_use = set()
            while not cli.done():
                in_use.add(_gpu_slots_in_use())
                time.sleep(0.5)
            flow_run_id = cli.result()
    finally:
        assert run_cli(["gcl", "update", "gpu", "--limit", "2"], stack["env"]).returncode == 0
    assert in_use <= {0, 1} and 1 in in_use, in_use
    assert _gpu_slots_in_use() == 0  # every slot given back
    with get_client(sync_client=True) as client:
        logs = [log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
    assert sum("slot(s) of the `gpu` concurrency limit" in m for m in logs) == 2, logs  # 2 takes
    children = _children(flow_run_id)
    with get_client(sync_client=True) as client:
        flows = {client.read_flow(c.flow_id).name for c in children}
    assert len(children) == 2 and flows == {"heal-variant"}
    assert {c.work_pool_name for c in children} == {"gpu"}
    assert all(c.state.is_completed() and c.job_variables == {"gpu_count": 1}
               for c in children)
    # One child per variant, each under the idempotency key of its heal stage's first try.
    assert all(re.fullmatch(f"{flow_run_id}/heal-[0-9a-f]{{20}}/try-0", c.idempotency_key)
               for c in children), [c.idempotency_key for c in children]
    summary = read_run_summary(ROOT, flow_run_id)
    healed = sorted(r["variant"] for r in summary["rows"] if r.get("heal_method"))
    assert healed == ["heuristic, linear", "heuristic, lora"]
    # One child per (variant, method), each healing by its own method.
    assert sorted((c.parameters["recipe"]["meta"]["strategy"], c.parameters["method"])
                  for c in children) == [("heuristic", "linear"), ("heuristic", "lora")]


def _sweep_children(flow_run_id) -> dict:
    """{model ref: [its child runs]} of a sweep run."""
    found: dict = {}
    for child in sorted(_children(flow_run_id), key=lambda c: c.idempotency_key):
        found.setdefault(child.parameters["params"]["model"]["ref"], []).append(child)
    return found


def test_sweep_fans_out_compares_models_and_survives_a_bad_one(stack, tiny_models, data):
    """Fractions make the sweep plan each model from its config: the bad one (a config.json
    that is not JSON) fails there; the others run, the comparison is published, the sweep ends Failed
    naming it. Retried the way the UI does, the parent re-attaches to its children."""
    bad = stack["tmp"] / "bad-model"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text('{"model_type": "llama", ')  # cut short
    models = [tiny_models["llama"], tiny_models["gpt2"], str(bad)]
    params = {"models": models, "fractions": [0.25], "artifacts": ROOT,  # n = 1 of 4 layers
              "child_timeout_s": 480, "gpu_counts": {models[0]: 2}, **_text_specs(data)}
    flow_run_id = _cli_run(stack, "sweep/nightly", params, ends="Failed")
    summary = read_run_summary(ROOT, flow_run_id)
    labels = [os.path.basename(m) for m in models]
    assert summary["completed"] == labels[:2] and list(summary["failed"]) == [labels[2]]
    assert "planning it failed" in summary["failed"][labels[2]]
    assert "cannot read the config" in summary["failed"][labels[2]]
    assert {r["model"] for r in summary["rows"]} == set(labels[:2])
    message = _flow_run(flow_run_id).state.message
    assert "1 of 3 models did not complete" in message and labels[2] in message

    fs = stack["fs"]
    sweep_dir = summary["report_uri"].removeprefix("s3://")  # the committed attempt's files
    for name in ("results.parquet", "loss_vs_fraction.png"):
        assert fs.exists(f"{sweep_dir}/{name}"), name
    assert fs.exists(f"{sweep_dir.rsplit('/', 1)[0]}/manifest.json")
    # The night on the leaderboard page, in the bucket: its JSON, and a page whose every
    # image is there at its relative path.
    board = f"{BUCKET}/runs/leaderboard"
    assert summary["leaderboard_uri"] == f"{ROOT}/leaderboard/index.html"
    night, = fs.glob(f"{board}/nights/*/leaderboard.json")
    record = json.loads(fs.cat(night))
    assert record["flow_run_id"] == flow_run_id
    assert [m["model"] for m in record["models"]] == labels[:2]
    assert all(r["metric"] == "loss" for m in record["models"] for r in m["can_lose"])
    page = fs.cat(f"{board}/index.html").decode()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 3 and all(fs.size(f"{board}/{src}") > 1000 for src in images), images
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-models"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        pages = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["leaderboard"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        gpu_limit = client.read_global_concurrency_limit_by_name("gpu")
        nightly = client.read_deployment_by_name("sweep/nightly")
    assert gpu_limit.limit == 2 and gpu_limit.active_slots == 0  # every slot given back
    assert parent.work_pool_name == "cpu"
    # The deployed nightly runs one at a time; another one waits for it.
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    children = _sweep_children(flow_run_id)
    assert set(children) == set(models[:2])  # no child for the model that was not planned
    assert all(len(runs) == 1 for runs in children.values())
    children = {ref: runs[0] for ref, runs in children.items()}
    assert {c.work_pool_name for c in children.values()} == {"gpu"}
    # gpu_counts: the llama child asked for 2 GPUs (2 slots, queue of 2-GPU workers)
    asked = {ref: (c.job_variables["gpu_count"], c.work_queue_name)
             for ref, c in children.items()}
    assert asked == {models[0]: (2, "gpus-2"), models[1]: (1, "default")}
    assert all(c.state.is_completed() for c in children.values())
    assert all(re.fullmatch(f"{flow_run_id}/model-[0-9a-f]{{16}}/try-0", c.idempotency_key)
               for c in children.values())
    assert len(artifacts) == 1
    assert len(json.loads(artifacts[0].data)) == 4  # 2 models x 2 strategies
    assert len(pages) == 1 and "data:image/png;base64," in pages[0].data

    # Retry the failed parent as the UI's Retry button does: the same flow run runs again.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(message="retried by the test"))
    deadline = time.time() + 240
    while (run := _flow_run(flow_run_id)).run_count < 2 or not run.state.is_final():
        assert time.time() < deadline, run.state
        time.sleep(2)
    assert run.state.is_failed() and labels[2] in run.state.message  # still bad, still alone
    again = _sweep_children(flow_run_id)
    assert {ref: [c.id for c in runs] for ref, runs in again.items()} == \
        {ref: [c.id] for ref, c in children.items()}  # no second child for any model
    assert read_run_summary(ROOT, flow_run_id)["completed"] == labels[:2]
    fs.invalidate_cache(board)
    assert fs.glob(f"{board}/nights/*/leaderboard.json") == [night]  # rewritten, not a second


def test_a_missing_store_fails_fast_and_no_run_can_redirect_the_s3_endpoint(
        stack, tiny_models, data, monkeypatch):
    """The worker's S3 endpoint is the worker's: the process pool's template refuses a run's
    `env` job variable for AWS_ENDPOINT_URL at submission (deployments/process-pool.json), so
    no run can send the worker's credentials elsewhere. A run whose artifact store cannot be
    used (here a bucket that does not exist) fails first thing, before any model loads, with
    one error naming the store; the store's own I/O gives up on a dead endpoint in seconds."""
    from prefect.exceptions import PrefectHTTPStatusError

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    with pytest.raises(PrefectHTTPStatusError) as refused:
        run_deployment("prune-and-heal/default", timeout=0,
                       parameters={"params": _model_params(tiny_models["llama"], data)},
                       job_variables={"env": {"AWS_ENDPOINT_URL": dead}})
    assert refused.value.response.status_code in (409, 422)
    assert "AWS_ENDPOINT_URL" in refused.value.response.text
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # nothing was created

    root = "s3://no-such-bucket/runs"
    run = run_deployment("prune-and-heal/default", timeout=300, poll_interval=2,
                         parameters={"params": _model_params(tiny_models["llama"], data, root)})
    assert run.state.is_failed(), run.state
    assert "artifacts: bucket 'no-such-bucket' of 's3://no-such-bucket/runs' does not exist" \
        in run.state.message
    assert (run.end_time - run.start_time).total_seconds() < 60, "not fast"
    assert _task_states(run.id) == {}, _task_states(run.id)  # no stage, not even describe-model
    assert not stack["fs"].exists("no-such-bucket")  # nothing created on the way

    # The store itself, in this process: the same bounded retries on every stage's I/O.
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.time()
    with pytest.raises(Exception, match="Could not connect"):
        ArtifactStore(f"s3://{BUCKET}/unreachable").manifest("loss", "0123")
    assert time.time() - started < 30  # botocore's defaults: minutes for a black-holed host
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack["env"]["AWS_ENDPOINT_URL"])
    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' .* does not exist"):
        check_reachable("s3://no-such-bucket/runs")


def test_bad_parameters_are_refused_at_submission(stack):
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    out = run_cli(["deployment", "run", "prune-and-heal/default", "--param",
                   'params={"batch_size": 0}'], stack["env"])
    assert out.returncode != 0
    assert "params.batch_size" in out.stdout + out.stderr
    with pytest.raises(Exception, match="minimum"):
        run_deployment("prune-and-heal/default", parameters={"params": {"batch_size": 0}},
                       timeout=0)
    with pytest.raises(Exception, match="models"):
        run_deployment("sweep/nightly", parameters={"params": {"models": []}}, timeout=0)
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # nothing was created


def test_a_run_whose_worker_died_is_marked_crashed_and_its_gpu_slot_comes_back(
        stack, tiny_models, data):
    """SIGKILL the gpu worker and the run's processes while the run holds its `gpu` slot, as a
    lost machine would: nothing reports the run's end, so only its missing heartbeats (the
    automation deploy.sh created) can mark it Crashed, and only its lease's expiry can give its
    slot back (tasks/gpus.py). Kept last: it replaces the gpu worker."""
    with get_client(sync_client=True) as client:
        automation, = client.read_automations_by_name("layerprune-crash-zombie-flow-runs")
    assert automation.trigger.within.total_seconds() == ZOMBIE_AFTER_S  # deploy.sh's setting
    assert _gpu_slots_in_use() == 0
    run = run_deployment("prune-and-heal/default", timeout=0, parameters={
        "params": _model_params(tiny_models["llama"], data, f"s3://{BUCKET}/zombie")})
    deadline = time.time() + 180
    while _gpu_slots_in_use() == 0:  # the run is in its flow, holding its slot
        assert time.time() < deadline and not _flow_run(run.id).state.is_final(), \
            _flow_run(run.id).state
        time.sleep(0.5)
    pids = flow_run_pids(run.id)
    assert pids, "no process of the flow run found"
    stack["workers"]["gpu"].kill()  # first the worker, or it would report the crash itself
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = time.time()
    stack["replace_worker"]("gpu")
    crashed_after = slot_back_after = None
    while crashed_after is None or slot_back_after is None:
        waited = time.time() - killed
        assert waited < ZOMBIE_AFTER_S + GPU_LEASE_S + 60, (_flow_run(run.id).state,
                                                             _gpu_slots_in_use())
        if crashed_after is None and _flow_run(run.id).state.is_crashed():
            crashed_after = waited
        if slot_back_after is None and _gpu_slots_in_use() == 0:
            slot_back_after = waited
        time.sleep(1)
    state = _flow_run(run.id).state
    assert "missing heartbeats" in state.message, state  # the automation, not a worker
    print(f"killed run marked Crashed after {crashed_after:.0f} s, its gpu slot back after "
          f"{slot_back_after:.0f} s (heartbeat 30 s, within {ZOMBIE_AFTER_S} s, lease "
          f"{GPU_LEASE_S} s)")
    # Within ZOMBIE_AFTER_S of its last heartbeat (+ the server's 5 s evaluation, + slack for
    # a loaded machine); its slot when the lease taken just before the kill expires (+ 5 s).
    assert crashed_after <= ZOMBIE_AFTER_S + 25
    assert slot_back_after <= GPU_LEASE_S + 25  # Prefect's default lease (300 s) would fail
