"""Where Prefect's task results (cache records) and each run's summary live: in the artifact store.

Cache records. Each stage task persists its result (the stage manifest, JSON) under its cache key,
and a cache hit must work from any worker, so the records live next to the artifacts, in
`<artifacts>/prefect-results/`. The artifact root is a flow *parameter*, so a stage task is
given its storage per call (`Task.with_options(result_storage=result_storage_for(root))`, in
tasks.common.StageTask). Prefect takes a `pathlib.Path` or a *saved* block there (an unsaved block
is refused with a TypeError), so each root gets a block saved under a name derived from it,
loaded (or saved) once per process, Prefect API and root, and reused for every later stage call:

- remote root (s3://...): `RemoteFileSystem`, holding only the basepath and the bounded-retry
  client config; the endpoint and credentials come from each worker's AWS environment. An S3 PUT
  is atomic: a reader sees the old record or the new one.
- local root: `AtomicLocalFileSystem`, below. Prefect's `LocalFileSystem.write_path` opens the
  record with "wb" (truncate, then write). Prefect 3.9 reads a record twice on a cache hit:
  `ResultStore.exists()` parses it and treats any failure as a miss (the stage recomputes,
  harmless), then `ResultStore.read()` parses it again and lets the error escape, failing the task
  attempt. A second run rewriting the record between the two (two runs that computed one key at
  once, or a `refresh`) could fail a run. Writing to a temporary file and renaming it over the
  record makes every read see a whole record.

Only plain JSON is ever read back. A cache record names its own deserializer, and Prefect would
unpickle a record that says "pickle", or import and call any `object_decoder` it names, and its
JSON decoder builds any class a `__class__` entry names: anyone who can write the artifact root
could make a worker run code. So both storages read through `plain_json_record`: a record must
name exactly Prefect's JSON serializer and hold plain JSON data (stage results are manifests:
dicts, lists, strings, numbers). Anything else reads as no record (a cache miss, like a missing
file), so the stage is computed again and the record rewritten, with a warning.

Run summaries. A flow's own return value is not persisted (no result storage is needed for it):
the parent of a run (the sweep) reads a child's summary from `<artifacts>/runs/<flow run id>/
summary.json` (`write_run_summary`, `read_run_summary`). Why there and not in Prefect's result
storage or a stage's manifest: the parent learns the child's flow run id from `run_deployment`
and already reads the child's artifacts from the store, so it needs nothing else to find the
summary (a stage key, such as the report's, depends on everything the child measured, which the
parent does not know); the file is written once per run, atomically (a temp file renamed locally,
one PUT on S3), and `layerprune gc` leaves `runs/` alone. The heal dispatch needs no summary: the
parent computes the heal stage's key itself and reads its manifest (flows/heal.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect.filesystems import RemoteFileSystem, WritableFileSystem
from prefect.settings import get_current_settings
from pydantic import Field

from layerprune.store.artifacts import ArtifactStore
from layerprune.store.files import write_json_atomic
from layerprune.store.remote import is_remote, storage_options_from_env

RESULTS_DIR = "prefect-results"
RUNS_DIR = "runs"  # run summaries; not a stage (layerprune.store.maintenance.NOT_STAGES)
SUMMARY = "summary.json"


def results_location(root: str) -> str:
    return f"{str(root).rstrip('/')}/{RESULTS_DIR}"


def local_root(root: str) -> Path:
    return Path(str(root).removeprefix("file://")).expanduser().resolve()


def block_name(root: str) -> str:
    """A valid block name (lowercase letters, digits, dashes) that is stable per root."""
    return "layerprune-results-" + hashlib.sha256(str(root).encode()).hexdigest()[:16]


# The serializer every stage task writes with (serializer="json", Prefect's JSONSerializer):
# a record read back must name exactly this.
JSON_SERIALIZER = {"type": "json", "jsonlib": "json",
                   "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                   "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                   "dumps_kwargs": {}, "loads_kwargs": {}}
_CODE_KEYS = ("__class__", "__exc_type__")  # what Prefect's JSON decoder turns into objects


def _plain(value) -> bool:
    if isinstance(value, dict):
        return not any(k in value for k in _CODE_KEYS) and all(map(_plain, value.values()))
    if isinstance(value, list):
        return all(map(_plain, value))
    return value is None or isinstance(value, (str, int, float, bool))


def plain_json_record(path: str, data: bytes) -> bytes:
    """`data` if it is a cache record of plain JSON written by Prefect's JSON serializer; else
    FileNotFoundError, which Prefect takes for a missing record (module doc)."""
    try:
        record = json.loads(data)
        ok = (record["metadata"]["serializer"] == JSON_SERIALIZER
              and _plain(json.loads(record["result"])))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        logging.getLogger(__name__).warning(
            "cache record %s is not plain JSON from Prefect's JSON serializer; ignored (the "
            "stage is computed again and the record rewritten)", path)
        raise FileNotFoundError(path)
    return data


class JsonOnlyRemoteFileSystem(RemoteFileSystem):
    """Prefect's RemoteFileSystem (S3), reading plain JSON records only (module doc)."""

    _block_type_name = "Layerprune Remote Results"
    _description = "Remote result storage that reads back plain JSON cache records only."

    def read_path(self, path: str, **calling_convention: Any) -> bytes:
        return plain_json_record(path, super().read_path(path, **calling_convention))

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)


