"""The artifact store: `<root>/<stage>/<key>/...` on any fsspec filesystem (local dir or S3).

Layout of one stage's output:

    <root>/<stage>/<key>/manifest.json        the commit point: lists the winning attempt's files
    <root>/<stage>/<key>/<attempt>/<files>    the files of the attempt that won
    <root>/<stage>/<key>/<other attempt>/     losers and killed attempts: removed by the winner
                                              (or by `layerprune gc`)

- `key` is a hash of the stage's version, its parameters and the keys of its inputs
  (`stage_key`), so equal work has one address and different work never shares one.
- Publishing under concurrency. Any number of processes, workers or Prefect servers may compute
  one key at once. Each attempt writes only under its own `<attempt>/` prefix, so no two writers
  ever touch the same object; then it creates `manifest.json` *exclusively*: `os.link` of a
  complete temp file on a local store (fails if the name exists), a conditional PUT with
  `If-None-Match: *` on S3 (412 if it exists). Exactly one attempt wins; readers only ever see a
  manifest whose files were all written before it; the losers delete their prefix and adopt the
  winner's manifest, so every run succeeds with the same result. (A lock manager would make the
  losers wait instead of compute; it would also need leases that survive a dead holder on every
  backend, where the commit point needs none. Resumable work does take a lease: layerprune.store.leases.)
- A crash leaves no manifest (or a complete one), so a rerun redoes exactly the unfinished
  stage; what a killed attempt left is removed by the next attempt that completes the key.
- A manifest whose files are missing or damaged (`verify`) is retracted and recomputed by the
  caller (tasks/common.run_stage), never trusted.

A remote store's network or S3 error in the middle of a stage (after the bounded retries of
`layerprune.store.remote`) surfaces as one `StoreUnavailable` that names the store and the stage.

Credentials and endpoints come from fsspec's usual sources (the AWS environment, ~/.aws, or
`storage_options`), never from paths, so they never show up in logs or flow parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from layerprune.store.files import cache_dir, file_sha256
from layerprune.store.leases import leased_dir, new_id, remove_abandoned
from layerprune.store.manifests import (
    MANIFEST,
    ArtifactDamaged,
    inside,
    library_versions,
    local_problems,
    manifest_problems,
    read_json_or_none,
    size_problem,
)
from layerprune.store.remote import StoreUnavailable, storage_options_from_env

SCRATCH = ".scratch"


class ArtifactStore:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root_url = str(root)
        if storage_options is None:  # S3 endpoint and bounded retries from the environment
            storage_options = storage_options_from_env(self.root_url)
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, stage: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), stage, key, name) if p)

    @contextlib.contextmanager
    def _remote_errors(self, action: str):
        """On a remote store, turn transport and S3 errors (after the bounded attempts of
        layerprune.store.remote) into one StoreUnavailable naming the store, the action and the
        attempts; a missing object (FileNotFoundError), damage, an already-wrapped error (nested
        actions) and local errors (a full disk) pass through unchanged."""
        from layerprune.store.remote import remote_cause, unavailable

        try:
            yield
        except (FileNotFoundError, StoreUnavailable, ArtifactDamaged):
            raise
        except Exception as e:
            if self.is_local or remote_cause(e) is None:
                raise
            raise unavailable(action, self.root_url, e, self.fs.storage_options) from e

    def manifest(self, stage: str, key: str) -> dict | None:
        """The stage's manifest if it is complete, else None."""
        try:
            with self._remote_errors(f"reading {stage}/{key}/{MANIFEST}"):
                with self.fs.open(self.path(stage, key, MANIFEST), "r") as f:
                    text = f.read()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise ArtifactDamaged(f"{stage}/{key}/{MANIFEST} in {self.root_url} is not a "
                                  f"manifest ({type(e).__name__}: {e})") from e
        problems = manifest_problems(manifest, stage, key)
        if problems:  # checked before any name in it becomes a path to read, write or delete
            raise ArtifactDamaged(f"{stage}/{key}/{MANIFEST} in {self.root_url} is not a "
                                  f"valid manifest: {'; '.join(problems[:3])}")
        return manifest

    def discard_manifest(self, stage: str, key: str) -> None:
        """Remove an unreadable manifest, so that the key is computed again."""
        with self._remote_errors(f"discarding {stage}/{key}/{MANIFEST}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(stage, key, MANIFEST))

    def files_path(self, manifest: dict, name: str = "") -> str:
        """Where a manifest's files live: its attempt's prefix (the key itself for manifests
        written before attempts existed)."""
        return self.path(manifest["stage"], manifest["key"],
                         "/".join(p for p in (manifest.get("attempt", ""), name) if p))

    # --- working space -----------------------------------------------------------------------
    def scratch_base(self) -> Path:
        """Local scratch: on the store's filesystem when local (so publishing is a rename),
        else in the cache dir."""
        if self.is_local:
            return _mkdir(Path(self.root) / SCRATCH)
        return _mkdir(cache_dir() / "scratch")

    @contextlib.contextmanager
    def attempt(self, stage: str, key: str, resumable: bool = False,
                wait=None) -> Iterator[Path]:
        """A leased working directory for one attempt at `stage/key`; yields `<dir>/out`, the
        directory to publish (its parent is free for side files).

        `resumable`: the directory is the same for every attempt at this key and is kept when
        the attempt fails, so the next one resumes what it left (training checkpoints). Its lease
        makes sure only one live attempt uses it; `wait(holder)` decides whether to wait for the
        holder (layerprune.store.leases.leased_dir).
        """
        name = f"{stage}-{key}" if resumable else f"{stage}-{key}-{new_id()}"
        with leased_dir(self.scratch_base(), name, wait=wait) as work:
            ok = False
            try:
                yield _mkdir(work / "out")
                ok = True
            finally:
                if ok or not resumable:
                    shutil.rmtree(work, ignore_errors=True)

    def remove_abandoned_scratch(self, key: str) -> list[Path]:
        """What attempts at `key` that no live process owns left in scratch (killed runs)."""
        return remove_abandoned(self.scratch_base(), match=key)

    # --- publishing ----------------------------------------------------------------------------
    def publish(self, stage: str, key: str, local_dir: Path, record: dict,
                replace: bool = False) -> dict:
        """Publish the files of `local_dir` as `stage/key`; the manifest that is complete in the
        store afterwards: this attempt's, or the one that won the race to commit the key.

        `replace`: commit over an existing manifest (a forced recompute) instead of adopting it.
        `local_dir` is consumed (moved or uploaded, then removed).
        """
        started = time.time()
        attempt = new_id()
        files = {f.relative_to(local_dir).as_posix(): {"sha256": file_sha256(f),
                                                        "bytes": f.stat().st_size}
                 for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file())}
        manifest = {"stage": stage, "key": key, "attempt": attempt,
                    "uri": self._uri(self.path(stage, key, attempt)), "files": files,
                    "versions": library_versions(), **record}
        with self._remote_errors(f"publishing {stage}/{key}"):
            self._put_dir(Path(local_dir), self.path(stage, key, attempt))
            manifest["publish_seconds"] = round(time.time() - started, 3)
            won = self._commit(self.path(stage, key, MANIFEST),
                               json.dumps(manifest, indent=2).encode(), replace)
            if not won:  # another attempt committed first: its result is ours
                manifest = self.manifest(stage, key)
            self._remove_attempts(stage, key, keep=manifest["attempt"])
        shutil.rmtree(local_dir, ignore_errors=True)
        return manifest

    def _commit(self, target: str, data: bytes, replace: bool) -> bool:
        """Write the manifest `target` atomically; False if another writer created it first."""
        if self.is_local:
            fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=os.path.dirname(target))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if replace:
                    os.replace(tmp, target)
                    return True
                try:
                    os.link(tmp, target)  # atomic, and fails if the name exists
                except FileExistsError:
                    return False
                return True
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if replace:
            self.fs.pipe_file(target, data)
            return True
        if self.root_url.startswith(("s3://", "s3a://")):
            try:  # PUT with If-None-Match: * (S3 and compatible stores since 2024)
                self.fs.pipe_file(target, data, mode="create")
            except FileExistsError:
                return False
            except OSError as e:  # s3fs reports the 412 as a generic error on some versions
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    return False
                raise
            return True
        # Other fsspec backends offer no conditional create: check, then write (a small race
        # window, documented in the README).
        if self.fs.exists(target):
            return False
        self.fs.pipe_file(target, data)
        return True

    def _put_dir(self, local: Path, dest: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.stat(local).st_dev == os.stat(os.path.dirname(dest)).st_dev:
                os.rename(local, dest)  # one atomic step; dest is unique to this attempt
            else:
                shutil.copytree(local, dest)
            return
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(f), f"{dest}/{f.relative_to(local).as_posix()}")

    def _remove_attempts(self, stage: str, key: str, keep: str) -> None:
        """Remove every attempt under `stage/key` but `keep`: losers that are still writing lose
        anyway (the manifest exists), and killed attempts left theirs behind."""
        base = self.path(stage, key)
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name in (MANIFEST, keep) or name.startswith(".manifest-") \
                    or not self.fs.isdir(entry):
                continue
            try:
                self.fs.rm(entry, recursive=True)
            except FileNotFoundError:
                pass

    def retract(self, manifest: dict) -> bool:
        """Remove a damaged manifest (and its attempt's files) so the key is computed again;
        False if the key has meanwhile been committed by another attempt (then keep that)."""
        stage, key = manifest["stage"], manifest["key"]
        with self._remote_errors(f"retracting {stage}/{key}"):
            current = self.manifest(stage, key)  # validated: its attempt is an attempt id
            if current is None or current.get("attempt") != manifest.get("attempt"):
                return current is None
            try:
                self.fs.rm(self.path(stage, key, MANIFEST))
            except FileNotFoundError:
                pass
            if current.get("attempt"):
                try:
                    self.fs.rm(self.files_path(current), recursive=True)
                except FileNotFoundError:
                    pass
        return True

    # --- reading -------------------------------------------------------------------------------
    def verify(self, manifest: dict, full: bool = False) -> list[str]:
        """What is wrong with a manifest's files in the store: missing, wrong size, and (for
        files up to SMALL_FILE bytes, or all with `full`) wrong sha256. Empty when sound.

        Sizes are one `find` listing on a remote store; checksums there are checked on download
        (`local_dir`), where the bytes are read anyway."""
        base = self.files_path(manifest)
        if self.is_local:
            return local_problems(Path(base), manifest, full)
        with self._remote_errors(f"checking {manifest['stage']}/{manifest['key']}"):
            try:
                listed = {p.removeprefix(base + "/"): info["size"]
                          for p, info in self.fs.find(base, detail=True).items()}
            except FileNotFoundError:
                listed = {}
        return [problem for rel, meta in manifest["files"].items()
                if (problem := size_problem(rel, listed.get(rel), meta["bytes"]))]

    def local_dir(self, stage: str, key: str) -> Path:
        """A local directory holding the stage's files (downloaded once per key if remote)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            raise FileNotFoundError(f"stage {stage}/{key} is not complete in {self.root_url}")
        if self.is_local:
            return Path(self.files_path(manifest))
        dest = cache_dir() / "store" / stage / key  # stage and key: the caller's, checked
        cached = read_json_or_none(dest / MANIFEST)
        if cached is not None and cached.get("attempt") == manifest.get("attempt") \
                and not local_problems(dest, manifest):
            return dest
        # Download under a leased temp dir, check every checksum, then swap it in: a killed or
        # failed download leaves nothing that could be taken for complete.
        with leased_dir(_mkdir(dest.parent), f".{key}-{new_id()}") as tmp:
            for rel, meta in manifest["files"].items():
                target = inside(tmp, rel)  # names were checked; symlinks are checked here
                if target is None:
                    raise ArtifactDamaged(f"{stage}/{key}/{rel} in {self.root_url}: leads "
                                          "outside the artifact")
                target.parent.mkdir(parents=True, exist_ok=True)
                with self._remote_errors(f"downloading {stage}/{key}/{rel}"):
                    self.fs.get_file(self.files_path(manifest, rel), str(target))
                if file_sha256(target) != meta["sha256"]:
                    raise ArtifactDamaged(f"{stage}/{key}/{rel} in {self.root_url}: checksum "
                                          "mismatch after download")
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            old = dest.parent / f".{key}-old-{new_id()}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:  # a concurrent download of this key got there first: as good
                if local_problems(dest, manifest):
                    raise
            shutil.rmtree(old, ignore_errors=True)
        remove_abandoned(dest.parent, match=f".{key}-")
        return dest

    def _uri(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
