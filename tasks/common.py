"""What every stage task shares: content-addressed caching, artifact publishing, progress, models.

A stage task computes its artifact key from its inputs (`stage_key`). Prefect's cache key is
that same key (plus the store root, since the cached result points into one store), so Prefect
shows a rerun as Cached; and the task body itself returns the stored manifest when the stage is
complete in the store, so a rerun after a crash, or on another worker or Prefect server, redoes
only what is missing. Tasks return manifests (small JSON), never tensors.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from layerprune.config import ModelSpec
from layerprune.models import LoadedModel, load_model
from layerprune.placement import dtype_name
from layerprune.store import ArtifactStore, stage_key


def _store_tag(store_root: str) -> str:
    return hashlib.sha256(store_root.encode()).hexdigest()[:12]


def stage_task(stage: str, version: int, key_params: Callable[..., dict], **options):
    """Decorate a stage function as a Prefect task cached by the stage's content key.

    `key_params` maps (a subset of) the task's parameters to the JSON that identifies its output:
    fingerprints of models and data, keys of input stages, and the parameters that change the
    result (never batch sizes, devices or the run id). Results are persisted as JSON, not pickle,
    so a cache hit works from any process.
    """
    names = list(inspect.signature(key_params).parameters)

    def cache_key(context, parameters: dict) -> str:
        params = key_params(**{n: parameters[n] for n in names})
        return f"{stage_key(stage, version, params)}@{_store_tag(parameters['store_root'])}"

    options.setdefault("retries", 1)
    options.setdefault("retry_delay_seconds", 5)
    return task(name=stage, cache_key_fn=cache_key, persist_result=True,
                result_serializer="json", **options)


def run_stage(store_root: str, stage: str, version: int, params: dict,
              build: Callable[[Path], dict], resumable: bool = False) -> dict:
    """Return the stage's manifest, building and publishing it first if the store lacks it.

    `build(out_dir)` writes the stage's files into `out_dir` and returns small metadata.
    `resumable`: `out_dir` is the same for every attempt at this key and is kept when `build`
    fails, so a retry or rerun can pick up where the last attempt stopped.
    """
    logger = get_run_logger()
    store = ArtifactStore(store_root)
    key = stage_key(stage, version, params)
    manifest = store.manifest(stage, key)
    if manifest is not None:
        logger.info("%s/%s is complete in the store; reusing it", stage, key)
        return manifest
    work = store.scratch(f"{stage}-{key}" if resumable else None)
    try:
        started = time.time()
        meta = build(work)
        record = {"params": params, "meta": meta, "seconds": round(time.time() - started, 3)}
        manifest = store.publish(stage, key, work, record)
    except BaseException:
        if not resumable:
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    logger.info("%s/%s written in %.1fs to %s", stage, key, manifest["seconds"], manifest["uri"])
    return manifest


def stage_files(store_root: str, manifest: dict) -> Path:
    """Local directory with a completed stage's files (downloaded once if the store is remote)."""
    return ArtifactStore(store_root).local_dir(manifest["stage"], manifest["key"])


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
# (layerprune.prune.removed_layers), so ten variants cost one load. The lock serialises tasks
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
