"""benchmarks/gpu.sh can only be timed on a GPU machine, which sessions get now and then: its
`--tiny` mode runs every phase (bf16 and nf4) on the CPU, so a library change that breaks the
script fails here, not on the next lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("load", "forward", "extract", "loss", "mmlu", "heal")


def test_gpu_benchmark_runs_every_phase_in_tiny_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--threads", "1"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())["results"]
    assert set(results) == {"bf16", "nf4"}
    for mode, phases in results.items():
        failed = {p: r["error"] for p, r in phases.items() if "error" in r}
        assert not failed, f"{mode}: {failed}"
        assert set(PHASES) <= set(phases), f"{mode}: phases {sorted(phases)}"
        assert all(phases[p]["tokens_per_s"] > 0 for p in PHASES[1:])
    # nf4 really is 4-bit (a loader that ignored the option would report 0), bf16 is not
    assert results["nf4"]["load"]["linear4bit"] > 0
    assert results["bf16"]["load"]["linear4bit"] == 0
