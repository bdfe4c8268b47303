"""Fast checks of the orchestration pieces that need no services: sweep parameters, S3 options,
result storage location, deployment files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.utilities.templating import apply_values

from flows.heal import HEAL_DEPLOYMENT, heal_one
from layerprune.config import HealSpec, PruneAndHealParams, SweepParams
from layerprune.store.remote import (
    S3_CLIENT_CONFIG,
    StoreUnavailable,
    check_reachable,
    storage_options_from_env,
)
from tasks.gpus import gpu_job, gpu_lease_s
from tasks.results import (
    AtomicLocalFileSystem,
    block_name,
    read_run_summary,
    summary_path,
    write_run_summary,
)
from tasks.sweep import model_label

REPO = Path(__file__).resolve().parent.parent


def test_sweep_params_validate_and_fan_out():
    p = SweepParams(models=["a/b", "/x/tiny-llama"], fractions=[0.1, 0.5, 0.9])
    assert p.block_sizes_for(30) == [3, 15, 27]
    assert p.block_sizes_for(4) == [1, 2, 3]  # at least 1, and one layer always remains
    child = p.child("a/b", [3])
    assert isinstance(child, PruneAndHealParams)
    assert child.model.ref == "a/b" and child.prune.block_sizes == [3]
    assert child.artifacts == p.artifacts
    assert SweepParams(block_sizes=[2, 1, 2]).block_sizes_for(0) == [1, 2]


@pytest.mark.parametrize("bad, field", [
    ({"models": []}, "models"),
    ({"fractions": [0.0]}, "fractions"),
    ({"fractions": [1.5]}, "fractions"),
    ({"block_sizes": [0]}, "block_sizes"),
    ({"fractions": [0.2], "block_sizes": [2]}, "not both"),
    ({"deployment": "no-slash"}, "deployment"),
    ({"batch_size": 0}, "batch_size"),
    ({"child_timeout_s": 5}, "child_timeout_s"),
    ({"gpu_count": 0}, "gpu_count"),
    ({"gpu_counts": {"not/in-models": 2}}, "gpu_counts names"),
    ({"gpu_counts": {"bundled:SmolLM2-135M-Instruct": 0}}, r"gpu_counts\.bundled"),
])
def test_bad_sweep_params_name_the_parameter(bad, field):
    with pytest.raises(ValueError, match=field):
        SweepParams.model_validate(bad)


def test_model_labels_are_short_unless_ambiguous():
    refs = ["/tmp/a/tiny-llama", "/tmp/b/tiny-gpt2", "HuggingFaceTB/SmolLM2-135M"]
    assert [model_label(r, refs) for r in refs] == ["tiny-llama", "tiny-gpt2", refs[2]]
    clash = ["/a/model", "/b/model"]
    assert [model_label(r, clash) for r in clash] == clash


def test_s3_options_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage_options_from_env("/local/dir") == {}
    opts = storage_options_from_env("s3://bucket/prefix")
    assert opts == {"config_kwargs": S3_CLIENT_CONFIG,
                    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the S3-specific wins
    assert storage_options_from_env("s3://b")["client_kwargs"]["endpoint_url"].endswith(":10")
    assert "client_kwargs" not in storage_options_from_env("s3://b", with_endpoint=False)
    assert "secret" not in json.dumps(opts).lower()  # credentials stay with botocore


def test_local_results_and_run_summaries_live_next_to_the_artifacts(tmp_path):
    # (result_storage_for needs a server: tests/test_flow.py)
    storage = AtomicLocalFileSystem(basepath=str(tmp_path / "store" / "prefect-results"))
    from tasks.results import JSON_SERIALIZER

    record = json.dumps({"metadata": {"serializer": JSON_SERIALIZER},
                         "result": json.dumps({"x": 1})}).encode()  # what Prefect writes
    written = storage.write_path("abc@123", record)  # relative: under the basepath
    assert Path(written) == tmp_path / "store" / "prefect-results" / "abc@123"
    assert storage.read_path(written) == record  # absolute keys inside it work too
    assert [p.name for p in Path(written).parent.iterdir()] == ["abc@123"]  # no temp file left
    with pytest.raises(ValueError, match="outside"):
        storage.write_path("../escape", b"")
    with pytest.raises(FileNotFoundError):  # what Prefect's exists() takes for a miss
        storage.read_path("missing")
    assert block_name("s3://b/p") == block_name("s3://b/p") != block_name("s3://b/q")
    root = str(tmp_path / "store")
    assert read_run_summary(root, "run-1") is None
    write_run_summary(root, "run-1", {"report_uri": "r", "rows": [{"n": 1}]})
    assert read_run_summary(root, "run-1") == {"report_uri": "r", "rows": [{"n": 1}]}
    assert summary_path("s3://b/p/", "run-1") == "s3://b/p/runs/run-1/summary.json"
    assert (tmp_path / "store" / "runs" / "run-1" / "summary.json").is_file()
    check_reachable(str(tmp_path / "new" / "store"))  # creates the directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable, match="artifacts: cannot create"):
        check_reachable(str(tmp_path / "file" / "store"))


def test_deployments_file_matches_the_flows():
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deps = {d["entrypoint"]: d for d in doc["deployments"]}  # FLOW/NAME: names may repeat
    assert len(deps) == len(doc["deployments"]) == 3
    deps["default"] = deps.pop("flows/prune_and_heal.py:prune_and_heal")
    deps["nightly"] = deps.pop("flows/sweep.py:sweep")
    heal = deps.pop("flows/heal.py:heal_one")
    assert HEAL_DEPLOYMENT == f"{heal_one.name}/{heal['name']}"  # what prune-and-heal starts
    assert deps["default"]["work_pool"]["name"] == heal["work_pool"]["name"] == "gpu"
    assert deps["nightly"]["name"] == "nightly"
    assert deps["nightly"]["work_pool"]["name"] == "cpu"
    assert all(d["enforce_parameter_schema"] for d in deps.values())
    assert deps["nightly"]["schedules"][0]["timezone"]
    # One sweep at a time; a second one waits (docs/operations.md says why not CANCEL_NEW).
    assert deps["nightly"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert "concurrency_limit" not in deps["default"]  # the `gpu` limit bounds model runs
    nightly = SweepParams.model_validate(deps["nightly"]["parameters"]["params"])  # valid
    # On GPUs the nightly scores whole tasks (issue 12: error bars under a point), generative too.
    assert set(nightly.benchmarks.limits().values()) == {None}
    assert {"trivia_qa", "nq_open"} <= set(nightly.benchmarks.tasks)
    assert nightly.child("m", [2]).speed == nightly.speed and nightly.speed.batch > 1
    docker = json.loads((REPO / "deployments" / "docker-gpu-pool.json").read_text())
    assert docker["job_configuration"]["container_create_kwargs"]["device_requests"]
    k8s = json.loads((REPO / "deployments" / "kubernetes-gpu-pool.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"][0]
    assert "nvidia.com/gpu" in container["resources"]["limits"]


def test_k_gpu_runs_ask_for_k_gpus_and_their_own_queue():
    p = SweepParams(models=["a/b", "c/d"], gpu_count=2, gpu_counts={"c/d": 4})
    assert [p.gpus_for(m) for m in p.models] == [2, 4]
    assert SweepParams().gpus_for("bundled:SmolLM2-135M-Instruct") == 1
    # The job variable sizes the container request and the run's `gpu` slots; the queue routes
    # a k-GPU run to workers owning k GPUs (workers.sh).
    assert gpu_job(1) == {"job_variables": {"gpu_count": 1}, "work_queue_name": None}
    assert gpu_job(4) == {"job_variables": {"gpu_count": 4}, "work_queue_name": "gpus-4"}
    with pytest.raises(ValueError, match="gpu_count"):
        gpu_job(0)


def test_heal_dispatch_is_inline_unless_asked():
    assert HealSpec().dispatch == "inline"  # the demo and tests run without a deployment
    assert PruneAndHealParams.model_validate(
        {"heal": {"dispatch": "deployment"}}).heal.dispatch == "deployment"
    with pytest.raises(ValueError, match="dispatch"):
        HealSpec.model_validate({"dispatch": "threads"})


def _render(template: dict, **job_variables) -> dict:
    """The pool's job configuration for a run, as a worker fills it (defaults + variables)."""
    schema = template["variables"]
    values = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    values.update(job_variables)
    jsonschema.validate(values, schema)  # what the server checks when the run is created
    return apply_values(template["job_configuration"], values)


