"""The prune-and-heal flow on a real (temporary, local) Prefect API: stages, artifacts, caching;
where results and summaries are stored, and how child runs are started (tasks/children.py)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer
from prefect.states import Completed, Crashed, Failed
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file

from flows.prune_and_heal import prune_and_heal
from layerprune.config import PruneAndHealParams
from tasks import children
from tasks.artifacts import artifact_key
from tasks.children import ChildRunFailed, run_child
from tasks.results import AtomicLocalFileSystem, block_name, read_run_summary, result_storage_for


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
        "prune": {"block_sizes": sizes, "export_checkpoints": True, "random_blocks": 2,
                  "greedy_samples": 3, "strategies": ["similarity", "heuristic",
                                                      "block-influence", "greedy-loss", "random"]},
        "benchmarks": {"tasks": {"boolq": 4}, "block_sizes": [1]},
        "heal": {"block_sizes": [1], "strategies": ["heuristic"], "data": data,
                 "config": {"steps": 2, "seq_len": 8, "batch_size": 2, "save_every": 1,
                           "linear_samples": 5}},
        "speed": {"prefill_tokens": 8, "decode_tokens": 2, "repeats": 1},
        "batch_size": 4, "artifacts": str(root)})


def _tensor_bytes(checkpoint: Path) -> tuple[int, dict[int, int]]:
    """(bytes of every tensor, {decoder layer: bytes of its tensors}) of a saved checkpoint,
    read from its safetensors file: independent of the model object the flow measures."""
    total, per_layer = 0, {}
    for name, t in load_file(checkpoint / "model.safetensors").items():
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if m := re.search(r"\.layers\.(\d+)\.", name):
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + nbytes
    return total, per_layer


def _layers(text: str) -> list[int]:
    """'0-2,5' (prune.describe_layers) -> [0, 1, 2, 5]."""
    out = []
    for run in text.split(","):
        low, _, high = run.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


def _stored(root: Path, stage: str) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted((root / stage).glob("*/manifest.json"))]


def _check_speed(summary: dict, model: str, root: Path) -> None:
    """Every unhealed row's speed columns come from the measurement of its own removed layers,
    whose weights are the base's less exactly those layers' tensors; a healed row has its
    unhealed variant's (the same layers), which is also what its merged checkpoint holds."""
    total, per_layer = _tensor_bytes(Path(model))
    base = summary["base"]
    assert base["weight_bytes"] == total and base["decode_tokens_per_s"] > 0
    measured = {tuple(m["params"]["removed_layers"]): m["meta"] for m in _stored(root, "speed")}
    rows = {(r["variant"], r["n"]): r for r in summary["rows"] if r["heal_method"] is None}
    for (variant, _), row in rows.items():
        if variant == "random":  # the mean over its blocks, each measured on its own
            blocks = [tuple(_layers(b)) for b in row["removed_layers"].split("; ")]
            assert row["decode_speedup"] == pytest.approx(sum(
                round(measured[b]["speedup"]["decode"], 3) for b in blocks) / len(blocks),
                abs=1e-4)
            assert row["weight_bytes"] == round(sum(
                total - sum(per_layer[i] for i in b) for b in blocks) / len(blocks))
            continue
        drop = _layers(row["removed_layers"])
        expected = total - sum(per_layer[i] for i in drop)
        assert row["weight_bytes"] == expected < total, row
        assert row["bytes_saved_pct"] == pytest.approx(100 * (1 - expected / total), abs=0.01)
        assert row["decode_speedup"] > 0 and row["prefill_tokens_per_s"] > 0
        meta = measured[tuple(drop)]  # this row's own measurement, not another block's
        assert row["decode_speedup"] == round(meta["speedup"]["decode"], 3)
        assert row["decode_tokens_per_s"] == round(meta["variant"]["decode_tokens_per_s"], 2)
    heals = {m["meta"]["method"]: m for m in _stored(root, "heal")}
    for row in summary["rows"]:
        if row["heal_method"] is not None:
            unhealed = rows[(row["strategy"], row["n"])]
            assert {k: row[k] for k in ("weight_bytes", "decode_speedup")} == \
                {k: unhealed[k] for k in ("weight_bytes", "decode_speedup")}
            merged = root / "heal" / heals[row["heal_method"]]["key"] / \
                heals[row["heal_method"]]["attempt"] / "merged"
            assert _tensor_bytes(merged)[0] == row["weight_bytes"]


