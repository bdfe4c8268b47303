"""Which code a flow run runs, and that it is the code that was deployed.

`make deploy` records the commit it deployed as each deployment's `version`
(deployments/deploy.sh: `git rev-parse HEAD`, with `-dirty` when tracked files differ from it).
A run finds the commit of the code it is running: $LAYERPRUNE_COMMIT where the image sets it
(docker/, built with --build-arg LAYERPRUNE_COMMIT=...), else the checkout it runs from (the
pull step's working directory). A run of a deployment whose version differs is refused before
any work: a worker whose checkout moved on without a redeploy would otherwise run code nobody
deployed. Every run records its commit in its summary (tasks/results.py) and its log.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from prefect.runtime import deployment

from layerprune.errors import LayerPruneError

COMMIT_ENV = "LAYERPRUNE_COMMIT"


def running_commit(repo: str | Path | None = None) -> str:
    """The commit of the code this process runs: $LAYERPRUNE_COMMIT, else `git rev-parse HEAD`
    of `repo` (default: the checkout this file is in) plus `-dirty` when tracked files differ
    from it; "unknown" outside any git checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    repo = Path(repo or Path(__file__).resolve().parent.parent)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD").returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def check_deployed_version() -> str:
    """The running commit; refused (one error naming both) when this run's deployment was
    deployed from another commit. Runs outside a deployment (the demo, tests) pass."""
    commit = running_commit()
    deployed = deployment.version if deployment.id is not None else None
    if deployed and deployed != commit:
        raise LayerPruneError(
            f"this worker runs code at commit {commit}, but deployment {deployment.name!r} was "
            f"deployed from {deployed}: check out that commit on the worker, or redeploy "
            "(make deploy) from the code the workers run")
    return commit