def test_docker_template_requests_the_devices_a_run_names():
    template = json.loads((REPO / "deployments" / "docker-gpu-pool.json").read_text())
    request, = _render(template, gpu_ids=["2", "3"])["container_create_kwargs"][
        "device_requests"]
    assert request["device_ids"] == ["2", "3"] and "count" not in request
    request, = _render(template)["container_create_kwargs"]["device_requests"]
    assert request["device_ids"] == ["0"]  # one device by default, never all of them
    with pytest.raises(jsonschema.ValidationError):
        _render(template, gpu_ids=[])


def test_kubernetes_template_limits_gpus_to_gpu_count():
    template = json.loads((REPO / "deployments" / "kubernetes-gpu-pool.json").read_text())
    pod = _render(template, gpu_count=3)["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 3
    with pytest.raises(jsonschema.ValidationError):
        _render(template, gpu_count=0)


def _env_keys(dockerfile: Path) -> set[str]:
    """Names set by the ENV instructions of a Dockerfile (continuations joined, comments out)."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.strip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return {key for ln in text.splitlines() if ln.startswith("ENV ")
            for key in re.findall(r"([A-Z_][A-Z0-9_]*)=", ln)}


def test_images_do_not_give_every_container_every_gpu():
    cuda = REPO / "docker" / "Dockerfile.cuda"
    keys = _env_keys(cuda)
    assert "LAYERPRUNE_REPO" in keys  # the parser does see the image's ENV
    assert "NVIDIA_VISIBLE_DEVICES" not in keys | _env_keys(REPO / "docker" / "Dockerfile.cpu")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", cuda.read_text(), re.M).group(1))
    assert cmd[cmd.index("--limit") + 1] == "1"  # alone, a worker owning its GPUs


def _workers(tmp_path: Path, env: dict, nvidia_smi: str | None = None) -> list[dict]:
    """Run deployments/workers.sh with a `prefect` on PATH that records its argv and GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    record = tmp_path / "calls.jsonl"
    fake = bin_dir / "prefect"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"with open({str(record)!r}, 'a') as f:\n"
                    "    f.write(json.dumps({'argv': sys.argv[1:], "
                    "'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), "
                    "'heartbeat': os.environ.get('PREFECT_FLOWS_HEARTBEAT_FREQUENCY'), "
                    "'heal_queue': os.environ.get('LAYERPRUNE_HEAL_QUEUE')})"
                    " + '\\n')\n")
    fake.chmod(0o755)
    if nvidia_smi is not None:  # stands in for the driver's tool, whatever this machine has
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT", "GPU_IDS", "GPU_GROUPS", "CUDA_VISIBLE_DEVICES", "POOLS",
                         "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "LAYERPRUNE_HEAL_QUEUE")}
    run = subprocess.run([str(REPO / "deployments" / "workers.sh")], text=True, timeout=60,
                         capture_output=True,
                         env={**base, "PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    assert run.returncode == 0, run.stderr
    return [json.loads(ln) for ln in record.read_text().splitlines()]


def _option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def _main_and_heal(calls: list[dict]) -> tuple[list[dict], list[dict]]:
    """The gpu pool's workers: those that run prune-and-heal runs, and the reserved heal ones."""
    gpu = [c for c in calls if _option(c["argv"], "--pool") == ["gpu"]]
    heal = [c for c in gpu if _option(c["argv"], "--name")[0].endswith("-heal")]
    return [c for c in gpu if c not in heal], heal


def test_one_gpu_worker_per_gpu_id_and_a_heal_worker_beside_it(tmp_path):
    """Catches heal children that could wait behind their own parent: every GPU's main worker
    hands its runs a heal queue that only a worker reserved for the same GPU polls, and no main
    worker polls a heal queue of any GPU (flows/heal.py, docs/operations.md)."""
    calls = _workers(tmp_path, {"GPU_IDS": "0,1,2,3"}, nvidia_smi="exit 1")
    main, heal = _main_and_heal(calls)
    cpu = [c for c in calls if _option(c["argv"], "--pool") == ["cpu"]]
    assert sorted(c["gpus"] for c in main) == sorted(c["gpus"] for c in heal) == \
        ["0", "1", "2", "3"]
    assert all(_option(c["argv"], "--limit") == ["1"] for c in main + heal)
    assert all(_option(c["argv"], "--work-queue") == ["default", "heal"] for c in main)
    queues = {c["gpus"]: c["heal_queue"] for c in main}
    assert len(set(queues.values())) == 4 and all(q.startswith("heal-") for q in queues.values())
    for c in heal:  # polls only the queue of the runs on its own GPU
        assert _option(c["argv"], "--work-queue") == [queues[c["gpus"]]]
    assert len({_option(c["argv"], "--name")[0] for c in main + heal}) == 8
    assert len(cpu) == 1 and cpu[0]["gpus"] is None and "--limit" not in cpu[0]["argv"]
    assert {c["heartbeat"] for c in calls} == {"30"}  # runs emit heartbeats every 30 s


def test_gpu_groups_make_k_gpu_workers_on_their_queue(tmp_path):
    calls = _workers(tmp_path, {"GPU_GROUPS": "0,1 2,3", "POOLS": "gpu"})
    main, heal = _main_and_heal(calls)
    assert sorted(c["gpus"] for c in main) == sorted(c["gpus"] for c in heal) == ["0,1", "2,3"]
    for c in main:
        assert _option(c["argv"], "--limit") == ["1"]
        assert _option(c["argv"], "--work-queue") == ["default", "heal", "gpus-2"]
    for c in heal:
        assert _option(c["argv"], "--limit") == ["1"]
        assert _option(c["argv"], "--work-queue") == \
            [next(m["heal_queue"] for m in main if m["gpus"] == c["gpus"])]


def test_gpus_come_from_nvidia_smi_and_none_means_one_worker(tmp_path):
    listing = "\\n".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i}abc)" for i in range(2))
    calls = _workers(tmp_path / "two", {"POOLS": "gpu"}, nvidia_smi=f"printf '{listing}\\n'")
    main, heal = _main_and_heal(calls)
    assert sorted(c["gpus"] for c in main) == sorted(c["gpus"] for c in heal) == ["0", "1"]
    calls = _workers(tmp_path / "none", {"POOLS": "gpu"}, nvidia_smi="exit 9")
    assert len(calls) == 1 and calls[0]["gpus"] is None and "--limit" not in calls[0]["argv"]
    assert calls[0]["heal_queue"] is None  # its heal children go to `heal`, which it polls
    assert _option(calls[0]["argv"], "--work-queue") == []  # every queue


