"""The artifact store under concurrency, crashes and damage (layerprune.store.artifacts, leases, gc).

Writers are separate processes started together, on a local store and on a real S3 endpoint
(moto on loopback), each publishing *different* bytes for one key, so that a mix of two writers
would show in the checksums.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from e2e_services import start_moto

from layerprune.store.artifacts import ArtifactStore
from layerprune.store.leases import Lease, leased_dir
from layerprune.store.maintenance import collect_garbage, parse_age, verify_store
from layerprune.store.manifests import MANIFEST, ArtifactDamaged

WRITER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from layerprune.store.artifacts import ArtifactStore
    root, wid, start_at, work, barrier, writers, commit = sys.argv[1:]
    work, barrier = Path(work), Path(barrier)

    def meet():  # every writer waits here until all of them have come
        (barrier / wid).touch()
        while len(list(barrier.iterdir())) < int(writers):
            time.sleep(0.01)

    real = ArtifactStore._commit

    def paused(self, target, data, replace):  # the real, exclusive commit, after the meeting
        meet()
        return real(self, target, data, replace)

    def check_then_replace(self, target, data, replace):  # a wrong commit: check, then write
        taken = self.fs.exists(target)
        meet()  # every writer has checked, none has written
        if taken:
            return False
        self.fs.pipe_file(target, data)
        return True

    ArtifactStore._commit = {"exclusive": paused, "check-then-replace": check_then_replace}[commit]
    (work / "sub").mkdir(parents=True)
    (work / "who.txt").write_text(wid * 1000)
    (work / "sub" / "data.bin").write_bytes(os.urandom(3 << 20))  # over SMALL_FILE
    while time.time() < float(start_at):
        time.sleep(0.001)
    m = ArtifactStore(root).publish("stage", "k1", work, {"writer": wid})
    print(json.dumps({"attempt": m["attempt"], "writer": m["writer"]}))
""")


def _race(root: str, work_base: Path, writers: int, env: dict | None = None,
          commit: str = "exclusive") -> list[dict]:
    """`writers` processes publish one key; all of them reach the commit point before any
    commits (a barrier), so the writers always meet there: a commit that is not exclusive lets
    more than one win, every time, instead of only when the timing happens to collide."""
    start_at = time.time() + 4  # every process imported and waiting by then
    barrier = work_base / f"barrier-{commit}"
    barrier.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, str(i), str(start_at),
                               str(work_base / f"w{i}"), str(barrier), str(writers), commit],
                              stdout=subprocess.PIPE, text=True,
                              env=env or os.environ.copy()) for i in range(writers)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def _check_one_winner(store: ArtifactStore, results: list[dict]) -> None:
    # Every writer returns the same, committed attempt: the losers adopted the winner's.
    manifest = store.manifest("stage", "k1")
    assert {r["attempt"] for r in results} == {manifest["attempt"]}
    assert {r["writer"] for r in results} == {manifest["writer"]}
    # Its files are the winner's own, whole (a mix of writers fails here).
    assert store.verify(manifest, full=True) == []
    files = store.local_dir("stage", "k1")
    assert (files / "who.txt").read_text() == manifest["writer"] * 1000
    # Nothing of the losers is left under the key.
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path("stage", "k1"))}
    assert names == {MANIFEST, manifest["attempt"]}


def test_concurrent_writers_of_one_key_on_a_local_store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    results = _race(str(root), root / ".scratch", writers=4)
    _check_one_winner(ArtifactStore(str(root)), results)


def test_the_race_catches_a_commit_that_is_not_exclusive(tmp_path):
    """The same race with a check-then-write commit: every writer checks before any writes
    (the barrier), so each believes it won and they return different results. This is what
    the test above would see of a non-exclusive commit, on every run."""
    root = tmp_path / "store"
    root.mkdir()
    results = _race(str(root), root / ".scratch", writers=3, commit="check-then-replace")
    assert len({r["attempt"] for r in results}) == 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    svc, endpoint = start_moto(env, tmp_path_factory.mktemp("moto"))
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
        Bucket="race")
    yield env
    svc.stop()


def test_concurrent_writers_of_one_key_on_s3(s3, tmp_path, monkeypatch):
    env = {**s3, "LAYERPRUNE_CACHE": str(tmp_path / "cache")}
    results = _race("s3://race/store", tmp_path, writers=3, env=env)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
              "LAYERPRUNE_CACHE"):
        monkeypatch.setenv(k, env[k])
    _check_one_winner(ArtifactStore("s3://race/store"), results)


