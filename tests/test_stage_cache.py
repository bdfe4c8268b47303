"""Stage tasks on a real (temporary) Prefect API: the cache heals itself, `refresh` recomputes
(with the stages that read the refreshed one's measured results), a completed stage leaves no
scratch, including what killed attempts left; and what one stage call costs: its manifest read
and verified once, its result storage block loaded once per process and store root."""

from __future__ import annotations

import collections
import json
import logging
import shutil
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from layerprune.store.artifacts import ArtifactStore
from layerprune.store.leases import new_id
from layerprune.store.manifests import MANIFEST, stage_key
from tasks.common import run_stage, stage_policy, stage_task
from tasks.results import AtomicLocalFileSystem, block_name, result_storage_for

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


def _reader_params(measured: dict) -> dict:
    return {"toy": measured["key"]}  # the key, not the attempt: what it measured is unkeyed


@stage_task("toy_reader", 1, _reader_params, reads_measured=["toy"])
def toy_reader(store_root: str, measured: dict) -> dict:
    """Reads toy's attempt (standing in for a measured value: it differs between two
    computations of one key) and leaves it out of its key, as the report does with timings."""
    def build(out: Path) -> dict:
        return {"read_attempt": measured["attempt"]}

    return run_stage(store_root, "toy_reader", 1, _reader_params(measured), build)


@flow
def toy_flow(root: str, x: int, refresh: list[str] | None = None):
    with stage_policy(refresh or ()):
        state = toy(root, x, return_state=True)
    return state.name, state.result()


@flow
def toys(root: str, xs: list[int]) -> list[str]:
    """One flow run, one stage call per x: the names of their final states."""
    return [toy(root, x, return_state=True).name for x in xs]


@flow
def measured_and_reader(root: str, refresh: list[str]) -> dict:
    with stage_policy(refresh):
        measured = toy(root, 1, return_state=True)
        reader = toy_reader(root, measured.result(), return_state=True)
    return {"toy": measured.name, "toy_reader": reader.name, "measured": measured.result(),
            "reader": reader.result()}


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


def test_refresh_reaches_the_stages_that_read_the_refreshed_ones_measured_results(tmp_path):
    """toy_reader declares that it reads toy's measured results unkeyed: refreshing toy computes
    it again too, and it then shows the new measurement; refreshing toy_reader, which nobody
    reads, computes it alone. (A flow special-casing one stage, as `speed` -> `report` was,
    leaves a refreshed heal's new timings out of the report.)"""
    root = str(tmp_path / "store")
    first = measured_and_reader(root, [])
    assert (first["toy"], first["toy_reader"]) == ("Completed", "Completed")
    again = measured_and_reader(root, [])
    assert (again["toy"], again["toy_reader"]) == ("Cached", "Cached")
    remeasured = measured_and_reader(root, ["toy"])
    assert (remeasured["toy"], remeasured["toy_reader"]) == ("Completed", "Completed")
    assert remeasured["measured"]["attempt"] != first["measured"]["attempt"]
    assert remeasured["reader"]["meta"]["read_attempt"] == remeasured["measured"]["attempt"]
    assert remeasured["reader"]["key"] == first["reader"]["key"]  # the same report, renewed
    alone = measured_and_reader(root, ["toy_reader"])
    assert (alone["toy"], alone["toy_reader"]) == ("Cached", "Completed")


