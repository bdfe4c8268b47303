"""What a flow run may ask of the worker it runs on, checked before any model or data loads.

Whoever can call the Prefect API can start runs with any parameters, and two kinds reach the
worker's host: `model.trust_remote_code` runs Python that ships with a hub model, and a local
path reads whatever the worker's user can read. The worker's own environment decides, never a
run's parameters or job variables (the pool templates refuse these names in `env`):
- `LAYERPRUNE_ALLOW_REMOTE_CODE=1`: runs may set trust_remote_code (default: refused);
- `LAYERPRUNE_ALLOWED_ROOTS=/data:/models` (os.pathsep-separated): every local path in a run's
  parameters must lie under one of them, symlinks resolved (default, unset: any path).
The CLI is its user's own process: its explicit `--trust-remote-code` flag is not checked here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from layerprune.errors import LayerPruneError

REMOTE_CODE_ENV = "LAYERPRUNE_ALLOW_REMOTE_CODE"
ALLOWED_ROOTS_ENV = "LAYERPRUNE_ALLOWED_ROOTS"


def _refs(params) -> Iterator[tuple[str, str]]:
    """(parameter, value) of every model or data reference in a run's parameters
    (PruneAndHealParams, SweepParams, or a heal-variant's specs)."""
    model = getattr(params, "model", None)
    if model is not None:
        yield "model.ref", model.ref
    for i, ref in enumerate(getattr(params, "models", None) or []):
        yield f"models.{i}", ref
    for stage in ("calibration", "loss", "heal"):
        spec = getattr(params, stage, None)
        if spec is not None:
            yield f"{stage}.data", spec.data
    heal = getattr(params, "heal", None)
    if heal is not None and heal.teacher:
        yield "heal.teacher", heal.teacher
    artifacts = getattr(params, "artifacts", None)
    if artifacts:
        yield "artifacts", artifacts.removeprefix("file://")


def local_path(value: str) -> Path | None:
    """`value` as a local path, or None for a bundled asset, a URL (s3://...) or a hub id
    ("org/name", which does not exist here)."""
    if value.startswith("bundled:") or "://" in value:
        return None
    path = Path(value).expanduser()
    return path if value.startswith(("/", ".", "~")) or path.exists() else None


def check_for_worker(params, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, naming the parameter and the worker's variable, what this worker does not allow:
    remote code without its consent, a local path outside its allowed roots."""
    model = getattr(params, "model", None)
    if model is not None and model.trust_remote_code and environ.get(REMOTE_CODE_ENV) != "1":
        raise LayerPruneError(
            f"model.trust_remote_code: this worker does not run a model's own code for a flow "
            f"run; its operator allows it by starting the worker with {REMOTE_CODE_ENV}=1 "
            "(the CLI's --trust-remote-code is for your own machine)")
    roots_text = environ.get(ALLOWED_ROOTS_ENV, "").strip()
    if not roots_text:
        return
    roots = [Path(r).expanduser().resolve() for r in roots_text.split(os.pathsep) if r]
    for name, value in _refs(params):
        path = local_path(value)
        if path is None:
            continue
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise LayerPruneError(
                f"{name}: {value!r} is outside the local paths this worker allows "
                f"({ALLOWED_ROOTS_ENV}={roots_text}); use a path under one of them, a bundled: "
                "asset, a hub id or s3://")
