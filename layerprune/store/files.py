"""Atomic writes: a reader sees the old file or the whole new one, never half of one.

Every stage writes its outputs into a temporary sibling directory and renames it into place at the
end, so a crash leaves no directory that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from layerprune.errors import LayerPruneError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
CACHE_ENV = "LAYERPRUNE_CACHE"


def cache_dir() -> Path:
    """This machine's cache: bundled assets, downloaded stage files, remote stores' scratch."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "layerprune"))


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk or an exceeded quota.
    Libraries that write in native code wrap the OS error in their own type and keep only its
    text (safetensors: "No space left on device (os error 28)"), so the text counts too."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_at(path: str | os.PathLike, below: int = 1 << 20) -> bool:
    """Whether the filesystem that holds `path` (or its nearest existing parent) has less
    than `below` bytes free. For writers that hide the errno (torch's zip writer says
    "iostream error" or "unexpected pos"): a write that failed on a full filesystem."""
    for existing in (Path(path), *Path(path).parents):
        if existing.exists():
            return shutil.disk_usage(existing).free < below
    return False


class NoSpaceLeft(LayerPruneError):
    """A write failed because the disk (or quota) is full; `path` is what was being written."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise NoSpaceLeft(f"no space left on device writing {str(path)!r}", path) from e
        raise


def check_output_dir(out: str | os.PathLike, name: str = "out") -> None:
    """Fail before any work when `out` cannot become a directory: it, or the nearest of its
    parents that exists, is a file (otherwise the model would load and compute, then the write
    would fail)."""
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
def atomic_output_dir(out: str | os.PathLike, name: str = "out"):
    """Yield a temporary directory that becomes `out` only if the block finishes.

    Files already in `out` that the block does not rewrite are kept (a rerun into the same
    directory updates it); on error the temporary directory is removed, and so are the parents
    of `out` this call created, so `out` and its surroundings are as they were. A full disk
    becomes one `NoSpaceLeft` error naming `name` (the parameter that chose `out`) and the file.
    """
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
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
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # deepest first; one another process filled stays
            with contextlib.suppress(OSError):
                parent.rmdir()
        if is_disk_full(e):
            raise NoSpaceLeft(f"{name}: no space left on device writing "
                              f"{str(_written(e, tmp, out))!r}", out) from e
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _written(exc: BaseException, tmp: Path | None, out: Path) -> Path:
    """The file under `out` that a failed write was writing, when the error says; else `out`."""
    target = getattr(exc, "path", None) or getattr(exc, "filename", None)
    if target and tmp is not None:
        with contextlib.suppress(ValueError):
            return out / Path(target).relative_to(tmp)
    return out


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
