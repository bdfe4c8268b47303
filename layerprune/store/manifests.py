"""What a stage's manifest is: its key (`stage_key`), what it records (`library_versions`), and
how the files it lists are checked against it (sizes always; sha256 of small files, or of all).

The manifest (`<root>/<stage>/<key>/manifest.json`) is the store's commit point and its only
cache: a stage is complete when its manifest exists and its files match it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

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


# What `leases.new_id` makes: UTC time, a process id, 6 hex digits. A manifest's `attempt` becomes a
# path (the prefix of its files, deleted on retract), so nothing else is accepted.
ATTEMPT_ID = re.compile(r"^\d{8}T\d{6}-\d{1,10}-[0-9a-f]{6}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def safe_relative(name: object) -> bool:
    """Whether `name` is a plain relative POSIX path under its directory: not empty, not
    absolute, no `..`, `.` or empty component, no backslash or NUL (which other systems or
    libraries read as separators or terminators)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return (not name.startswith("/") and bool(parts) and "/".join(parts) == name
            and all(part not in (".", "..") for part in parts))


def manifest_problems(manifest: object, stage: str, key: str) -> list[str]:
    """What makes a parsed manifest unusable for `stage/key`, before any of its names becomes a
    path: it must name that very stage and key, its attempt must be an attempt id (or absent:
    manifests written before attempts existed), and every file a safe relative name with an
    integer size and a sha256. A store's contents are data: a hostile manifest is damage."""
    if not isinstance(manifest, dict):
        return ["not a JSON object"]
    problems = []
    if manifest.get("stage") != stage or manifest.get("key") != key:
        problems.append(f"names stage/key {manifest.get('stage')!r}/{manifest.get('key')!r}, "
                        f"not {stage}/{key}")
    attempt = manifest.get("attempt")
    if attempt is not None and not (isinstance(attempt, str) and ATTEMPT_ID.match(attempt)):
        problems.append(f"attempt {attempt!r} is not an attempt id")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return problems + ["'files' is not a mapping of names to sizes and checksums"]
    for name, meta in files.items():
        if not safe_relative(name):
            problems.append(f"file name {name!r} is not a relative path inside the artifact")
        elif not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int)
                  and not isinstance(meta.get("bytes"), bool) and meta["bytes"] >= 0
                  and isinstance(meta.get("sha256"), str) and SHA256.match(meta["sha256"])):
            problems.append(f"file {name!r}: needs an integer 'bytes' and a sha256")
    return problems


def inside(base: Path, name: str) -> Path | None:
    """`base/name` if, symlinks resolved, it stays inside `base`; None if it leads out."""
    path = base / name
    try:
        path.resolve().relative_to(base.resolve())
    except ValueError:
        return None
    return path


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
        p = inside(base, rel)
        if p is None:
            problems.append(f"{rel}: leads outside the artifact")
            continue
        problem = size_problem(rel, p.stat().st_size if p.is_file() else None, meta["bytes"])
        if problem is None and (full or meta["bytes"] <= SMALL_FILE) \
                and file_sha256(p) != meta["sha256"]:
            problem = f"{rel}: sha256 differs from the manifest"
        if problem:
            problems.append(problem)
    return problems
