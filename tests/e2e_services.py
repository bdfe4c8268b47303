"""Real services for the end-to-end tests (test_orchestration.py): an S3 endpoint (moto), a
Prefect server and process workers.

Each service runs in its own session (process group) with its output in a log file, so stopping
it (SIGTERM to the group, SIGKILL after a grace period) also ends the flow-run processes a worker
started. Everything binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: prefect, moto_server
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the whole group, then SIGKILL whatever is left after `grace_s`."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                if not group_alive(self.proc.pid):
                    break
            except subprocess.TimeoutExpired:
                continue
        self._log_file.close()

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a dead machine would stop it: nothing is told."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_http(url: str, service: Service, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{service.name} not answering {url} after {timeout_s}s:\n"
                       f"{service.tail()}")


def start_moto(env: dict, log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    svc = Service("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                  env, log_dir)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/moto-api/", svc, 30)
    return svc, endpoint


def start_prefect_server(env: dict, log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    svc = Service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                                     "127.0.0.1", "--port", str(port)], env, log_dir)
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", svc, 120)  # 8 s quiet, ~35 s on a busy 2-core machine
    return svc, api


def start_worker(pool: str, env: dict, log_dir: Path, name: str | None = None) -> Service:
    return Service(name or f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool",
                                              pool, "--type", "process"], env, log_dir)


def flow_run_pids(flow_run_id) -> list[int]:
    """Processes started for a flow run (a worker gives them PREFECT__FLOW_RUN_ID)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def run_cli(args: list[str], env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout_s)


def run_deploy_script(env: dict, gpu_slots: int) -> subprocess.CompletedProcess:
    """deployments/deploy.sh, what `make deploy` runs: pools, concurrency limit, deployments."""
    return subprocess.run([str(REPO / "deployments" / "deploy.sh")], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env={**env, "PREFECT": str(BIN / "prefect"),
                               "GPU_SLOTS": str(gpu_slots)})
