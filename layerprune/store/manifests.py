"""What a stage's manifest is: its key (`stage_key`), what it records (`library_versions`), and
how the files it lists are checked against it (sizes always; sha256 of small files, or of all).

The manifest (`<root>/<stage>/<key>/manifest.json`) is the store's commit point and its only
cache: a stage is complete when its manifest exists and its files match it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from layerprune.store.files import file_sha256

MANIFEST = "manifest.json"
# Files up to this size are checksummed on every local read (configs, metrics, curves: a few ms);
# larger ones (tensors, checkpoints) have their size checked, and their sha256 with --verify.
SMALL_FILE = 1 << 20


def stage_key(stage: str, version: int, params: dict) -> str:
    """Content address of one stage's output: stable JSON of (stage, version, params) hashed."""
    blob = json.dumps({"stage": stage, "version": version, "params": params},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def library_versions() -> dict:
    import torch
    import transformers

    from layerprune import __version__

    return {"layerprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


class ArtifactDamaged(OSError):
    """A stored file does not match its manifest."""


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def size_problem(rel: str, size: int | None, expected: int) -> str | None:
    if size is None:
        return f"{rel}: missing"
    if size != expected:
        return f"{rel}: {size} bytes, manifest says {expected}"
    return None


def local_problems(base: Path, manifest: dict, full: bool = False) -> list[str]:
    """The files of `manifest` under the local directory `base` (in a local store, or a
    download in the cache): sizes always, sha256 of files up to SMALL_FILE bytes (all with
    `full`)."""
    problems = []
    for rel, meta in manifest["files"].items():
        p = base / rel
        problem = size_problem(rel, p.stat().st_size if p.is_file() else None, meta["bytes"])
        if problem is None and (full or meta["bytes"] <= SMALL_FILE) \
                and file_sha256(p) != meta["sha256"]:
            problem = f"{rel}: sha256 differs from the manifest"
        if problem:
            problems.append(problem)
    return problems