def _artifacts(model_ref: str) -> list:
    """Every version of the model's report and table artifacts on the API."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = [artifact_key(kind, model_ref) for kind in ("prune-report", "pruned-models")]
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=keys)))


def test_flow_runs_caches_and_resumes(prefect_api, tiny_models, texts_jsonl, tmp_path):
    params = _params(tiny_models["llama"], texts_jsonl, tmp_path / "store", [1])
    first = prune_and_heal(params, return_state=True)
    summary = first.result()
    # The summary a parent reads (tasks/results.py), stored under the flow run's id; the flow's
    # own return value is not persisted: every record in prefect-results is a stage's cache
    # record (named `<stage key>@<store>`), and none is a temp file left by an atomic write.
    flow_run_id = first.state_details.flow_run_id
    assert read_run_summary(str(tmp_path / "store"), str(flow_run_id)) == \
        json.loads(json.dumps(summary))
    records = list((tmp_path / "store" / "prefect-results").iterdir())
    assert len(records) >= 7 and all("@" in r.name and r.is_file() for r in records), records
    rows = {r["variant"]: r for r in summary["rows"]}
    assert sorted(rows) == ["block-influence", "greedy-loss", "heuristic", "heuristic, linear",
                            "heuristic, lora", "random", "similarity"]
    assert [r["n"] for r in summary["rows"]] == [1] * 7
    manifests = sorted((tmp_path / "store").glob("*/*/manifest.json"))
    stages = {m.parent.parent.name for m in manifests}
    assert stages == {"calibration", "hidden_states", "distances", "scores", "prune", "eval",
                      "speed", "heal", "report"}
    distances = [json.loads(m.read_text()) for m in manifests if m.parent.parent.name ==
                 "distances"][0]
    assert {"stability.json", "stability.png"} <= set(distances["files"])
    assert "disjoint folds" in distances["meta"]["stability"]  # shown in the report
    # The random baseline: two seeded blocks, their mean loss and its spread.
    blocks = rows["random"]["removed_layers"].split("; ")
    assert len(blocks) == 2 and len(set(blocks)) == 2 and rows["random"]["loss_sd"] >= 0
    for method in ("linear", "lora"):  # each healed row against its unhealed variant
        healed = rows[f"heuristic, {method}"]
        assert healed["heal_method"] == method and "boolq" in healed
        assert healed["pruned_loss"] == rows["heuristic"]["loss"]
        gap = 100 * (healed["pruned_loss"] - healed["loss"]) / (
            healed["pruned_loss"] - summary["base"]["loss"])
        assert healed["loss_gap_closed_pct"] == pytest.approx(gap, abs=0.06)
        assert healed["heal_seconds"] > 0 and healed["heal_peak_memory_mb"] > 0
    assert rows["heuristic, lora"]["heal_tokens"] == 2 * 2 * 8  # steps x batch x seq_len
    assert rows["heuristic, linear"]["heal_tokens"] == 0 < rows["heuristic, linear"]["fit_tokens"]
    row = rows["similarity"]
    assert 0 <= row["boolq"] <= 1 and row["loss"] > 0 and row["bits_per_byte"] > 0
    # What the terminal shows: metrics with their error bars, what each variant gains.
    header, *lines = summary["table"].splitlines()
    assert header.split() == ["variant", "n", "removed_layers", "loss", "boolq",
                              "decode_speedup", "bytes_saved_pct", "heal_method",
                              "heal_tokens", "fit_tokens", "loss_gap_closed_pct"]
    assert len(lines) == 7 and f"{rows['similarity']['loss']} ± " in summary["table"]
    for m in manifests:  # every listed file is in the committed attempt with its size
        doc = json.loads(m.read_text())
        assert doc["files"] and sorted(p.name for p in m.parent.iterdir()) == \
            sorted(["manifest.json", doc["attempt"]])  # nothing else under the key
        for rel, meta in doc["files"].items():
            assert (m.parent / doc["attempt"] / rel).stat().st_size == meta["bytes"]
    exported = [m.parent / json.loads(m.read_text())["attempt"] / "checkpoint"
                for m in manifests if m.parent.parent.name == "prune"]
    assert exported and all((c / "model.safetensors").exists() for c in exported)
    assert (Path(summary["report_uri"]) / "results.parquet").exists()
    assert (Path(summary["report_uri"]) / "healing_curves.png").stat().st_size > 0
    # No scratch left (healing's resumable directory included), no stray temp file.
    assert list((tmp_path / "store" / ".scratch").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        [".scratch", "prefect-results", "runs", *stages])

    _check_speed(summary, tiny_models["llama"], tmp_path / "store")
    assert len(_artifacts(tiny_models["llama"])) == 2  # the report and the table, this model's
    mtimes = {m: m.stat().st_mtime_ns for m in manifests}
    states = _task_states(prune_and_heal(params, return_state=True))
    # every stage Cached; the model description and the artifacts are made on every run
    assert {s for name, s in states.items()
            if not name.startswith(("describe-model", "report-artifacts"))} == {"Cached"}, states
    assert [s for n, s in states.items() if n.startswith("report-artifacts")] == ["Completed"]
    published = _artifacts(tiny_models["llama"])
    assert len(published) == 4  # a cached rerun publishes its report too
    report = [a for a in published if a.type == "markdown"][0]
    assert report.key == artifact_key("prune-report", tiny_models["llama"])
    assert "## Variants" in report.data and "heuristic, lora" in report.data
    # One speed task per distinct block (strategies that agree share it), each Cached.
    assert len([n for n in states if n.startswith("speed-drop-")]) == \
        len(_stored(tmp_path / "store", "speed")) >= 2
    assert {m: m.stat().st_mtime_ns for m in manifests} == mtimes  # nothing rewritten

    # Re-measuring (refresh speed): new timings reach the rows, and the report, keyed without
    # them, is the same report (republished under its key), not a second one.
    remeasure = params.model_copy(update={"refresh": ["speed"]})
    states = _task_states(again := prune_and_heal(remeasure, return_state=True))
    assert {n for n, s in states.items() if s == "Completed"} == {
        n for n in states if n.startswith(("speed-drop-", "report", "describe-model"))}, states
    remeasured = again.result()
    _check_speed(remeasured, tiny_models["llama"], tmp_path / "store")
    assert [r["decode_tokens_per_s"] for r in remeasured["rows"]] != \
        [r["decode_tokens_per_s"] for r in summary["rows"]]  # timed again, not reused
    assert Path(remeasured["report_uri"]).parent == Path(summary["report_uri"]).parent
    assert len(list((tmp_path / "store" / "report").iterdir())) == 1

    # A run with one more block size redoes only the new stages (as after a crash mid-run).
    bigger = _params(tiny_models["llama"], texts_jsonl, tmp_path / "store", [1, 2])
    states = _task_states(bigger_state := prune_and_heal(bigger, return_state=True))
    computed = {n for n, s in states.items() if s == "Completed"}
    # greedy-loss's order is computed up to the largest n, so it (and its n=1 recipe) is redone.
    assert {n for n in computed if n.startswith(("prune", "scores"))} == {
        "prune-similarity-n2", "prune-heuristic-n2", "prune-block-influence-n2",
        "prune-greedy-loss-n2", "prune-random-n2-seed0", "prune-random-n2-seed1",
        "scores-greedy-loss", "prune-greedy-loss-n1"}, states
    assert all(n.startswith(("describe-model", "prune", "eval-loss-drop", "speed-drop",
                             "report", "scores")) for n in computed), computed
    n1_blocks = {b for r in summary["rows"] for b in r["removed_layers"].split("; ")}
    assert {states[f"speed-drop-{b}"] for b in n1_blocks} == {"Cached"}
    assert any(n.startswith("speed-drop") for n in computed)  # the n = 2 blocks
    _check_speed(bigger_state.result(), tiny_models["llama"], tmp_path / "store")
    assert states["prune-similarity-n1"] == states["prune-random-n1-seed1"] == "Cached"
    assert states["scores-block-influence"] == "Cached"
    assert {s for n, s in states.items() if n.startswith(("calibration", "hidden", "dist"))} \
        == {"Cached"}


def test_bad_parameters_are_refused_before_any_work(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"prune\.block_sizes\.0\n.*greater than or equal to 1"):
        _params(tiny_models["llama"], "x.jsonl", tmp_path, [0, 2])
    with pytest.raises(ValueError, match="samples"):
        PruneAndHealParams.model_validate({"calibration": {"samples": 0}})
    with pytest.raises(ValueError, match="strategies"):
        PruneAndHealParams.model_validate({"prune": {"strategies": ["shortgpt"]}})
    with pytest.raises(ValueError, match="random is a baseline"):
        PruneAndHealParams.model_validate({"heal": {"strategies": ["random"]}})
    with pytest.raises(ValueError, match="methods"):
        PruneAndHealParams.model_validate({"heal": {"methods": ["qlora"]}})


def _race(storage, seconds: float = 1.5) -> tuple[int, int]:
    """(reads, failed reads) of one cache record while another thread keeps rewriting it, both
    through Prefect's own ResultStore (what a cache hit and a concurrent run do)."""
    store = ResultStore(result_storage=storage, serializer=JSONSerializer(),
                        cache_result_in_memory=False)
    payload = {"files": {f"f{i}": "x" * 64 for i in range(4000)}}  # a big manifest, ~340 kB
    store.persist_result_record(store.create_result_record(payload, key="rec"))
    stop = time.time() + seconds

    def rewrite():
        while time.time() < stop:
            store.persist_result_record(store.create_result_record(payload, key="rec"))

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = failed = 0
    while time.time() < stop:
        reads += 1
        try:
            assert store.read("rec").result == payload
        except Exception:
            failed += 1
    writer.join()
    return reads, failed