@pytest.fixture
def store_calls(monkeypatch) -> collections.Counter:
    """{ArtifactStore method: calls}: the store's manifest reads and verifications, counted."""
    calls: collections.Counter = collections.Counter()
    for name in ("manifest", "verify"):
        def counted(self, *args, _name=name, _method=getattr(ArtifactStore, name), **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(ArtifactStore, name, counted)
    return calls


def test_one_stage_call_reads_and_verifies_its_manifest_once(tmp_path, store_calls):
    """StageTask checks the stored manifest before Prefect's cache lookup; when Prefect's cache
    misses although the store holds the stage (its cache records gone, or written under
    another spelling of the root), the task body used to read and verify it again: two reads
    and two verifications (a checksum pass over the small files, a listing on S3) per call."""
    root = str(tmp_path / "store")
    BUILDS.clear()
    name, first = toy_flow(root, 11)
    # Absent: read before Prefect's lookup, and again under the attempt's lease (a concurrent
    # run may have completed it meanwhile); before, a third read between the two.
    assert name == "Completed" and BUILDS == [11]
    assert store_calls == {"manifest": 2}, store_calls

    store_calls.clear()
    name, _ = toy_flow(root, 11)
    assert name == "Cached" and store_calls == {"manifest": 1, "verify": 1}, store_calls

    shutil.rmtree(tmp_path / "store" / "prefect-results")  # Prefect's cache misses
    store_calls.clear()
    name, reused = toy_flow(root, 11)
    assert name == "Completed" and BUILDS == [11] and reused == first  # reused, not rebuilt
    assert store_calls == {"manifest": 1, "verify": 1}, store_calls


@pytest.fixture
def block_requests(monkeypatch) -> list[str]:
    """'METHOD path' of every request of this process to the Prefect API about blocks (httpx,
    which Prefect's clients send through, instrumented)."""
    sent: list[str] = []

    def counting(send):
        def sync(self, request, *args, **kwargs):
            if "/block_" in request.url.path:
                sent.append(f"{request.method} {request.url.path}")
            return send(self, request, *args, **kwargs)

        async def asynchronous(self, request, *args, **kwargs):
            if "/block_" in request.url.path:
                sent.append(f"{request.method} {request.url.path}")
            return await send(self, request, *args, **kwargs)
        return sync, asynchronous

    monkeypatch.setattr(httpx.Client, "send", counting(httpx.Client.send)[0])
    monkeypatch.setattr(httpx.AsyncClient, "send", counting(httpx.AsyncClient.send)[1])
    return sent


def test_the_result_storage_block_is_loaded_once_per_process_and_root(tmp_path,
                                                                      block_requests):
    """Three stage calls in one flow run load their store's block once (it is not saved yet:
    saved once); a second run asks the server nothing; another root gets its own block, whose
    records land under that root. Before, every stage call loaded the block, and saved it again
    (7 requests a call: the comparison with the loaded block always failed)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert toys(a, [1, 2, 3]) == ["Completed"] * 3
    loads = [r for r in block_requests if r.endswith(f"/block_documents/name/{block_name(a)}")]
    saves = [r for r in block_requests if r.startswith(("POST", "PATCH", "PUT"))
             and "/block_documents" in r]  # (the type and schema: once per server)
    assert len(loads) == 1 and saves == ["POST /api/block_documents/"], block_requests

    block_requests.clear()
    assert toys(a, [1, 2, 3]) == ["Cached"] * 3
    assert block_requests == []

    assert toys(b, [1]) == ["Completed"]
    assert [r for r in block_requests if "/block_documents/name/" in r] == \
        [f"GET /api/block_types/slug/{AtomicLocalFileSystem.get_block_type_slug()}"
         f"/block_documents/name/{block_name(b)}"]
    assert len(list((tmp_path / "b" / "prefect-results").iterdir())) == 1  # b's records in b
    assert len(list((tmp_path / "a" / "prefect-results").iterdir())) == 3

    block_requests.clear()
    assert toys(a, [2]) == ["Cached"] and block_requests == []

    # Another API (here the same server under another name) is not assumed to hold the block.
    url = get_current_settings().api.url
    assert "127.0.0.1" in url
    with temporary_settings(updates={PREFECT_API_URL: url.replace("127.0.0.1", "localhost")}):
        storage = result_storage_for(a)
    assert [r for r in block_requests if "/block_documents/name/" in r] == [loads[0]]
    assert storage.basepath == str(tmp_path / "a" / "prefect-results")


def _hostile_records(marker: Path) -> dict[str, bytes]:
    """Cache records someone with write access to the artifact root could plant: a pickle whose
    loading would create `marker`, a JSON record naming a decoder of its own choosing, and one
    whose data asks Prefect's JSON decoder to build an object."""
    import base64
    import pickle

    class Plant:
        def __reduce__(self):
            return (Path(str(marker)).touch, ())

    serializer = dict(__import__("tasks.results", fromlist=["x"]).JSON_SERIALIZER)
    meta = {"storage_key": "k", "expiration": None, "prefect_version": "3.9.1"}
    return {
        "pickle": json.dumps({"metadata": {**meta, "serializer": {"type": "pickle",
                                                                  "picklelib": "pickle"}},
                              "result": base64.b64encode(pickle.dumps(Plant())).decode()}).encode(),
        "decoder": json.dumps({"metadata": {**meta, "serializer": {
            **serializer, "object_decoder": "pathlib.Path.touch"}},
            "result": json.dumps({"x": 1})}).encode(),
        "class": json.dumps({"metadata": {**meta, "serializer": serializer},
                             "result": json.dumps({"__class__": "pathlib.Path",
                                                   "data": str(marker)})}).encode(),
    }


@pytest.mark.parametrize("kind", ["pickle", "decoder", "class"])
def test_a_planted_cache_record_is_never_deserialized(tmp_path, kind):
    """A record that is not plain JSON from Prefect's JSON serializer reads as a miss: the stage
    is computed again (correctly), the record is rewritten as JSON, and nothing in it runs.
    Catches result storage that hands Prefect any record (Prefect unpickles a record that says
    "pickle", and its JSON decoder imports what a record names)."""
    root = str(tmp_path / "store")
    marker = tmp_path / "planted-code-ran"
    BUILDS.clear()
    assert toy_flow(root, 7)[0] == "Completed"
    record = next((tmp_path / "store" / "prefect-results").iterdir())
    record.write_bytes(_hostile_records(marker)[kind])
    BUILDS.clear()
    name, result = toy_flow(root, 7)
    assert not marker.exists()
    assert result["files"]["value.txt"]["bytes"] == 2 and json.loads(record.read_text())[
        "metadata"]["serializer"]["type"] == "json"


def test_remote_result_storage_reads_plain_json_only(tmp_path):
    from tasks.results import JsonOnlyRemoteFileSystem

    marker = tmp_path / "planted-code-ran"
    block = JsonOnlyRemoteFileSystem(basepath="memory://records-test")
    for kind, data in _hostile_records(marker).items():
        block.write_path(kind, data)
        with pytest.raises(FileNotFoundError):
            block.read_path(kind)
    good = json.dumps({"metadata": {"serializer": __import__(
        "tasks.results", fromlist=["x"]).JSON_SERIALIZER}, "result": json.dumps({"a": [1]})})
    block.write_path("good", good.encode())
    assert block.read_path("good") == good.encode() and not marker.exists()
