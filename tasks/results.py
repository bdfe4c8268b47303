"""Where Prefect's task results (cache records) and each run's summary live: in the artifact store.

Cache records. Each stage task persists its result (the stage manifest, JSON) under its cache key,
and a cache hit must work from any worker, so the records live next to the artifacts, in
`<artifacts>/prefect-results/`. The artifact root is a flow *parameter*, so a stage task is
given its storage per call (`Task.with_options(result_storage=result_storage_for(root))`, in
tasks.common.StageTask). Prefect takes a `pathlib.Path` or a *saved* block there (an unsaved block
is refused with a TypeError), so each root gets a block saved under a name derived from it:

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
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect.filesystems import RemoteFileSystem, WritableFileSystem
from pydantic import Field

from layerprune.store.files import write_json_atomic
from layerprune.store.remote import is_remote, storage_options_from_env
from layerprune.store.artifacts import ArtifactStore

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
        return self._target(path).read_bytes()  # FileNotFoundError: Prefect's miss

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


def result_storage_for(root: str) -> WritableFileSystem:
    """The saved Prefect storage block for the cache records of runs whose artifacts live under
    `root` (module doc); saved on first use, reused after."""
    if is_remote(root):
        wanted: WritableFileSystem = RemoteFileSystem(
            basepath=results_location(root),
            settings=storage_options_from_env(root, with_endpoint=False))
    else:
        wanted = AtomicLocalFileSystem(basepath=str(local_root(root) / RESULTS_DIR))
    name = block_name(root)
    try:
        saved = type(wanted).load(name)  # sync in sync code (Prefect's async_dispatch)
        if saved.model_dump() == wanted.model_dump():
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
