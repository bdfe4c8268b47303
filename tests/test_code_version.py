"""A run records the commit it runs and refuses code other than what was deployed
(tasks/version.py, deployments/deploy.sh). Catches a worker whose checkout moved on without a
redeploy running undeployed code, and a "dirty" tree passing for its commit."""

from __future__ import annotations

import subprocess

import pytest

from layerprune.errors import LayerPruneError
from tasks import version


def _repo(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    return subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_running_commit_says_when_tracked_files_differ(tmp_path, monkeypatch):
    monkeypatch.delenv(version.COMMIT_ENV, raising=False)
    sha = _repo(tmp_path)
    assert version.running_commit(tmp_path) == sha
    (tmp_path / "untracked.txt").write_text("not code")  # untracked files do not count
    assert version.running_commit(tmp_path) == sha
    (tmp_path / "f.py").write_text("x = 2\n")
    assert version.running_commit(tmp_path) == f"{sha}-dirty"
    monkeypatch.setenv(version.COMMIT_ENV, "abc123")  # an image says what it was built from
    assert version.running_commit(tmp_path) == "abc123"
    assert version.running_commit(tmp_path / "nowhere") == "abc123"
    monkeypatch.delenv(version.COMMIT_ENV)
    assert version.running_commit(tmp_path.parent / "not-a-repo-at-all") == "unknown"


def test_a_run_of_another_commits_deployment_is_refused(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv(version.COMMIT_ENV, "aaaa")
    deployed = SimpleNamespace(id="some-id", version="bbbb", name="default")
    monkeypatch.setattr(version, "deployment", deployed)
    with pytest.raises(LayerPruneError, match="runs code at commit aaaa, but deployment "
                                              "'default' was deployed from bbbb"):
        version.check_deployed_version()
    deployed.version = "aaaa"
    assert version.check_deployed_version() == "aaaa"
    monkeypatch.setattr(version, "deployment", SimpleNamespace(id=None, version=None, name=None))
    assert version.check_deployed_version() == "aaaa"  # no deployment: the demo, the tests


def test_deploy_records_the_commit_as_every_deployments_version():
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    deployments = yaml.safe_load((repo / "deployments" / "prefect.yaml").read_text())
    assert {d["version"] for d in deployments["deployments"]} == {"{{ $LAYERPRUNE_COMMIT }}"}
    script = (repo / "deployments" / "deploy.sh").read_text()
    assert "export LAYERPRUNE_COMMIT" in script and "git diff --quiet HEAD" in script
