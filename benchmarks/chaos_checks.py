"""The checks of the chaos benchmark (benchmarks/chaos.py): is a store sound and clean, and does
a run's results table equal the undisturbed one's.

Independent of how the store publishes: it walks `<root>/<stage>/<key>/manifest.json`, asks the
store for each stage's local directory (`ArtifactStore.local_dir`, which downloads from S3) and
checks the files the manifest lists there with its own sha256, so a store whose manifests and
files disagree is caught even if the store's own reads would trust it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tasks.report import MEASURED_COLUMNS


@contextlib.contextmanager
def fresh_cache(path: Path) -> Iterator[None]:
    """Point this process's store downloads at an empty cache, so files come from the store
    and not from a copy an earlier read left; removed afterwards."""
    old = os.environ.get("LAYERPRUNE_CACHE")
    os.environ["LAYERPRUNE_CACHE"] = str(path)
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if old is None:
            del os.environ["LAYERPRUNE_CACHE"]
        else:
            os.environ["LAYERPRUNE_CACHE"] = old


def _manifests(store) -> Iterator[tuple[str, str]]:
    store.fs.invalidate_cache()  # s3fs caches listings, and the runs changed the bucket
    base = store.root.rstrip("/")
    for path in sorted(store.fs.glob(f"{base}/*/*/manifest.json")):
        stage, key = path[len(base) + 1:].split("/")[:2]
        if not stage.startswith("."):
            yield stage, key


def _file_problems(store, stage: str, key: str, manifest: dict, files: Path) -> list[str]:
    from layerprune.store.files import file_sha256

    where, problems = f"{stage}/{key}", []
    for rel, meta in manifest["files"].items():
        f = files / rel
        if not f.is_file():
            problems.append(f"{where}/{rel}: missing")
        elif f.stat().st_size != meta["bytes"]:
            problems.append(f"{where}/{rel}: {f.stat().st_size} bytes, the manifest says "
                            f"{meta['bytes']}")
        elif file_sha256(f) != meta["sha256"]:
            problems.append(f"{where}/{rel}: sha256 differs from the manifest")
    extra = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    extra -= set(manifest["files"]) | {"manifest.json"}
    if extra:
        problems.append(f"{where}: files the manifest does not list: {sorted(extra)[:5]}")
    if manifest.get("attempt"):  # attempts of losers and of killed runs must be gone
        beside = {e.rstrip("/").rsplit("/", 1)[-1]
                  for e in store.fs.ls(store.path(stage, key), detail=False)}
        beside -= {"manifest.json", manifest["attempt"]}
        if beside:
            problems.append(f"{where}: left beside the committed attempt: {sorted(beside)[:5]}")
    return problems


def inspect_store(root: str, scratch: Path, cache: Path, check_dir: Path) -> dict:
    """{problems, keys, table} of the store under `root`: what is wrong with every manifest's
    files and what is left over; the stage keys stored; the report's results table and base
    metrics. `scratch`: where the runs' stage scratch lives (`<root>/.scratch`, or the cache's
    for S3); `cache`: the runs' LAYERPRUNE_CACHE (half-finished downloads); `check_dir`: an
    empty directory for this check's own downloads."""
    import pandas as pd

    from layerprune.store.artifacts import ArtifactStore

    problems, keys, table = [], set(), None
    with fresh_cache(check_dir):
        store = ArtifactStore(root)
        for stage, key in _manifests(store):
            keys.add(f"{stage}/{key}")
            try:
                manifest = store.manifest(stage, key)
                files = store.local_dir(stage, key)
            except Exception as e:  # a damaged stage is the finding, not a crash of the check
                problems.append(f"{stage}/{key}: {type(e).__name__}: {e}")
                continue
            problems += _file_problems(store, stage, key, manifest, files)
            if stage == "report" and (files / "results.parquet").is_file():
                rows = pd.read_parquet(files / "results.parquet")
                table = {"rows": rows.sort_values(["variant", "n"]).to_dict(orient="records"),
                         "base": manifest["meta"]["base"]}
    left = sorted(p.name for p in scratch.iterdir() if p.is_dir()) if scratch.is_dir() else []
    if left:
        problems.append(f"scratch left in {scratch}: {left[:5]}")
    downloads = cache / "store"
    partial = sorted(p.name for p in downloads.glob("*/.*") if p.is_dir())
    if partial:
        problems.append(f"half downloads left in {downloads}: {partial[:5]}")
    if table is None:
        problems.append("no report with a results table in the store")
    return {"problems": problems, "keys": keys, "table": table}


def heal_resumed_from(root: str) -> list:
    """`resumed_from_step` of each heal stage in the store (None: trained from step 0)."""
    from layerprune.store.artifacts import ArtifactStore

    store = ArtifactStore(root)
    return [store.manifest(stage, key)["meta"].get("resumed_from_step")
            for stage, key in _manifests(store) if stage == "heal"]


# Measured, not computed (how long a heal took, its peak memory, the speed and memory of a
# variant and of the base model): an independent store measures its own, so they are left out
# of every comparison (rows and base); every other column must be equal.
COST_COLUMNS = MEASURED_COLUMNS


def without_columns(table: str | None, columns=COST_COLUMNS) -> str | None:
    """A printed results table (pandas `to_string`, right-aligned under its one-word column
    names) with the named columns cut out of every row above the `base model:` line."""
    if table is None:
        return None
    lines = table.split("\n")
    header = lines[0]
    spans, start = [], 0
    for name in header.split():
        end = header.index(name, start) + len(name)
        if name in columns:
            spans.append((start, end))
        start = end
    cut = []
    for line in lines:
        if not line.startswith("base model:"):
            for a, b in reversed(spans):
                line = line[:a] + line[b:]
        cut.append(line)
    return "\n".join(cut)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(reference: dict, other: dict, label: str) -> list[str]:
    """Every difference of `other` from the undisturbed `reference` (both `inspect_store`
    results): table cells, base metrics, stored stage keys.

    Exact, every column but the measured costs (COST_COLUMNS): on CPU with one thread the kernels are deterministic, healing is
    seeded and a resume restores the Trainer's RNG and data order, and the flow rounds metrics
    to 4 decimals; so any difference is a bug, not noise."""
    out = []
    ref, got = reference["table"], other["table"]
    if ref is None or got is None:
        return [f"{label}: no results table to compare"]
    if len(ref["rows"]) != len(got["rows"]):
        out.append(f"{label}: {len(got['rows'])} rows, undisturbed {len(ref['rows'])}")
    for r, g in zip(ref["rows"], got["rows"]):
        for col in sorted((set(r) | set(g)) - set(COST_COLUMNS)):
            if not _same(r.get(col), g.get(col)):
                out.append(f"{label}: {r.get('variant')} {col}: {g.get(col)!r}, "
                           f"undisturbed {r.get(col)!r}")
    for k in sorted((set(ref["base"]) | set(got["base"])) - set(COST_COLUMNS)):
        if not _same(ref["base"].get(k), got["base"].get(k)):
            out.append(f"{label}: base {k}: {got['base'].get(k)!r}, undisturbed "
                       f"{ref['base'].get(k)!r}")
    for k in sorted(reference["keys"] ^ other["keys"]):
        out.append(f"{label}: stage {k} is stored only in the "
                   + ("undisturbed" if k in reference["keys"] else label) + " store")
    return out