def test_local_cache_records_are_replaced_atomically(prefect_api, tmp_path):
    """Prefect reads a cache record twice on a hit: exists() takes an unreadable record for a
    miss, read() raises. A record rewritten in place (Prefect's LocalFileSystem: truncate, then
    write) is seen half-written by a concurrent reader; ours (temp file + rename) never is."""
    storage = result_storage_for(str(tmp_path / "store"))
    assert isinstance(storage, AtomicLocalFileSystem)
    assert Path(storage.basepath) == tmp_path / "store" / "prefect-results"
    saved = AtomicLocalFileSystem.load(block_name(str(tmp_path / "store")))  # as Prefect needs
    assert saved.basepath == storage.basepath
    reads, failed = _race(storage)
    assert reads > 10 and failed == 0, (reads, failed)
    assert [p.name for p in Path(storage.basepath).iterdir()] == ["rec"]  # no temp file left

    plain = LocalFileSystem(basepath=str(tmp_path / "plain"))
    plain.save("plain-local-results", overwrite=True)
    reads, failed = _race(plain)
    assert failed > 0, f"Prefect's LocalFileSystem was never caught mid-write in {reads} reads"

    # What a torn record does in Prefect 3.9: exists() says miss, read() fails the attempt.
    store = ResultStore(result_storage=plain, serializer=JSONSerializer())
    (tmp_path / "plain" / "torn").write_text('{"metadata": {"storage_key"')
    assert not store.exists("torn")
    with pytest.raises(Exception):
        store.read("torn")


