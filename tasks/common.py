"""What every stage task shares: content-addressed caching, artifact publishing, progress, models.

A stage task computes its artifact key from its inputs (`stage_key`). Prefect's cache key is
that same key (plus the store root), so Prefect shows a rerun as Cached; the task's result (the
stage manifest, JSON) is persisted in the run's artifact store (`result_storage_for`), so a
cache hit works from any worker. The store stays the source of truth:

- before a stage task is called, its artifact is checked in the store (sizes always, checksums of
  small files, of all files with `verify`); a missing or damaged artifact makes Prefect ignore
  its cache record (`refresh_cache`), so the stage is recomputed with a warning, never a failed
  run. `refresh` names stages to recompute regardless (`stage_policy`), and with them every
  stage that reads their measured results unkeyed (a stage task's `reads_measured`);
- one stage call checks the stored artifact once: the verdict reached before Prefect's cache
  lookup is handed to the task body (`run_stage`), which runs when Prefect's cache misses;
- the task body returns the stored manifest when the stage is complete, so a rerun after a
  crash, or on another worker or Prefect server, redoes only what is missing;
- publishing is safe under concurrency (layerprune.store.artifacts) and every attempt works in leased
  scratch (layerprune.store.leases) that the run completing the key clears, with what killed attempts
  left. Tasks return manifests (small JSON), never tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from layerprune.config import ModelSpec
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.placement import dtype_name
from layerprune.store.artifacts import ArtifactStore
from layerprune.store.leases import LeaseNotTaken
from layerprune.store.manifests import ArtifactDamaged, stage_key
from tasks.results import result_storage_for


@dataclass(frozen=True)
class StagePolicy:
    refresh: frozenset[str] = frozenset()  # stages to recompute even when stored
    verify: bool = False  # checksum every file of a reused artifact, not only small ones


_policy: contextvars.ContextVar[StagePolicy] = contextvars.ContextVar(
    "stage_policy", default=StagePolicy())


# {stage: the stages that read its measured results}, from each stage task's `reads_measured`.
_readers: dict[str, set[str]] = {}


def refreshed(stages: Iterable[str]) -> frozenset[str]:
    """`stages` and every stage that reads a measured result of one of them, transitively.

    A measured result (a timing, a peak memory) differs between two computations of one key, so
    a stage that reads it leaves it out of its own key (or the same inputs would give two keys);
    computing the measuring stage again must then compute its readers again too, or they would
    go on showing the old measurement under the same key. Readers are the stage tasks imported
    so far (a stage that runs is imported)."""
    found, todo = set(), list(stages)
    while todo:
        stage = todo.pop()
        if stage not in found:
            found.add(stage)
            todo.extend(_readers.get(stage, ()))
    return frozenset(found)


@contextlib.contextmanager
def stage_policy(refresh: Iterable[str] = (), verify: bool = False) -> Iterator[None]:
    """Within the block (a flow run; task runs inherit it), recompute the stages in `refresh`
    and their readers (`refreshed`), and fully verify reused artifacts if `verify`."""
    token = _policy.set(StagePolicy(refreshed(refresh), verify))
    try:
        yield
    finally:
        _policy.reset(token)


# What StageTask.__call__ found in the store for the call in progress, {(store_root, stage, key):
# reusable manifest or None}, for that call's task body: when Prefect's cache misses although the
# store holds the stage (its cache records were deleted, or written for another spelling of the
# root), `run_stage` takes this verdict instead of reading and verifying the manifest again.
# Python's context variables, which Prefect's task runs inherit (as they do `_policy`).
_checked: contextvars.ContextVar[dict | None] = contextvars.ContextVar("stage_checked",
                                                                      default=None)
_UNCHECKED = object()


def _store_tag(store_root: str) -> str:
    return hashlib.sha256(store_root.encode()).hexdigest()[:12]


class StageTask:
    """A stage function as a Prefect task, called with its store's result storage and with its
    cache record ignored when the store's copy is missing or damaged (see the module doc)."""

    def __init__(self, fn: Callable, stage: str, version: int, key_params: Callable[..., dict],
                 options: dict, reads_measured: Iterable[str] = ()):
        self.stage, self.version, self.key_params = stage, version, key_params
        self.reads_measured = frozenset(reads_measured)
        for measured in self.reads_measured:
            _readers.setdefault(measured, set()).add(stage)
        self._names = list(inspect.signature(key_params).parameters)
        self._signature = inspect.signature(fn)

        def cache_key(context, parameters: dict) -> str:
            return f"{self.key(parameters)}@{_store_tag(parameters['store_root'])}"

        options.setdefault("retries", 1)
        options.setdefault("retry_delay_seconds", 5)
        self.task = task(fn, name=stage, cache_key_fn=cache_key, persist_result=True,
                         result_serializer="json", **options)
        self.fn = fn  # the undecorated body, e.g. for tests
        functools.update_wrapper(self, fn)

    def key(self, parameters: dict) -> str:
        params = self.key_params(**{n: parameters[n] for n in self._names})
        return stage_key(self.stage, self.version, params)

    def __call__(self, *args, **kwargs):
        # Prefect's own call options (return_state, wait_for) are not the stage's parameters.
        call_options = {k: kwargs.pop(k) for k in ("return_state", "wait_for") if k in kwargs}
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        root = bound.arguments["store_root"]
        key = self.key(bound.arguments)
        checked = {}
        if self.stage in _policy.get().refresh:
            refresh = True
        else:
            checked[(root, self.stage, key)] = reusable_manifest(ArtifactStore(root), self.stage,
                                                                 key)
            refresh = checked[(root, self.stage, key)] is None
        token = _checked.set(checked)
        try:
            return self.task.with_options(result_storage=result_storage_for(root),
                                          refresh_cache=refresh)(*args, **kwargs, **call_options)
        finally:
            _checked.reset(token)


