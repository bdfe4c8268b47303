"""Store maintenance: `layerprune gc` (what abandoned runs left) and `layerprune verify`.

Runs clean up after themselves: the attempt that completes a key removes the other attempts
under it and the scratch that dead attempts at it left. What remains comes from runs that were
killed and never rerun: their scratch (local stores), attempt prefixes under keys that were never
completed, or under keys completed before the cleanup ran. `gc` removes those once they are older
than `--older-than`, so an attempt that is still being written (young) is never touched; a
committed artifact (a manifest and the attempt it names) is never removed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from layerprune.errors import LayerPruneError
from layerprune.store.artifacts import SCRATCH, ArtifactStore
from layerprune.store.leases import remove_abandoned
from layerprune.store.manifests import MANIFEST, ArtifactDamaged

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NOT_STAGES = {SCRATCH, "prefect-results", "runs"}  # top-level entries that hold no stage keys


def parse_age(text: str, name: str = "older_than") -> float:
    """'7d', '12h', '30m', '45s', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text))
    if not m:
        raise LayerPruneError(f"{name}: {text!r} is not an age; use a number and a unit of "
                              "s, m, h, d or w, e.g. 7d or 12h")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    kept_young: int = 0  # abandoned-looking entries younger than the limit

    def summary(self, dry_run: bool) -> str:
        verb = "would remove" if dry_run else "removed"
        return f"{verb} {len(self.removed)} abandoned entries; kept {self.kept_young} younger " \
               "than the limit"


def _stage_keys(store: ArtifactStore):
    """(stage, key) of every key directory in the store."""
    for stage_dir in store.fs.ls(store.root, detail=False):
        stage = stage_dir.rstrip("/").rsplit("/", 1)[-1]
        if stage in NOT_STAGES or stage.startswith(".") or not store.fs.isdir(stage_dir):
            continue
        for key_dir in store.fs.ls(stage_dir, detail=False):
            if store.fs.isdir(key_dir):
                yield stage, key_dir.rstrip("/").rsplit("/", 1)[-1]


def _newest_mtime(store: ArtifactStore, path: str) -> float:
    """Seconds since the epoch of the newest file under `path` (0 if none)."""
    newest = 0.0
    for info in store.fs.find(path, detail=True).values():
        t = info.get("mtime") or info.get("LastModified") or info.get("created")
        if t is not None:
            newest = max(newest, t.timestamp() if hasattr(t, "timestamp") else float(t))
    return newest


def collect_garbage(root: str, older_than_s: float, dry_run: bool = False) -> GcReport:
    """Remove what abandoned runs left in the store under `root`, older than `older_than_s`."""
    store = ArtifactStore(root)
    report = GcReport()
    now = time.time()
    if store.is_local and not dry_run:
        report.removed += [str(p) for p in
                           remove_abandoned(store.scratch_base(), older_than_s=older_than_s)]
    for stage, key in list(_stage_keys(store)):
        try:
            manifest = store.manifest(stage, key)
        except ArtifactDamaged:
            manifest = None  # unreadable: its attempts are as good as abandoned
        keep = manifest.get("attempt") if manifest else None
        for entry in store.fs.ls(store.path(stage, key), detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name == MANIFEST or name == keep or not store.fs.isdir(entry):
                continue
            if manifest is not None and "attempt" not in manifest:
                continue  # written before attempts existed: its files sit in subfolders too
            if now - _newest_mtime(store, entry) < older_than_s:
                report.kept_young += 1
                continue
            report.removed.append(store.fs.unstrip_protocol(entry) if not store.is_local
                                  else entry)
            if not dry_run:
                store.fs.rm(entry, recursive=True)
    return report


def verify_store(root: str, repair: bool = False) -> dict[str, list[str]]:
    """Every committed artifact whose files are missing or differ from its manifest (all
    checksums on a local store, sizes on a remote one); with `repair`, retract them so that
    the next run computes them again."""
    store = ArtifactStore(root)
    damaged: dict[str, list[str]] = {}
    for stage, key in list(_stage_keys(store)):
        try:
            manifest = store.manifest(stage, key)
        except ArtifactDamaged as e:
            damaged[f"{stage}/{key}"] = [str(e)]
            if repair:
                store.discard_manifest(stage, key)
            continue
        if manifest is None:
            continue
        problems = store.verify(manifest, full=True)
        if problems:
            damaged[f"{stage}/{key}"] = problems
            if repair:
                store.retract(manifest)
    return damaged
