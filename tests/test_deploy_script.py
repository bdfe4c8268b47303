"""deployments/deploy.sh's GPU count (`make deploy`) on machines with and without GPUs.

It once exited 1 with no message where `nvidia-smi` is absent and GPU_SLOTS unset: it counted
GPUs with a pipeline under `set -euo pipefail`. The e2e test (test_orchestration.py) passes
GPU_SLOTS, so only this test runs the documented path of a CPU machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _slots(tmp_path: Path, nvidia_smi: str | None, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:  # a driver's listing, as `nvidia-smi -L` prints it
        tool = bin_dir / "nvidia-smi"
        tool.write_text(f"#!/bin/sh\nprintf '{nvidia_smi}'\n")
        tool.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # no nvidia-smi unless put here
    return subprocess.run(["bash", "-c", "set -euo pipefail; source deployments/gpus.sh; "
                           "gpu_slots"], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env})


def test_no_nvidia_smi_and_no_gpu_slots_gives_one_slot_and_says_so(tmp_path):
    out = _slots(tmp_path, None)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    assert "lists no GPU here" in out.stderr and "GPU_SLOTS" in out.stderr


def test_a_driver_without_gpus_gives_one_slot(tmp_path):
    out = _slots(tmp_path, "")
    assert out.returncode == 0 and out.stdout.strip() == "1"


def test_the_gpus_nvidia_smi_lists_are_the_slots(tmp_path):
    listing = r"GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n"
    out = _slots(tmp_path, listing)
    assert out.returncode == 0 and out.stdout.strip() == "2" and not out.stderr


@pytest.mark.parametrize("given, ok", [("3", True), ("0", False), ("two", False)])
def test_gpu_slots_given_is_used_or_refused_by_name(tmp_path, given, ok):
    out = _slots(tmp_path, None, GPU_SLOTS=given)
    assert (out.returncode == 0) == ok
    assert out.stdout.strip() == given if ok else "GPU_SLOTS must be a whole number" in out.stderr


def test_deploy_script_uses_it():
    text = (REPO / "deployments" / "deploy.sh").read_text()
    assert "source deployments/gpus.sh" in text and "nvidia-smi" not in text.split("gpus.sh")[1]
