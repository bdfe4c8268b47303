"""The artifact store: `<root>/<stage>/<key>/...` on any fsspec filesystem (local dir or S3).

- `key` is a hash of the stage's version, its parameters and the keys of its inputs
  (`stage_key`), so equal work has one address and different work never shares one.
- A stage is complete when its `manifest.json` exists. It is written last and lists every file
  with its sha256, plus inputs, parameters, library versions and timings; readers trust only
  manifests. A crash leaves no manifest, so a rerun redoes exactly the unfinished stage.
- Every object is written atomically: local files by rename, S3 objects by single PUTs.

A remote store's network or S3 error in the middle of a stage (after the bounded retries of
`layerprune.remote`) surfaces as one `StoreUnavailable` that names the store and the stage.

Credentials and endpoints come from fsspec's usual sources (the AWS environment, ~/.aws, or
`storage_options`), never from paths, so they never show up in logs or flow parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from layerprune.io import file_sha256
from layerprune.remote import StoreUnavailable, storage_options_from_env

MANIFEST = "manifest.json"


def stage_key(stage: str, version: int, params: dict) -> str:
    """Content address of one stage's output: stable JSON of (stage, version, params) hashed."""
    blob = json.dumps({"stage": stage, "version": version, "params": params},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def library_versions() -> dict:
    import torch
    import transformers

    from layerprune import __version__

    return {"layerprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


class ArtifactStore:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root_url = str(root)
        if storage_options is None:  # S3 endpoint and bounded retries from the environment
            storage_options = storage_options_from_env(self.root_url)
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, stage: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), stage, key, name) if p)

    def uri(self, stage: str, key: str) -> str:
        return self.fs.unstrip_protocol(self.path(stage, key)) if not self.is_local \
            else self.path(stage, key)

    @contextlib.contextmanager
    def _remote_errors(self, action: str):
        """On a remote store, turn transport and S3 errors into one StoreUnavailable; a missing
        object (FileNotFoundError) and local errors pass through unchanged."""
        from aiohttp import ClientError as HTTPError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except FileNotFoundError:
            raise
        except (OSError, BotoCoreError, ClientError, HTTPError, TimeoutError) as e:
            if self.is_local:
                raise
            raise StoreUnavailable(f"artifacts: {action} in {self.root_url!r} failed after "
                                   f"bounded retries ({type(e).__name__}: {e})") from e

    def manifest(self, stage: str, key: str) -> dict | None:
        """The stage's manifest if it is complete, else None."""
        try:
            with self._remote_errors(f"reading {stage}/{key}/{MANIFEST}"):
                with self.fs.open(self.path(stage, key, MANIFEST), "r") as f:
                    return json.load(f)
        except FileNotFoundError:
            return None

    def scratch(self, resumable: str | None = None) -> Path:
        """A local working directory for a stage, on the store's filesystem when local (so
        publishing is a rename), else in the system temp dir.

        `resumable`: a stable name instead of a fresh one, so that a retried or rerun stage
        finds what its interrupted attempt left (e.g. training checkpoints) and resumes.
        """
        if self.is_local:
            base = Path(self.root) / ".scratch"
        else:
            from layerprune.assets import cache_dir

            base = cache_dir() / "scratch"
        base.mkdir(parents=True, exist_ok=True)
        if resumable:
            (base / resumable).mkdir(exist_ok=True)
            return base / resumable
        return Path(tempfile.mkdtemp(prefix="stage-", dir=base))

    def publish(self, stage: str, key: str, local_dir: Path, record: dict) -> dict:
        """Move/upload every file of `local_dir`, then write the manifest last."""
        started = time.time()
        files = {}
        with self._remote_errors(f"publishing {stage}/{key}"):
            for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
                rel = f.relative_to(local_dir).as_posix()
                files[rel] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
                self._put(f, self.path(stage, key, rel))
            manifest = {"stage": stage, "key": key, "uri": self.uri(stage, key), "files": files,
                        "versions": library_versions(), **record,
                        "publish_seconds": round(time.time() - started, 3)}
            self._put_bytes(json.dumps(manifest, indent=2).encode(),
                            self.path(stage, key, MANIFEST))
        shutil.rmtree(local_dir, ignore_errors=True)
        return manifest

    def local_dir(self, stage: str, key: str) -> Path:
        """A local directory holding the stage's files (downloaded once per key if remote)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            raise FileNotFoundError(f"stage {stage}/{key} is not complete in {self.root_url}")
        if self.is_local:
            return Path(self.path(stage, key))
        from layerprune.assets import cache_dir

        dest = cache_dir() / "store" / stage / key
        if not (dest / MANIFEST).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=_mkdir(dest.parent)))
            try:  # a failed download leaves nothing behind
                for rel, meta in manifest["files"].items():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with self._remote_errors(f"downloading {stage}/{key}/{rel}"):
                        self.fs.get_file(self.path(stage, key, rel), str(target))
                    if file_sha256(target) != meta["sha256"]:
                        raise OSError(f"{stage}/{key}/{rel}: checksum mismatch after download")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        return dest

    def _put(self, local: Path, remote: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(remote), exist_ok=True)
            tmp = f"{remote}.tmp-{os.getpid()}"
            if _same_device(local, remote):
                os.replace(local, tmp)
            else:
                shutil.copyfile(local, tmp)
            os.replace(tmp, remote)
        else:
            self.fs.put_file(str(local), remote)  # one PUT (or a multipart upload): atomic

    def _put_bytes(self, data: bytes, remote: str) -> None:
        fd, tmp = tempfile.mkstemp()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            self._put(Path(tmp), remote)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _same_device(local: Path, remote: str) -> bool:
    parent = os.path.dirname(remote)
    return os.stat(local).st_dev == os.stat(parent).st_dev