def stage_task(stage: str, version: int, key_params: Callable[..., dict], *,
               reads_measured: Iterable[str] = (), **options):
    """Decorate a stage function as a Prefect task cached by the stage's content key.

    `key_params` maps (a subset of) the task's parameters to the JSON that identifies its output:
    fingerprints of models and data, keys of input stages, and the parameters that change the
    result (never batch sizes, devices or the run id). Results are persisted as JSON, not pickle,
    so a cache hit works from any process. `reads_measured`: the stages whose measured results
    (timings, memory) this stage reads and leaves out of its key; refreshing one of them
    refreshes this stage too (`refreshed`). `options`: Prefect's task options.
    """
    return lambda fn: StageTask(fn, stage, version, key_params, dict(options), reads_measured)


def reusable_manifest(store: ArtifactStore, stage: str, key: str) -> dict | None:
    """The stage's manifest if it is complete and its files are sound; a damaged one is
    retracted (with a warning) so that the stage is computed again."""
    for _ in range(3):  # a retracted key may meanwhile be committed by a concurrent run
        try:
            manifest = store.manifest(stage, key)
        except ArtifactDamaged as e:
            _warn(f"{stage}/{key}: {e}; computing it again")
            store.discard_manifest(stage, key)
            continue
        if manifest is None:
            return None
        problems = store.verify(manifest, full=_policy.get().verify)
        if not problems:
            return manifest
        _warn(f"{stage}/{key} in the store is damaged ({'; '.join(problems[:3])}); "
              "computing it again")
        store.retract(manifest)
    return None


def _warn(message: str) -> None:
    try:
        get_run_logger().warning(message)
    except Exception:  # outside a run (no run context): the standard logger
        import logging

        logging.getLogger("layerprune").warning(message)