class AtomicLocalFileSystem(WritableFileSystem):
    """Result storage in a local directory whose writes are atomic (module doc).

    A custom block implementing `WritableFileSystem`, the interface Prefect reads and writes
    results through. Prefect calls the sync methods with an extra keyword of its own calling
    convention (prefect/_internal/compatibility/blocks.py, PrefectHQ/prefect#15008); they accept
    and ignore it, being synchronous either way, and the async twins serve async callers."""

    _block_type_name = "Layerprune Local Results"
    _description = "Local result storage whose writes are atomic (temp file + rename)."

    basepath: str = Field(description="Absolute directory the records are written under.")

    def _target(self, path: str) -> Path:
        base = Path(self.basepath)
        target = (base / path).resolve()  # an absolute `path` stays itself
        if base != target and base not in target.parents:
            raise ValueError(f"{path!r} is outside of the result storage {base}")
        return target

    def read_path(self, path: str, **_calling_convention: Any) -> bytes:
        # FileNotFoundError: Prefect's miss, for an absent record or one that is not plain JSON
        return plain_json_record(path, self._target(path).read_bytes())

    def write_path(self, path: str, content: bytes, **_calling_convention: Any) -> str:
        target = self._target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic: readers see the old record or the new one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return str(target)

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)


# {(Prefect API, block type, block name, its fields): the saved block}: what this process loaded
# or saved, so that a stage call costs no request to the server for its storage.
_saved: dict[tuple, WritableFileSystem] = {}
_saved_lock = threading.Lock()


def _fields(block: WritableFileSystem) -> dict:
    """The block's own fields (pydantic's `model_fields`), what decides whether a saved block is
    the wanted one; not the identity (document id, name) a saved block also dumps."""
    return {f: getattr(block, f) for f in type(block).model_fields}


def result_storage_for(root: str) -> WritableFileSystem:
    """The saved Prefect storage block for the cache records of runs whose artifacts live under
    `root` (module doc): loaded, or saved when missing or different, on the first call for this
    root (and Prefect API) in this process; the same block on every later call, with no request.

    The memo is keyed by the API's URL and the block's fields as well as its name, so another
    server (a test harness, a profile switched in-process) or other settings (a changed S3
    client config) load or save their own. What it does not see: the block deleted or edited on
    the server while this process runs; it is saved again by the next process."""
    if is_remote(root):
        wanted: WritableFileSystem = JsonOnlyRemoteFileSystem(
            basepath=results_location(root),
            settings=storage_options_from_env(root, with_endpoint=False))
    else:
        wanted = AtomicLocalFileSystem(basepath=str(local_root(root) / RESULTS_DIR))
    name = block_name(root)
    memo = (get_current_settings().api.url, type(wanted).__name__, name,
            json.dumps(_fields(wanted), sort_keys=True, default=str))
    with _saved_lock:  # stage calls in threads: one load (and save) per memo key
        if memo not in _saved:
            _saved[memo] = _load_or_save(wanted, name)
        return _saved[memo]


def _load_or_save(wanted: WritableFileSystem, name: str) -> WritableFileSystem:
    try:
        saved = type(wanted).load(name)  # sync in sync code (Prefect's async_dispatch)
        if _fields(saved) == _fields(wanted):
            return saved
    except ValueError:  # not saved yet
        pass
    wanted.save(name, overwrite=True)
    return wanted


# --- run summaries -----------------------------------------------------------------------------
def summary_path(root: str, flow_run_id: str) -> str:
    return f"{str(root).rstrip('/')}/{RUNS_DIR}/{flow_run_id}/{SUMMARY}"


def write_run_summary(root: str, flow_run_id: str, summary: dict) -> str:
    """Store a run's summary (small JSON) where its parent can read it; atomically."""
    path = summary_path(root, str(flow_run_id))
    if not is_remote(root):
        write_json_atomic(local_root(root) / RUNS_DIR / str(flow_run_id) / SUMMARY, summary)
        return path
    # One PUT: S3 shows the whole object or nothing.
    ArtifactStore(root).fs.pipe_file(path, json.dumps(summary, indent=2).encode())
    return path


def read_run_summary(root: str, flow_run_id: str) -> dict | None:
    """The summary `write_run_summary` stored for a flow run, None if it stored none."""
    store = ArtifactStore(root)
    path = str(local_root(root) / RUNS_DIR / str(flow_run_id) / SUMMARY) \
        if store.is_local else summary_path(root, str(flow_run_id))
    try:
        with store.fs.open(path, "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