def _publish(store: ArtifactStore, tmp_path: Path, key: str, text: str) -> dict:
    work = store.scratch_base() / f"w-{key}-{text}"
    work.mkdir(parents=True)
    (work / "a.txt").write_text(text)
    (work / "big.bin").write_bytes(b"x" * (2 << 20))
    return store.publish("stage", key, work, {})


def test_damage_is_found_by_size_small_checksums_and_full_verify(tmp_path):
    store = ArtifactStore(str(tmp_path))
    m = _publish(store, tmp_path, "k", "hello")
    files = Path(store.files_path(m))
    assert store.verify(m) == []
    (files / "a.txt").write_text("jello")  # same size, small file: checksummed on every read
    assert store.verify(m) == ["a.txt: sha256 differs from the manifest"]
    (files / "a.txt").write_text("hello")
    with open(files / "big.bin", "r+b") as f:  # same size, large file: only a full verify
        f.write(b"y")
    assert store.verify(m) == []
    assert store.verify(m, full=True) == ["big.bin: sha256 differs from the manifest"]
    (files / "big.bin").unlink()
    assert store.verify(m) == ["big.bin: missing"]
    # `layerprune verify --repair` retracts it: the key is then simply not computed.
    assert list(verify_store(str(tmp_path), repair=True)) == [f"stage/k"]
    assert store.manifest("stage", "k") is None and not files.exists()


def test_an_unreadable_manifest_is_reported_not_taken(tmp_path):
    store = ArtifactStore(str(tmp_path))
    _publish(store, tmp_path, "k", "hello")
    Path(store.path("stage", "k", MANIFEST)).write_text('{"stage": "stage", "ke')
    with pytest.raises(ArtifactDamaged, match="stage/k/manifest.json .* is not a manifest"):
        store.manifest("stage", "k")


def test_retract_keeps_a_manifest_committed_meanwhile(tmp_path):
    store = ArtifactStore(str(tmp_path))
    old = _publish(store, tmp_path, "k", "one")
    new = _publish(store, tmp_path, "k", "two")  # loses: adopts `old`
    assert new["attempt"] == old["attempt"]
    replaced = store.publish("stage", "k", _scratch_with(store, "three"), {}, replace=True)
    assert store.retract(old) is False  # someone else's commit is not ours to retract
    assert store.manifest("stage", "k")["attempt"] == replaced["attempt"]