@pytest.mark.parametrize("flow_name, params", [
    ("prune_and_heal", {"prune": {"block_sizes": [0]}}),
    ("prune_and_heal", {"heal": {"block_sizes": [2, -1]}}),
    ("prune_and_heal", {"benchmarks": {"tasks": {"mmlu": 0}}}),
    ("prune_and_heal", {"benchmarks": {"block_sizes": [0]}}),
    ("prune_and_heal", {"model": {"quantization": "int4"}}),
    ("sweep", {"fractions": [0.2, 1.5]}),
    ("sweep", {"block_sizes": []}),
    ("sweep", {"models": ["  "]}),
    ("sweep", {"gpu_counts": {"bundled:SmolLM2-135M-Instruct": 0}}),
])
def test_bad_parameters_are_refused_by_the_schema_at_submission(flow_name, params):
    """Bounds live in the parameters' JSON schema, which the Prefect server checks when a run
    is created (enforce_parameter_schema): a bound kept only in a Python validator would let
    `prefect deployment run ... --param params=...` through and fail later on a worker."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module = importlib.import_module(f"flows.{flow_name}")
    flow = getattr(module, flow_name)
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    jsonschema.validate({"params": {}}, schema)  # the defaults are valid
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"params": params}, schema)


def test_zombie_automation_is_prefects_documented_one():
    """deployments/zombie-automation.yaml parses as a Prefect automation that marks a flow run
    Crashed when no event of it follows a heartbeat within `within` seconds."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    doc = yaml.safe_load((REPO / "deployments" / "zombie-automation.yaml").read_text())
    automation = AutomationCore.model_validate(doc)
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger) and trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.*"}  # any state change resets it, not only 4
    assert trigger.for_each == {"prefect.resource.id"} and trigger.threshold == 1
    assert trigger.within.total_seconds() == 90  # two missed heartbeats at workers.sh's 30 s
    # Only this project's runs: every deployment carries the tag the trigger asks for.
    assert trigger.match_related.model_dump() == {"prefect.resource.role": "tag",
                                     "prefect.resource.id": "prefect.tag.prune-and-heal"}
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert all("prune-and-heal" in d["tags"] for d in deployments["deployments"])
    # Runs send heartbeats often enough that a live run is never taken for a dead one
    # (Prefect's default, 180 s, would be), from the worker's own environment: the images and
    # workers.sh, not a job variable a run's own `env` would replace.
    for image in ("Dockerfile.cpu", "Dockerfile.cuda"):
        env = dict(re.findall(r"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY)=(\d+)",
                              (REPO / "docker" / image).read_text()))
        beat = int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= beat and 2 * beat < trigger.within.total_seconds(), image
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30" in \
        (REPO / "deployments" / "workers.sh").read_text()
    assert all("job_variables" not in d["work_pool"] for d in deployments["deployments"])
    action, = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state.value == "CRASHED"


