"""Atomic writes: a reader sees the old file or the whole new one, never half of one.

Every stage writes its outputs into a temporary sibling directory and renames it into place at the
end, so a crash leaves no directory that looks finished.
"""

from __future__ import annotations

import contextlib
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
