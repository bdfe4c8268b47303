"""Storage faults: an S3 store (moto on loopback) behind a fault-injecting proxy
(tests/fault_proxy.py) that drops connections, answers 503 SlowDown, stalls past the read
timeout or black-holes connects, in the middle of a publish, a manifest read and a download.

Each fault must end, within a bounded time, as ONE `StoreUnavailable` line naming the store and
the stage, after exactly the configured number of attempts (counted by the proxy, not by the
client); then, the fault cleared, the same call must complete with the result an undisturbed
store gives. Timeouts are shortened through the environment (layerprune.store.remote) to keep this
file fast; the attempt arithmetic is the production one.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import pytest
from e2e_services import start_moto
from fault_proxy import FaultProxy

from layerprune.errors import LayerPruneError
from layerprune.store.artifacts import ArtifactStore
from layerprune.store.manifests import stage_key
from layerprune.store.remote import (
    S3_CLIENT_CONFIG,
    StoreUnavailable,
    register_bounded_s3,
    storage_options_from_env,
)

ATTEMPTS = 3  # LAYERPRUNE_S3_MAX_ATTEMPTS below (and the production default)
CONNECT_S, READ_S = 0.5, 1.0  # connect under Linux's 1 s SYN retransmit: one SYN per attempt
BACKOFF_S = 1 + 2  # botocore standard mode: at most 1 s, then 2 s, between the 3 attempts
STAGE = "distances"
RECORD = {"params": {"block_size": 2}, "inputs": {"hidden_states": "0123abcd"}}
FILES = {"distances.json": b'{"1": [0.25, 0.5]}', "sub/tensor.bin": os.urandom(4096)}
FAULTS = ["drop", "slowdown", "stall", "blackhole"]


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    service, endpoint = start_moto(env, tmp_path_factory.mktemp("moto"))
    yield endpoint
    service.stop()


@pytest.fixture
def proxy(moto_endpoint, monkeypatch, tmp_path):
    """A fresh proxy, this process's S3 environment pointed at it, a fresh client (fsspec
    caches filesystems by their options; botocore's retry quota lives in the client), a fresh
    download cache."""
    with FaultProxy(moto_endpoint) as p:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        for name, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                                AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=p.endpoint,
                                LAYERPRUNE_S3_CONNECT_TIMEOUT=str(CONNECT_S),
                                LAYERPRUNE_S3_READ_TIMEOUT=str(READ_S),
                                LAYERPRUNE_S3_MAX_ATTEMPTS=str(ATTEMPTS),
                                LAYERPRUNE_CACHE=str(tmp_path / "cache")).items():
            monkeypatch.setenv(name, value)
        register_bounded_s3().clear_instance_cache()
        yield p


def _stage_dir(base: Path) -> Path:
    base.mkdir(parents=True)
    for rel, data in FILES.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


EXPECTED_FILES = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for rel, data in FILES.items()}


def _downloaded(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json"}


def _arm(proxy: FaultProxy, fault: str, after: int) -> None:
    if fault == "drop":
        proxy.drop_after(after)
    else:
        getattr(proxy, fault)(after)


def _bounded(call, limit_s: float, proxy: FaultProxy):
    """(result or raised exception, seconds). A call still running after `limit_s` fails the
    test; closing the proxy's connections frees its thread."""
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            out["value"] = e

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        proxy.close()
        thread.join(10)
        pytest.fail(f"still running after {limit_s:.0f} s (requests seen: {proxy.seen})")
    return out["value"], time.monotonic() - started