def test_gpu_lease_duration_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("LAYERPRUNE_GPU_LEASE_S", raising=False)
    assert gpu_lease_s() == 120
    monkeypatch.setenv("LAYERPRUNE_GPU_LEASE_S", "60")
    assert gpu_lease_s() == 60
    for bad in ("30", "soon", "1e9"):  # the server refuses leases under 60 s
        monkeypatch.setenv("LAYERPRUNE_GPU_LEASE_S", bad)
        with pytest.raises(ValueError, match="LAYERPRUNE_GPU_LEASE_S"):
            gpu_lease_s()


def test_a_sweeps_benchmarks_cover_every_variant_unless_told():
    """`benchmarks` given to a sweep without block_sizes keeps the sweep's default (every
    variant), not BenchmarkSpec's one-model default (n = 6 only), which left Gemma's 18-layer
    variants unbenchmarked in a real sweep."""
    p = SweepParams(block_sizes=[2, 4], benchmarks={"tasks": {"boolq": 5}})
    assert p.benchmarks.block_sizes is None
    assert p.child("m", [2, 4]).benchmarks.block_sizes is None
    assert SweepParams(benchmarks={"tasks": {"boolq": 5}, "block_sizes": [4]}).benchmarks \
        .block_sizes == [4]


def _recipe(drop: list[int]) -> dict:
    return {"meta": {"removed_layers": drop, "strategy": "s", "n": len(drop)}}


