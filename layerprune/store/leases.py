"""Leases: a working directory owned by one live process at a time, lost when its owner dies.

A lease on `<dir>` is an exclusive `flock` on the file `<dir>.lock`. The kernel drops it when
the owning process exits for any reason, SIGKILL included, so a dead owner never holds one:
there is no expiry to tune and no heartbeat to miss, and a resumable stage (healing) can be
taken over the moment its previous owner is gone, never while it lives. flock coordinates the
processes of one machine; every directory leased here is local scratch (the store's `.scratch`
for a local store, the cache dir for a remote one), so two machines never share one.

What is leased: each attempt at a stage (`<stage>-<key>-<id>`, or `<stage>-<key>` for resumable
stages), and each download into the cache. Whatever has no live owner is abandoned: the run
that completes a key removes its abandoned scratch (`remove_abandoned`), and `layerprune gc`
removes the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"


class Lease:
    """An exclusive, non-blocking flock on `<path>.lock`; `release()` or process exit frees it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = Path(f"{path}{LOCK_SUFFIX}")
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people: who holds it
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def holder(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "?"
        except OSError:
            return "?"


def new_id() -> str:
    """A unique, sortable attempt id: UTC time, process id and randomness."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def leased_dir(base: Path, name: str, wait: Callable[[str], bool] | None = None,
               poll_s: float = 2.0) -> Iterator[Path]:
    """Hold the lease on `base/name` (created if missing) for the duration of the block.

    If another live process holds it, `wait(holder)` is called every `poll_s` seconds: it
    returns True to stop waiting (the block is then skipped by raising `LeaseNotTaken`), False to
    keep waiting. Without `wait`, a held lease raises `LeaseNotTaken` at once.
    """
    base.mkdir(parents=True, exist_ok=True)
    lease = Lease(base / name)
    while not lease.try_acquire():
        if wait is None or wait(lease.holder()):
            raise LeaseNotTaken(f"{base / name} is held by process {lease.holder()}")
        time.sleep(poll_s)
    try:
        (base / name).mkdir(exist_ok=True)
        yield base / name
    finally:
        lease.release()


class LeaseNotTaken(RuntimeError):
    """Another live process holds the lease."""


def remove_abandoned(base: Path, match: str = "", older_than_s: float = 0.0) -> list[Path]:
    """Remove the directories of `base` whose names contain `match`, that no live process
    holds, and that were last modified more than `older_than_s` ago; their paths."""
    removed = []
    if not base.is_dir():
        return removed
    now = time.time()
    for entry in sorted(base.iterdir()):
        if match not in entry.name:
            continue
        if entry.name.endswith(LOCK_SUFFIX):  # a lock whose directory is gone
            owned = Path(str(entry)[:-len(LOCK_SUFFIX)])
            lease = Lease(owned)
            if not owned.exists() and lease.try_acquire():
                entry.unlink(missing_ok=True)
                lease.release()
            continue
        try:
            if now - entry.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue
        lease = Lease(entry)
        if not lease.try_acquire():
            continue  # a live owner
        try:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
            removed.append(entry)
            lease.lock_path.unlink(missing_ok=True)
        finally:
            lease.release()
    return removed
