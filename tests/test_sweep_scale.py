"""benchmarks/sweep_scale.py at its tiniest: one model, each backend (Prefect's SQLite server,
then PostgreSQL + Redis), the real sweep through deployments and workers. Checks that the
benchmark runs end to end and reads back what it reports, not how fast it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from e2e_services import REPO

pytestmark = pytest.mark.e2e


def test_sweep_scale_benchmark_runs_at_the_tiniest_size(tmp_path):
    out = tmp_path / "sweep_scale.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sweep_scale.py"),
                           "--models", "1", "--backends", "sqlite", "postgres",
                           "--poll-s", "2", "--out", str(out)],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=1200)
    # 1: a target failed (a loaded machine may be slow); anything else is the script's failure
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert "time per model (s)" in done.stdout and "PostgreSQL completes M=1" in done.stdout
    report = json.loads(out.read_text())
    assert [(r["backend"], r["models"]) for r in report["results"]] == [("sqlite", 1),
                                                                       ("postgres", 1)]
    for r in report["results"]:
        assert r["sweep_state"] == "Completed", r["sweep_message"]
        assert r["flow_runs"] == 2 and r["flow_run_states"] == {"Completed": 2}  # sweep + child
        # every stage ran once, and each one's body was found in its manifest
        assert {"calibration", "distances", "prune", "eval", "heal", "report", "sweep"} <= \
            set(r["compute_s_by_stage"]), r["compute_s_by_stage"]
        assert r["stage_tasks_reused"] == 0 and r["stage_tasks_timed"] >= 8
        assert r["overhead_ms_median"] is not None and r["compute_s"] > 0
        assert r["wall_s"] > 0 and r["time_per_model_s"] == pytest.approx(r["wall_s"], abs=0.01)
    assert len(report["targets"]) == 3  # postgres at M=1, and overhead on each backend