def test_child_runs_are_idempotent_and_only_crashed_ones_are_retried(prefect_api, monkeypatch):
    """run_child against a real server; the children's outcomes are set through the API (no
    worker runs them). Each child is identified by its idempotency key."""
    monkeypatch.setattr(children, "POLL_S", 0.1)
    outcomes = {"m/try-0": Crashed, "m/try-1": Completed, "f/try-0": Failed,
                "f/try-1": Completed, "c/try-0": Crashed, "c/try-1": Crashed}
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("child"), name="idempotent")
    only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    stop = threading.Event()

    def respond():  # plays the children: each ends as `outcomes` says for its key
        handled = set()
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                for run in client.read_flow_runs(deployment_filter=only_ours):
                    if run.id not in handled:
                        end = outcomes[run.idempotency_key.split("/", 1)[1]]
                        client.set_flow_run_state(run.id, end(), force=True)
                        handled.add(run.id)
                time.sleep(0.05)

    @flow
    def parent() -> dict:
        got = {"m": run_child("child/idempotent", {}, "m", work="m")}  # try-0 crashes
        got["m again"] = run_child("child/idempotent", {}, "m", work="m")  # as a retried parent
        with pytest.raises(ChildRunFailed, match="ended Failed"):
            run_child("child/idempotent", {}, "f", work="f")  # a failure is not retried...
        got["f"] = run_child("child/idempotent", {}, "f", work="f")  # ...unless the parent is
        with pytest.raises(ChildRunFailed, match="ended Crashed"):
            run_child("child/idempotent", {}, "c", work="c", crash_retries=1)  # bounded
        return got

    responder = threading.Thread(target=respond, daemon=True)
    responder.start()
    try:
        state = parent(return_state=True)
        got = state.result()
    finally:
        stop.set()
        responder.join()
    parent_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=only_ours)
    keys = sorted(r.idempotency_key for r in runs)
    assert keys == sorted(f"{parent_id}/{k}" for k in outcomes)  # each try exactly once
    assert got["m"].id == got["m again"].id and got["m"].idempotency_key.endswith("m/try-1")
    assert got["f"].idempotency_key.endswith("f/try-1")