@pytest.mark.parametrize("drop", [[0], [0, 1, 2], [1], [3, 4], [7], [6, 7], [0, 2], [2, 0],
                                  [1, 0], [3, 5, 6], [5, 3]])
def test_the_flows_linear_skip_is_the_librarys_rule(drop):
    """The flow skips a linear-patch heal exactly where `linear_fit.check_runs` refuses its
    removed layers, for the patched methods only, with the library's reason as the warning.

    The flow's old rule (`0 in removed_layers`) gave the same verdict as check_runs on every
    valid set (runs_of sorts, so a first run starts at 0 iff 0 is removed): no set here tells
    them apart. What these sets do catch is a re-stated rule that drifts from the library's:
    `drop[0] == 0` (order-dependent: [2, 0], [1, 0]) or `drop == list(range(len(drop)))`
    (only a run from 0 that is the whole drop: misses [0, 2]). That the flow asks the library,
    not a copy of its rule (the old one included), is the next test's."""
    from flows.prune_and_heal import refused_heals
    from layerprune.errors import LayerPruneError
    from layerprune.heal.config import METHODS, PATCHED
    from layerprune.heal.linear_fit import check_runs
    from layerprune.method.prune import runs_of

    try:
        check_runs(drop, 8)
        why = None
    except LayerPruneError as e:
        why = str(e)
    recipe = _recipe(drop)
    refused = refused_heals([(recipe, m) for m in METHODS], 8)
    assert refused == ([] if why is None else [(recipe, m, why) for m in PATCHED])
    if why is not None:  # the warning says why, in the library's words
        assert "layer 0" in why and f"({runs_of(drop)[0]})" in why


