"""The chaos harness (benchmarks/chaos.py) on a tiny random model, in the default test run: two
SIGKILLs of the whole flow process at random moments, a rerun, and two identical runs started
together on one store; all must give the undisturbed run's table and a sound, clean store.
The full benchmark (real SmolLM2, 10 kills, local and S3) is `python benchmarks/chaos.py`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from conftest import TEXTS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import chaos  # noqa: E402

pytestmark = pytest.mark.chaos


def tiny_params(model: str, data: str):
    def params(root: str) -> dict:
        return {"model": {"ref": model},
                "calibration": {"data": data, "samples": 5, "seq_len": 12},
                "loss": {"data": data, "samples": 3, "seq_len": 12},
                "prune": {"block_sizes": [1], "strategies": ["similarity", "heuristic"]},
                "benchmarks": {"tasks": {}},
                "heal": {"block_sizes": [1], "strategies": ["heuristic"], "data": data,
                         "methods": ["lora"],  # the resumable method; linear has no steps
                         "config": {"steps": 6, "seq_len": 8, "batch_size": 2, "save_every": 2,
                                    "gradient_checkpointing": False}},
                "batch_size": 4, "artifacts": root}
    return params


@pytest.fixture(scope="module")
def scenario(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("chaos")
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    with chaos.services(work, s3=False) as env:
        stores = chaos.Stores("local", work, env, tiny_params(tiny_models["llama"], str(data)))
        result = chaos.chaos(stores, kills=2, pairs=1, rng=random.Random(0), timeout_s=120,
                              overlap=True)
    return stores, result


def test_killed_and_concurrent_runs_give_the_undisturbed_result(scenario):
    stores, result = scenario
    summary = "\n".join(chaos.summary_lines(result))
    assert result["kills"] == 2, summary  # both kills hit a running flow
    assert result["failures"] == [], summary
    assert result["mismatches"] == [], summary
    assert result["store_problems"] == {}, summary
    assert result["pairs"][0]["exit"] == [0, 0], summary
    assert chaos.problem_count(result) == 0


def test_the_checks_catch_a_damaged_store_and_a_changed_table(scenario):
    """The harness's own checks can fail: a byte appended to a stored file, a file the manifest
    does not list, a stage dir left in scratch and a changed metric are each reported."""
    stores, _ = scenario
    reference = stores.inspect("undisturbed")
    assert reference["problems"] == [] and reference["table"] is not None
    assert chaos.compare(reference, reference, "same") == []

    root = Path(stores.root("killed"))
    manifest = json.loads(next(root.glob("heal/*/manifest.json")).read_text())
    from layerprune.store.artifacts import ArtifactStore

    files = ArtifactStore(str(root)).local_dir("heal", manifest["key"])
    (files / "heal.json").write_bytes((files / "heal.json").read_bytes() + b" ")
    (files / "stray.bin").write_bytes(b"x")
    (root / ".scratch" / "heal-left-behind").mkdir(parents=True)
    damaged = stores.inspect("killed")
    assert any("heal.json" in p and "bytes" in p for p in damaged["problems"]), damaged
    assert any("does not list" in p and "stray.bin" in p for p in damaged["problems"]), damaged
    assert any("heal-left-behind" in p for p in damaged["problems"]), damaged

    changed = json.loads(json.dumps(reference, default=list))
    changed["keys"] = reference["keys"]
    changed["table"]["rows"][0]["loss"] += 1e-4
    found = chaos.compare(reference, changed, "changed")
    assert len(found) == 1 and "loss" in found[0], found