@pytest.mark.parametrize("operation", ["publish", "manifest", "download"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_store_fault_ends_in_one_clear_error_and_a_rerun_completes(proxy, tmp_path, fault,
                                                                     operation):
    bucket = f"faults-{fault}-{operation}"
    root = f"s3://{bucket}/store"
    store = ArtifactStore(root)
    store.fs.mkdir(bucket)
    key = stage_key(STAGE, 1, {"fault": fault, "operation": operation})
    # The undisturbed result, through the same proxy passing everything, under another root.
    reference = ArtifactStore(f"s3://{bucket}/reference").publish(
        STAGE, key, _stage_dir(tmp_path / "reference"), RECORD)
    assert reference["files"] == EXPECTED_FILES

    local = _stage_dir(tmp_path / "out")
    if operation == "publish":
        call = lambda: store.publish(STAGE, key, local, RECORD)  # noqa: E731
        after = len(FILES)  # one PUT per (small) file pass; the commit of the manifest fails
    else:
        store.publish(STAGE, key, local, RECORD)
        call = (lambda: store.manifest(STAGE, key)) if operation == "manifest" else \
            (lambda: store.local_dir(STAGE, key))
        after = 0
        if operation == "download":  # let the manifest read pass, fault the file GETs
            store.fs.invalidate_cache()
            proxy.reset_counts()
            store.manifest(STAGE, key)
            after = proxy.requests
    store.fs.invalidate_cache()  # no listing cached from before: the same requests every run
    proxy.reset_counts()
    _arm(proxy, fault, after)

    per_attempt = {"stall": READ_S, "blackhole": CONNECT_S}.get(fault, 0)
    limit = ATTEMPTS * per_attempt + BACKOFF_S + 3  # 3 s of slack for a busy machine
    error, seconds = _bounded(call, limit + 30, proxy)
    print(f"\n{fault:9s} {operation:8s} requests={proxy.requests} syn_drops={proxy.syn_drops} "
          f"{seconds:.2f}s {error}")

    assert isinstance(error, StoreUnavailable), f"{type(error).__name__}: {error}"
    message = str(error)
    assert "\n" not in message
    assert re.match(rf"artifacts: \w+ {STAGE}/{key}(/\S+)? in '{re.escape(root)}' failed after "
                    rf"{ATTEMPTS} attempts \(.+\)$", message), message
    # Exactly the configured attempts reached the store, none more (no retry layer on top of
    # botocore's) and none less; aiohttp resends once on a dropped connection (remote.py).
    faulted = {"drop": 2 * ATTEMPTS, "slowdown": ATTEMPTS, "stall": ATTEMPTS,
               "blackhole": 1 if after else 0}[fault]
    assert proxy.requests == after + faulted, proxy.seen
    assert proxy.syn_drops == (ATTEMPTS if fault == "blackhole" else 0), proxy.seen
    assert seconds < limit, f"{seconds:.1f} s > {limit} s"
    assert seconds >= ATTEMPTS * per_attempt  # each attempt did wait out its timeout

    proxy.clear()
    if operation == "publish":
        assert store.manifest(STAGE, key) is None  # the failed publish committed nothing
        assert _downloaded(local) == {r: m["sha256"] for r, m in EXPECTED_FILES.items()}, \
            "the stage's output must be kept for the rerun"
    result, seconds = _bounded(call, 30, proxy)
    assert not isinstance(result, BaseException), f"{type(result).__name__}: {result}"
    manifest = store.manifest(STAGE, key)
    assert manifest["files"] == reference["files"]
    assert {k: manifest[k] for k in RECORD} == RECORD
    assert _downloaded(store.local_dir(STAGE, key)) == \
        {rel: meta["sha256"] for rel, meta in EXPECTED_FILES.items()}


def test_attempts_and_timeouts_come_from_the_environment(monkeypatch):
    for name in ("LAYERPRUNE_S3_CONNECT_TIMEOUT", "LAYERPRUNE_S3_READ_TIMEOUT",
                 "LAYERPRUNE_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    config = storage_options_from_env("s3://b/p")["config_kwargs"]
    # 3 attempts in all: botocore's "max_attempts" would count retries (3 meant 4 attempts)
    assert config == S3_CLIENT_CONFIG == {"connect_timeout": 5, "read_timeout": 60, "retries": {
        "total_max_attempts": 3, "mode": "standard"}}
    monkeypatch.setenv("LAYERPRUNE_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("LAYERPRUNE_S3_READ_TIMEOUT", "2")
    monkeypatch.setenv("LAYERPRUNE_S3_MAX_ATTEMPTS", "5")
    assert storage_options_from_env("s3://b/p")["config_kwargs"] == {
        "connect_timeout": 0.5, "read_timeout": 2.0,
        "retries": {"total_max_attempts": 5, "mode": "standard"}}
    assert S3_CLIENT_CONFIG["retries"]["total_max_attempts"] == 3  # defaults left alone
    for name, bad in [("LAYERPRUNE_S3_MAX_ATTEMPTS", "0"), ("LAYERPRUNE_S3_MAX_ATTEMPTS", "2.5"),
                      ("LAYERPRUNE_S3_READ_TIMEOUT", "soon"),
                      ("LAYERPRUNE_S3_CONNECT_TIMEOUT", "nan")]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(LayerPruneError, match=rf"^{name}='{re.escape(bad)}': must be"):
            storage_options_from_env("s3://b/p")
        monkeypatch.delenv(name)
