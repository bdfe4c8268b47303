"""Route Prefect's persisted results and cache records into the artifact store of a run.

Each stage task persists its result (the stage manifest) as JSON under its cache key. For a
cache hit to work from any worker, that record must live where every worker can read it: next to
the artifacts, in `<artifacts>/prefect-results/`. The artifact root is a flow *parameter*, known
only once the run starts, so it cannot be set with `@flow(result_storage=...)`; instead
`use_artifact_store(root)`, called first thing in a flow, swaps the result store of the running
flow. Tasks inherit the flow's result store (`ResultStore.update_for_task` keeps it when a task
sets none), and the flow's own return value is written there too (`handle_success` reads the
flow run context).

- Local root: an unsaved `LocalFileSystem` (what Prefect makes of a `pathlib.Path`); results
  record absolute paths, readable by any process on that machine.
- Remote root (s3://...): a `RemoteFileSystem` block saved on the Prefect server under a name
  derived from the root, so results carry a block id and `state.result()` works in any process
  (the sweep reads its children's summaries that way). The block holds only the basepath and
  the bounded-retry client config: the endpoint and credentials come from each worker's AWS
  environment, never from the server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect.context import FlowRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

from layerprune.remote import check_reachable, is_remote, storage_options_from_env

RESULTS_DIR = "prefect-results"


def results_location(root: str) -> str:
    return f"{str(root).rstrip('/')}/{RESULTS_DIR}"


def block_name(root: str) -> str:
    """A valid block name (lowercase letters, digits, dashes) that is stable per root."""
    return "layerprune-results-" + hashlib.sha256(str(root).encode()).hexdigest()[:16]


def result_storage_for(root: str) -> WritableFileSystem:
    """The Prefect storage for results of runs whose artifacts live under `root`."""
    if not is_remote(root):
        path = Path(str(root).removeprefix("file://")).expanduser().resolve() / RESULTS_DIR
        return LocalFileSystem(basepath=str(path))  # what Prefect makes of a pathlib.Path
    wanted = RemoteFileSystem(basepath=results_location(root),
                              settings=storage_options_from_env(root, with_endpoint=False))
    name = block_name(root)
    try:
        saved = RemoteFileSystem.load(name, _sync=True)
        if saved.basepath == wanted.basepath and saved.settings == wanted.settings:
            return saved
    except ValueError:  # not saved yet
        pass
    wanted.save(name, overwrite=True, _sync=True)
    return wanted


def use_artifact_store(root: str) -> None:
    """Check that the store under `root` is reachable (one clear `StoreUnavailable` error
    otherwise), then persist this flow run's results and cache records into it."""
    check_reachable(root)
    ctx = FlowRunContext.get()
    if ctx is None:
        raise RuntimeError("use_artifact_store() must be called inside a flow run")
    ctx.result_store = ctx.result_store.model_copy(
        update={"result_storage": result_storage_for(root)})
