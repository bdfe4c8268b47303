"""Stage tasks on a real (temporary) Prefect API: the cache heals itself, `refresh` recomputes,
and a completed stage leaves no scratch, including what killed attempts left."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from layerprune.store.leases import new_id
from layerprune.store.artifacts import ArtifactStore
from layerprune.store.manifests import MANIFEST, stage_key
from tasks.common import run_stage, stage_policy, stage_task

BUILDS: list[int] = []  # how many times the stage body really ran


def _params(x: int) -> dict:
    return {"x": x}


@stage_task("toy", 1, _params)
def toy(store_root: str, x: int) -> dict:
    def build(out: Path) -> dict:
        BUILDS.append(x)
        (out / "value.txt").write_text(f"{x}\n")
        return {"x": x}

    return run_stage(store_root, "toy", 1, _params(x), build)


@flow
def toy_flow(root: str, x: int, refresh: list[str] | None = None):
    with stage_policy(refresh or ()):
        state = toy(root, x, return_state=True)
    return state.name, state.result()


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_a_missing_or_damaged_artifact_is_recomputed_not_failed(tmp_path, caplog):
    root = str(tmp_path / "store")
    BUILDS.clear()
    name, first = toy_flow(root, 3)
    assert name == "Completed" and BUILDS == [3]
    name, again = toy_flow(root, 3)
    assert name == "Cached" and BUILDS == [3] and again == first  # Prefect's own cache hit

    # The artifact's file deleted behind Prefect's back: its cache record is ignored.
    store = ArtifactStore(root)
    Path(store.files_path(first, "value.txt")).unlink()
    with caplog.at_level(logging.WARNING):
        name, healed = toy_flow(root, 3)
    assert name == "Completed" and BUILDS == [3, 3]
    assert "toy/" in caplog.text and "value.txt: missing" in caplog.text
    assert healed["attempt"] != first["attempt"]
    assert Path(store.files_path(healed, "value.txt")).read_text() == "3\n"

    # A damaged small file (same size, other bytes), then an unreadable manifest.
    Path(store.files_path(healed, "value.txt")).write_text("4\n")
    name, _ = toy_flow(root, 3)
    assert name == "Completed" and BUILDS == [3, 3, 3]
    Path(store.path("toy", healed["key"], MANIFEST)).write_text("{not json")
    name, last = toy_flow(root, 3)
    assert name == "Completed" and BUILDS == [3, 3, 3, 3]
    assert store.verify(store.manifest("toy", last["key"]), full=True) == []


def test_refresh_recomputes_a_sound_stage(tmp_path):
    root = str(tmp_path / "store")
    BUILDS.clear()
    _, first = toy_flow(root, 5)
    name, again = toy_flow(root, 5, refresh=["toy"])
    assert name == "Completed" and BUILDS == [5, 5]
    assert again["attempt"] != first["attempt"]
    store = ArtifactStore(root)
    assert store.manifest("toy", first["key"])["attempt"] == again["attempt"]
    # The replaced attempt is gone; only the new one and the manifest remain.
    assert sorted(p.name for p in Path(store.path("toy", first["key"])).iterdir()) == \
        sorted([MANIFEST, again["attempt"]])


def test_completing_a_key_clears_what_killed_attempts_left(tmp_path):
    root = str(tmp_path / "store")
    store = ArtifactStore(root)
    key = stage_key("toy", 1, _params(7))
    # What a SIGKILLed attempt leaves: its scratch (lease file included, no owner) and a
    # half-uploaded attempt under the key; plus another key's scratch, which is not ours.
    dead = store.scratch_base() / f"toy-{key}-{new_id()}"
    (dead / "out").mkdir(parents=True)
    (dead / "out" / "value.txt").write_text("half")
    Path(f"{dead}.lock").write_text("12345\n")
    other = store.scratch_base() / f"toy-otherkey-{new_id()}"
    other.mkdir()
    half = Path(store.path("toy", key, "killed-attempt"))
    half.mkdir(parents=True)
    (half / "value.txt").write_text("ha")

    BUILDS.clear()
    _, manifest = toy_flow(root, 7)
    assert BUILDS == [7]
    assert not dead.exists() and not Path(f"{dead}.lock").exists() and not half.exists()
    assert other.exists()
    assert sorted(p.name for p in store.scratch_base().iterdir()) == [other.name]