def _scratch_with(store: ArtifactStore, text: str) -> Path:
    work = store.scratch_base() / f"w-{text}"
    work.mkdir()
    (work / "a.txt").write_text(text)
    return work


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from layerprune.store.leases import leased_dir
    with leased_dir(Path(sys.argv[1]), "heal-k"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_lease_is_exclusive_while_its_owner_lives_and_lost_when_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waited = []
        with pytest.raises(Exception, match="held by process"):
            with leased_dir(tmp_path, "heal-k", wait=lambda h: waited.append(h) or
                            len(waited) >= 2, poll_s=0.1):
                pytest.fail("a second owner got the lease")
        assert waited == [str(holder.pid)] * 2
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with leased_dir(tmp_path, "heal-k", wait=lambda h: True) as d:  # taken at once
            assert d == tmp_path / "heal-k"
    finally:
        holder.kill()


def test_gc_removes_only_old_abandoned_attempts_and_scratch(tmp_path):
    store = ArtifactStore(str(tmp_path))
    m = _publish(store, tmp_path, "k", "kept")
    # A killed attempt's files under a completed key and under a never-completed key, and a
    # killed attempt's scratch; plus one fresh attempt that is still being written.
    for stage_key_attempt in ("stage/k/dead-attempt", "stage/k2/dead-attempt",
                              "stage/k2/young-attempt"):
        (tmp_path / stage_key_attempt).mkdir(parents=True)
        (tmp_path / stage_key_attempt / "part.bin").write_bytes(b"x")
    dead_scratch = store.scratch_base() / "stage-k3-dead"
    dead_scratch.mkdir()
    old = time.time() - 8 * 86400
    for p in (tmp_path / "stage/k/dead-attempt", tmp_path / "stage/k2/dead-attempt",
              dead_scratch):
        os.utime(p / "part.bin" if (p / "part.bin").exists() else p, (old, old))
        os.utime(p, (old, old))
    live = Lease(store.scratch_base() / "stage-k4-live")
    (store.scratch_base() / "stage-k4-live").mkdir()
    assert live.try_acquire()
    os.utime(store.scratch_base() / "stage-k4-live", (old, old))
    try:
        dry = collect_garbage(str(tmp_path), parse_age("7d"), dry_run=True)
        assert (tmp_path / "stage/k/dead-attempt").exists()  # a dry run removes nothing
        report = collect_garbage(str(tmp_path), parse_age("7d"))
    finally:
        live.release()
    gone = {Path(p).relative_to(tmp_path).as_posix() for p in report.removed}
    assert gone == {"stage/k/dead-attempt", "stage/k2/dead-attempt",
                    ".scratch/stage-k3-dead"}
    assert set(dry.removed) <= set(report.removed) and len(dry.removed) == 2  # no scratch
    assert report.kept_young == 1 and (tmp_path / "stage/k2/young-attempt").exists()
    assert (store.scratch_base() / "stage-k4-live").exists()  # a live owner's
    assert store.verify(m, full=True) == []  # the committed artifact is untouched


def test_parse_age_names_the_parameter():
    assert parse_age("7d") == 7 * 86400 and parse_age("30m") == 1800
    with pytest.raises(Exception, match="--older-than: '7 days' is not an age"):
        parse_age("7 days", "--older-than")


def test_gc_and_verify_commands(tmp_path, capsys):
    from layerprune.cli import main

    store = ArtifactStore(str(tmp_path))
    m = _publish(store, tmp_path, "k", "hello")
    assert main(["verify", "--store", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["damaged"] == {}
    Path(store.files_path(m, "a.txt")).write_text("jello")
    assert main(["verify", "--store", str(tmp_path)]) == 1  # damage is a failing status
    assert json.loads(capsys.readouterr().out)["damaged"] == {
        "stage/k": ["a.txt: sha256 differs from the manifest"]}
    assert main(["verify", "--store", str(tmp_path), "--repair"]) == 0
    assert store.manifest("stage", "k") is None
    assert main(["gc", "--store", str(tmp_path), "--older-than", "0s"]) == 0
    assert main(["gc", "--store", str(tmp_path / "nope"), "--older-than", "7d"]) == 2
    assert "--store: " in capsys.readouterr().err and not (tmp_path / "nope").exists()
    assert main(["gc", "--store", str(tmp_path), "--older-than", "a week"]) == 2
    assert "--older-than: 'a week' is not an age" in capsys.readouterr().err


def _plant(store: ArtifactStore, key: str, **changes) -> None:
    """Rewrite the committed manifest of stage/`key` with `changes`, as anyone who can write the
    store could."""
    path = Path(store.path("stage", key, MANIFEST))
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, says", [
    ({"attempt": "../../../victim"}, "is not an attempt id"),
    ({"attempt": "/"}, "is not an attempt id"),
    ({"files": {"../../victim/keep.txt": {"bytes": 4, "sha256": "0" * 64}}},
     "is not a relative path inside the artifact"),
    ({"files": {"/etc/passwd": {"bytes": 4, "sha256": "0" * 64}}}, "is not a relative path"),
    ({"stage": "other"}, "not stage/k"),
    ({"files": {"a.txt": {"bytes": "4", "sha256": "0" * 64}}}, "needs an integer 'bytes'"),
])
def test_a_hostile_manifest_is_damage_and_nothing_outside_the_store_is_touched(
        tmp_path, capsys, changes, says):
    """Before manifests were checked, `verify --repair` on `"attempt": "../../../victim"`
    deleted a directory outside the store, and a remote download wrote wherever a file name
    pointed. Now any name in a manifest is checked before it becomes a path."""
    from layerprune.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    root = tmp_path / "deep" / "er" / "store"  # ../../../victim from <root>/stage/k
    store = ArtifactStore(str(root))
    _publish(store, tmp_path, "k", "hello")
    _plant(store, "k", **changes)
    with pytest.raises(ArtifactDamaged, match=says):
        store.manifest("stage", "k")
    assert main(["verify", "--store", str(root), "--repair"]) == 0
    assert says in json.loads(capsys.readouterr().out)["damaged"]["stage/k"][0]
    assert (victim / "keep.txt").read_text() == "keep" and store.manifest("stage", "k") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "victim"]


def test_a_symlink_out_of_an_artifact_is_damage(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    m = _publish(store, tmp_path, "k", "hello")
    outside = tmp_path / "secret.txt"
    outside.write_text("hello")  # same bytes: only the path gives it away
    target = Path(store.files_path(m, "a.txt"))
    target.unlink()
    target.symlink_to(outside)
    assert store.verify(m) == ["a.txt: leads outside the artifact"]


def test_an_attempt_id_is_what_leases_make():
    from layerprune.store.leases import new_id
    from layerprune.store.manifests import ATTEMPT_ID

    assert ATTEMPT_ID.match(new_id())
