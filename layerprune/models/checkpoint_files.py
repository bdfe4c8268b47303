"""Cheap integrity checks of model files, before anything loads: headers only, never weights.

A truncated download, a file that is not what its name says, or a directory with a config and
no weights would otherwise fail minutes into loading, with a traceback from the safetensors,
zip or GGUF reader. These read a few kilobytes per file (a GGUF file's metadata: a fraction of
a second for a 1 GB file) and raise one `LayerPruneError` that names the file and what is wrong.
`layerprune.models.loading.check_model_ref` runs them on every local model a command is given.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import struct
import zipfile
from pathlib import Path

from layerprune.errors import LayerPruneError

# What transformers loads from a checkpoint directory, in its order of preference.
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_TORCH_BIN, _TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files that hold a tokenizer's vocabulary (fast, SentencePiece, BPE, WordPiece, tiktoken): a
# tokenizer_config.json alone names a class but has no vocabulary to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")


def check_weight_files(path: Path, ref: str, require: bool = True) -> None:
    """A checkpoint directory has weights (`require`) and none is visibly truncated: headers
    only, so it costs milliseconds however large the model (a bad file would otherwise fail
    minutes into loading, with a traceback from the safetensors or zip reader)."""
    index = next((path / n for n in (_SAFETENSORS_INDEX, _TORCH_BIN_INDEX)
                  if (path / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LayerPruneError(f"model: {str(index)!r} is not a valid shard index "
                                  f"({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise LayerPruneError(f"model: {ref!r} lacks {len(missing)} weight shard(s) named "
                                  f"in {index.name}: {', '.join(missing[:3])}")
        files = [path / s for s in shards]
    elif (path / _SAFETENSORS).is_file():
        files = [path / _SAFETENSORS]
    elif (path / _TORCH_BIN).is_file():
        files = [path / _TORCH_BIN]
    elif not require:
        return
    else:
        raise LayerPruneError(f"model: {ref!r} has a config.json but no weights (expected "
                              f"{_SAFETENSORS}, {_SAFETENSORS_INDEX} with its shards, or "
                              f"{_TORCH_BIN})")
    for f in files:
        if f.name.endswith(".safetensors"):
            check_safetensors(f)
        else:
            _check_torch_file(f)


def check_safetensors(file: Path) -> None:
    """The file is a complete safetensors file: an 8-byte header length, a JSON header, and
    exactly the tensor bytes the header describes (the format the safetensors reader demands)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"only {len(head)} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes but the file has {size:,}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise LayerPruneError(f"model: {str(file)!r} is not a valid safetensors file: {e}") \
            from None
    if 8 + n + end != size:
        raise LayerPruneError(f"model: {str(file)!r} is truncated or corrupt: its header "
                              f"describes {8 + n + end:,} bytes, the file has {size:,}")


def _check_torch_file(file: Path) -> None:
    """torch.save writes a zip archive: one that starts as a zip but has no readable central
    directory (at its end) was cut short. Legacy pickle files (before torch 1.6) pass as is."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if not magic or (magic == b"PK\x03\x04" and not zipfile.is_zipfile(file)):
        raise LayerPruneError(f"model: {str(file)!r} is truncated or corrupt (an incomplete "
                              "torch checkpoint)")


# GGUF value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): struct formats of
# the scalars; 8 is a string (u64 length + bytes), 9 an array (u32 type, u64 count, items).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_keys(file: Path) -> set[str]:
    """The metadata keys of a GGUF file, after checking its structure: the magic, every key and
    tensor record, and that the tensor data the records describe lies inside the file. Reads
    the header only (no tensor data); strings are skipped, not decoded, so even a 1 GB file
    with a 150k-token vocabulary takes a fraction of a second (80 ms for Qwen2.5-1.5B), and a
    file already checked unchanged (same size and mtime) is not read again."""
    st = Path(file).stat()
    keys, problem = _gguf_check(str(Path(file).resolve()), st.st_size, st.st_mtime_ns)
    if problem:
        raise LayerPruneError(f"model: {str(file)!r} {problem}")
    return set(keys)


@functools.lru_cache(maxsize=32)
def _gguf_check(file: str, size: int, mtime_ns: int) -> tuple[frozenset[str], str | None]:
    """(keys, None) for a sound file, (empty, what is wrong with it) otherwise."""
    if size < 24:
        return frozenset(), f"is not a GGUF file ({size} bytes)"
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            return frozenset(), "is not a GGUF file (it does not start with the GGUF magic bytes)"
        try:
            return frozenset(_gguf_walk(buf, size)), None
        except struct.error:
            why = "it ends inside its header"
        except (ValueError, OverflowError) as e:
            why = str(e)
    return frozenset(), f"is a truncated or corrupt GGUF file ({why})"


def _gguf_walk(buf, size: int) -> set[str]:
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, pos)
    pos += 20
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")

    def string(pos: int) -> tuple[int, int]:  # (start of its bytes, position after it)
        (length,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + length > size:
            raise ValueError("a string runs past the end of the file")
        return pos + 8, pos + 8 + length

    def skip(kind: int, pos: int) -> int:
        if kind in _GGUF_SCALARS:
            return pos + struct.calcsize("<" + _GGUF_SCALARS[kind])
        if kind == 8:
            return string(pos)[1]
        if kind == 9:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _GGUF_SCALARS:
                return pos + count * struct.calcsize("<" + _GGUF_SCALARS[item])
            for _ in range(count):
                pos = skip(item, pos)
                if pos > size:
                    raise ValueError("an array runs past the end of the file")
            return pos
        raise ValueError(f"unknown metadata value type {kind}")

    keys, alignment = set(), 32
    for _ in range(n_kv):
        start, pos = string(pos)
        key = bytes(buf[start:pos]).decode("utf-8", "replace")
        (kind,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip(kind, pos + 4)
        keys.add(key)
    try:
        from gguf.constants import GGML_QUANT_SIZES  # (block size, bytes per block) per type
    except ImportError:  # without it transformers cannot read GGUF anyway; it will say so
        GGML_QUANT_SIZES = {}
    end = 0
    for _ in range(n_tensors):
        pos = string(pos)[1]
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        if kind in GGML_QUANT_SIZES:
            block, nbytes = GGML_QUANT_SIZES[kind]
            end = max(end, offset + math.prod(dims) // block * nbytes)
    data_start = -(-pos // max(alignment, 1)) * max(alignment, 1)
    if data_start + end > size:
        raise ValueError(f"its tensors need {data_start + end:,} bytes, the file has {size:,}")
    return keys


# --- safetensors checkpoints: which files, and what each file's header says -----------------
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def shard_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint directory, or [] when it has none."""
    if (path / INDEX_FILE).is_file():
        return sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    return [SINGLE_FILE] if (path / SINGLE_FILE).is_file() else []


def read_header(file: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, offset where tensor data starts) of a safetensors file."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size


def disk_dtype(path: Path) -> str | None:
    """The floating-point dtype of a checkpoint's tensors, or None when they mix several."""
    found = {_SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
             for name in shard_files(path) for entry in read_header(path / name)[0].values()
             if entry["dtype"].startswith(("F", "BF"))}
    return found.pop() if len(found) == 1 else None
