"""Atomic writes: a reader sees the old file or the whole new one, never half of one.

Every stage writes its outputs into a temporary sibling directory and renames it into place at the
end, so a crash leaves no directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(out: str | os.PathLike, name: str = "out") -> None:
    """Fail before any work when `out` cannot become a directory: it, or the nearest of its
    parents that exists, is a file (otherwise the model would load and compute, then the write
    would fail)."""
    from layerprune.errors import LayerPruneError

    path = Path(out)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise LayerPruneError(f"{name}: {str(path)!r} cannot be a directory: "
                                      f"{str(existing)!r} is a file")
            return


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike):
    """Yield a temporary directory that becomes `out` only if the block finishes.

    Files already in `out` that the block does not rewrite are kept (a rerun into the same
    directory updates it); on error the temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if out.exists():
            for item in tmp.iterdir():
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime): model weights are hashed
    once per process however many stages ask for the model's fingerprint."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def files_hash(root: Path, files: list[Path]) -> str:
    """Content hash of `files` (under directory `root`, named relative to it; or `root` itself
    when it is a file): where the files live does not change it."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() if root.is_dir() else b"")
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:32]
