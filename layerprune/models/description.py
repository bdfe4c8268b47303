"""What describes a model (its config, its number of decoder layers, its tokenizer), read once
per process and handed on: the one owner of that memory.

transformers parses a GGUF file whole each time AutoConfig or AutoTokenizer is pointed at it
(about 4 s for the 98 MB SmolLM2 demo file on 2 cores; minutes for a large model), and one
command asks for the config in several checks (architecture, context, memory plan) before it
loads. `layerprune.models.loading` reads every such thing through `remember`, keyed by where
the model is, what its files are now (`stamp`), the revision and trust_remote_code: a rewritten
model is a new key and is read again. The values are mutable objects (pruning edits a config,
callers set a tokenizer's padding side): callers hand out deep copies, never what is kept here.

A GGUF file's config and tokenizer are also kept on disk (`kept_on_disk`): converted once to a
standard config.json and tokenizer files in the layerprune cache, keyed by the file's location,
size, modification time and inode, so the next process reads a few small files instead of
parsing the whole GGUF twice (about 10 s for the 98 MB demo file on 2 cores, a minute for a
1 GB one). A rewritten file is a new key; a damaged or unreadable cache entry is read again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TypeVar

from layerprune.models.assets import resolve_ref
from layerprune.models.gguf import is_gguf
from layerprune.store.files import atomic_output_dir, cache_dir

T = TypeVar("T")

# Entries kept per process, least recently used dropped first. A flow or a sweep meets a few
# models (the base, pruned children, teachers) each with a config, a layer count and a tokenizer
# (a 150k-token tokenizer holds tens of MB), so 24 entries is eight models' worth.
MAX_ENTRIES = 24

# Files whose bytes are hashed into the stamp (config, tokenizer, chat template: kilobytes to a
# few MB, hashed in milliseconds), so that a file rewritten in place within one tick of the
# file system's clock, at the same size, is still seen as changed. Weights (any size) and other
# large files are stamped by size, modification time and inode instead: hashing gigabytes on
# every check would cost more than the parse it saves.
_HASHED_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")

_memo: OrderedDict[tuple, object] = OrderedDict()


def source(ref: str, revision: str | None, trust_remote_code: bool) -> tuple[str, dict]:
    """(path or id, from_pretrained kwargs) that name the files of `ref` for any Auto* class."""
    ref = resolve_ref(ref)
    if is_gguf(ref):
        p = Path(ref)
        return str(p.parent), {"gguf_file": p.name}
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if revision is not None and not Path(ref).exists():
        kwargs["revision"] = revision
    return ref, kwargs


def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    if st.st_size <= _HASHED_BYTES and not path.name.endswith(_WEIGHT_SUFFIXES):
        return path.name, hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return path.name, st.st_size, st.st_mtime_ns, st.st_ino


def stamp(ref: str) -> tuple:
    """What `ref` is now: its resolved location and, for a local file or directory, each file's
    stamp (`_file_stamp`). A hub id is its name: the revision, part of every key, pins it."""
    path = Path(resolve_ref(ref))
    if path.is_file():
        return str(path.resolve()), _file_stamp(path)
    if path.is_dir():
        return str(path.resolve()), tuple(sorted(_file_stamp(p) for p in path.iterdir()
                                                 if p.is_file()))
    return (ref,)


def remember(what: str, ref: str, revision: str | None, trust_remote_code: bool,
             read: Callable[[], T]) -> T:
    """`read()` the first time `what` of this model (as it is now) is asked for in this process,
    the kept value after that. Nothing is kept when `read` raises. An entry for the same model
    at an older stamp is dropped: that version of the files is gone."""
    where = stamp(ref)
    key = (what, where, revision, bool(trust_remote_code))
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]  # type: ignore[return-value]
    value = read()
    for old in [k for k in _memo if k[0] == what and k[1][0] == where[0] and k[2:] == key[2:]]:
        del _memo[old]
    _memo[key] = value
    while len(_memo) > MAX_ENTRIES:
        _memo.popitem(last=False)
    return value


GGUF_CACHE = "gguf-descriptions"  # under store.files.cache_dir()


def gguf_cache_dir(ref: str) -> Path | None:
    """Where what is converted from the local GGUF file `ref` is kept between processes; None
    for anything that is not a local GGUF file."""
    path = Path(resolve_ref(ref))
    if not (is_gguf(str(path)) and path.is_file()):
        return None
    st = path.stat()
    stamp_text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return cache_dir() / GGUF_CACHE / hashlib.sha256(stamp_text.encode()).hexdigest()[:24]


def kept_on_disk(part: str, ref: str, read: Callable[[], T], save: Callable[[T, Path], None],
                 load: Callable[[Path], T]) -> T:
    """`read()` for anything but a local GGUF file. For one: `load` it from the cache when a
    previous process kept it there, else `read()` it and `save` it there (atomically: a reader
    finds a whole entry or none; a cache that cannot be written costs only the next parse)."""
    base = gguf_cache_dir(ref)
    if base is None:
        return read()
    target = base / part
    if target.is_dir():
        try:
            return load(target)
        except (OSError, ValueError, KeyError, TypeError):  # damaged: read it again below
            pass
    value = read()
    try:
        with atomic_output_dir(target) as tmp:
            save(value, tmp)
    except OSError:
        pass
    return value


def forget() -> None:
    """Drop everything remembered (tests; a process that rewrites a model it already read is
    already covered by the stamp)."""
    _memo.clear()