def test_a_change_of_the_librarys_linear_rule_reaches_the_flow(monkeypatch):
    """With check_runs changed (here: it also refuses a run that ends at the last layer, and
    accepts a run from layer 0), the flow's skips follow; a flow keeping a rule of its own
    (the old `0 in removed_layers`) would still skip [0, 1] and heal [6, 7]."""
    from flows.prune_and_heal import refused_heals
    from layerprune.errors import LayerPruneError
    from layerprune.heal import linear_fit

    def changed(drop: list[int], num_layers: int) -> list[list[int]]:
        if num_layers - 1 in drop:
            raise LayerPruneError("method linear: changed rule")
        return [sorted(drop)]

    monkeypatch.setattr(linear_fit, "check_runs", changed)
    jobs = [(_recipe([0, 1]), "linear"), (_recipe([6, 7]), "linear+distill")]
    assert refused_heals(jobs, 8) == [(jobs[1][0], "linear+distill",
                                       "method linear: changed rule")]


def test_refreshing_a_measured_stage_refreshes_its_readers():
    """`refresh` of a stage whose measured results another stage reads unkeyed (speed and heal:
    the report) refreshes that reader too; every other stage refreshes only itself. Checked
    against the stage names a run can be given, with every stage task of the flow imported."""
    from typing import get_args

    import flows.prune_and_heal  # noqa: F401  (imports, so declares, every stage task)
    from layerprune.config.runs import StageName
    from tasks.common import refreshed
    from tasks.report import publish_report

    readers = {"speed": {"report"}, "heal": {"report"}}
    for stage in get_args(StageName):
        assert refreshed([stage]) == {stage, *readers.get(stage, ())}, stage
    assert publish_report.reads_measured == {"speed", "heal"}
    assert refreshed(["speed", "prune"]) == {"speed", "prune", "report"}
    assert refreshed([]) == frozenset()


def test_the_report_key_leaves_out_exactly_what_it_declares_it_reads_measured():
    """The report's `reads_measured` and its key agree: changing a declared stage's measured
    columns (in a row and in the base) keeps the report's key, so refreshing that stage must
    refresh the report (previous test); a computed column changes the key."""
    from tasks.report import MEASURED, key_params, publish_report

    assert set(MEASURED) == publish_report.reads_measured
    info, distances = {"fingerprint": "m"}, {"key": "d"}
    row = {"variant": "similarity", "loss": 3.0, "heal_seconds": 1.0,
           "heal_peak_memory_mb": 10, "decode_speedup": 1.2, "weight_bytes": 100}
    base = {"loss": 2.0, "decode_tokens_per_s": 50.0, "weight_bytes": 120}
    heals = {"similarity, lora": {"key": "h"}}
    key = key_params(info, distances, base, [row], heals)
    for stage, columns in MEASURED.items():
        remeasured = {c: 99 for c in columns}
        assert key_params(info, distances, {**base, **remeasured}, [{**row, **remeasured}],
                          heals) == key, stage
    assert key_params(info, distances, base, [{**row, "loss": 3.1}], heals) != key