def run_stage(store_root: str, stage: str, version: int, params: dict,
              build: Callable[[Path], dict], resumable: bool = False) -> dict:
    """Return the stage's manifest, building and publishing it first if the store lacks it.

    `build(out_dir)` writes the stage's files into `out_dir` (its parent is free for side
    files) and returns small metadata. `resumable`: `out_dir` is the same for every attempt at
    this key and is kept when `build` fails, so a retry or rerun picks up where the last attempt
    stopped; one live attempt owns it at a time, others wait for it and adopt its result.
    """
    logger = get_run_logger()
    store = ArtifactStore(store_root)
    key = stage_key(stage, version, params)
    refresh = stage in _policy.get().refresh
    # The verdict of this call's StageTask, reached a moment ago (taken once: a retry checks
    # again); a body run without it (e.g. `.fn`) checks the store itself.
    checked = (_checked.get() or {}).pop((store_root, stage, key), _UNCHECKED)
    if refresh:
        manifest = None
    elif checked is _UNCHECKED:
        manifest = reusable_manifest(store, stage, key)
    else:
        manifest = checked
    if manifest is not None:
        logger.info("%s/%s is complete in the store; reusing it", stage, key)
        store.remove_abandoned_scratch(key)
        return manifest

    def wait(holder: str) -> bool:  # another live attempt owns the resumable work: wait
        logger.info("%s/%s is being computed by process %s; waiting for it", stage, key, holder)
        return store.manifest(stage, key) is not None

    try:
        with store.attempt(stage, key, resumable, wait=wait) as work:
            # The previous owner may have completed the key while this attempt waited.
            manifest = None if refresh else reusable_manifest(store, stage, key)
            if manifest is None:
                started = time.time()
                meta = build(work)
                record = {"params": params, "meta": meta,
                          "seconds": round(time.time() - started, 3)}
                manifest = store.publish(stage, key, work, record, replace=refresh)
                logger.info("%s/%s written in %.1fs to %s", stage, key, manifest["seconds"],
                            manifest["uri"])
    except LeaseNotTaken:
        manifest = store.manifest(stage, key)
    store.remove_abandoned_scratch(key)
    return manifest


def stage_files(store_root: str, manifest: dict) -> Path:
    """Local directory with a completed stage's files (downloaded once if the store is remote)."""
    store = ArtifactStore(store_root)
    try:
        return store.local_dir(manifest["stage"], manifest["key"])
    except ArtifactDamaged as e:  # retracted, so that the next run computes it again
        current = store.manifest(manifest["stage"], manifest["key"])
        if current is not None:
            store.retract(current)
        raise ArtifactDamaged(f"{e}; retracted: rerun to compute it again") from e


def progress_reporter(description: str, every_s: float = 2.0) -> Callable[[int, int], None]:
    """A callback for the library's progress hooks that drives a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / total)

    return update


# One model in memory per process: every variant of it is a view with layers removed
# (layerprune.method.prune.removed_layers), so ten variants cost one load. The lock serialises tasks
# that change the model's layer list.
_model_lock = threading.RLock()
_model_cache: dict[tuple, LoadedModel] = {}


def model_in_memory(spec: ModelSpec) -> LoadedModel:
    key = spec.model_dump_json()
    if key not in _model_cache:
        release_model()
        _model_cache[key] = load_model(spec.ref, **spec.load_options())
    return _model_cache[key]


def release_model() -> None:
    """Drop the model held in memory (and its GPU memory), e.g. before healing trains another."""
    import gc

    import torch

    with _model_lock:
        _model_cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def numerics_key(model: ModelSpec) -> dict:
    """What of a model's placement changes its results, for cache keys: the concrete dtype
    (`auto` resolved on this machine) and the quantization when there is one. The device,
    device_map and offloading only move the same computation, so they are not keyed."""
    key = {"dtype": dtype_name(model.dtype, model.device)}
    if model.quantization != "none":
        key["quantization"] = model.quantization
    return key


def model_lock() -> threading.RLock:
    return _model_lock
