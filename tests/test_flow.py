"""The prune-and-heal flow on a real (temporary, local) Prefect API: stages, artifacts, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.prune_and_heal import prune_and_heal
from layerprune.config import PruneAndHealParams


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_test_harness(server_startup_timeout=60):
        yield


def _task_states(flow_state) -> dict[str, str]:
    """{task run name: final state name}. Task runs and their states reach the API as events, a
    moment after the flow returns: wait until the listed runs all have a final state, twice in a
    row with the same count (a run can be listed before its first state arrives, and some runs
    before others)."""
    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        settled = None  # how many runs were listed, all final, at the last poll
        for _ in range(100):
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = runs and all(r.state is not None and r.state.is_final() for r in runs)
            if final and len(runs) == settled:  # the same twice in a row: nothing more to come
                break
            settled = len(runs) if final else None
            time.sleep(0.2)
    states = {r.name: r.state.name for r in runs}
    assert len(states) == len(runs), "task run names must be unique"
    return states


def _params(model: str, data: str, root: Path, sizes: list[int]) -> PruneAndHealParams:
    return PruneAndHealParams.model_validate({
        "model": {"ref": model},
        "calibration": {"data": data, "samples": 5, "seq_len": 12},
        "loss": {"data": data, "samples": 3, "seq_len": 12},
        "prune": {"block_sizes": sizes, "export_checkpoints": True},
        "benchmarks": {"tasks": {"boolq": 4}, "block_sizes": [1]},
        "heal": {"block_sizes": [1], "strategies": ["heuristic"], "data": data,
                 "config": {"steps": 2, "seq_len": 8, "batch_size": 2, "save_every": 1}},
        "batch_size": 4, "artifacts": str(root)})


def test_flow_runs_caches_and_resumes(prefect_api, tiny_models, texts_jsonl, tmp_path):
    params = _params(tiny_models["llama"], texts_jsonl, tmp_path / "store", [1])
    first = prune_and_heal(params, return_state=True)
    summary = first.result()
    assert [r["n"] for r in summary["rows"]] == [1, 1, 1]
    manifests = sorted((tmp_path / "store").glob("*/*/manifest.json"))
    stages = {m.parent.parent.name for m in manifests}
    assert stages == {"calibration", "hidden_states", "distances", "prune", "eval", "heal",
                      "report"}
    healed = [r for r in summary["rows"] if r["variant"] == "heuristic, healed"]
    assert len(healed) == 1 and healed[0]["loss"] > 0 and "boolq" in healed[0]
    row = summary["rows"][0]
    assert 0 <= row["boolq"] <= 1 and row["loss"] > 0 and row["bits_per_byte"] > 0
    for m in manifests:  # every listed file is there with the recorded size
        doc = json.loads(m.read_text())
        for rel, meta in doc["files"].items():
            assert (m.parent / rel).stat().st_size == meta["bytes"]
    exported = [m.parent / "checkpoint" for m in manifests if m.parent.parent.name == "prune"]
    assert all((c / "model.safetensors").exists() for c in exported)
    assert (Path(summary["report_uri"]) / "results.parquet").exists()
    assert (Path(summary["report_uri"]) / "healing_curves.png").stat().st_size > 0
    assert not list((tmp_path / "store").glob("*/.*.tmp*"))

    mtimes = {m: m.stat().st_mtime_ns for m in manifests}
    states = _task_states(prune_and_heal(params, return_state=True))
    assert {s for name, s in states.items() if not name.startswith("describe-model")} == \
        {"Cached"}, states
    assert {m: m.stat().st_mtime_ns for m in manifests} == mtimes  # nothing rewritten

    # A run with one more block size redoes only the new stages (as after a crash mid-run).
    bigger = _params(tiny_models["llama"], texts_jsonl, tmp_path / "store", [1, 2])
    states = _task_states(prune_and_heal(bigger, return_state=True))
    computed = {n for n, s in states.items() if s == "Completed"}
    assert {n for n in computed if n.startswith("prune")} == {"prune-similarity-n2",
                                                              "prune-heuristic-n2"}, states
    assert all(n.startswith(("describe-model", "prune", "eval-loss-drop", "report"))
               for n in computed), computed
    assert states["prune-similarity-n1"] == states["prune-heuristic-n1"] == "Cached"
    assert {s for n, s in states.items() if n.startswith(("calibration", "hidden", "dist"))} \
        == {"Cached"}


def test_bad_parameters_are_refused_before_any_work(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"prune\.block_sizes\.0\n.*greater than or equal to 1"):
        _params(tiny_models["llama"], "x.jsonl", tmp_path, [0, 2])
    with pytest.raises(ValueError, match="samples"):
        PruneAndHealParams.model_validate({"calibration": {"samples": 0}})
    with pytest.raises(ValueError, match="strategies"):
        PruneAndHealParams.model_validate({"prune": {"strategies": ["random"]}})
