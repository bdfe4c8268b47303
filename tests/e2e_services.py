"""Real services for the end-to-end tests (test_orchestration.py): an S3 endpoint (moto), a
Prefect server and process workers.

Each service runs in its own session (process group) with its output in a log file, so stopping
it (SIGTERM to the group, SIGKILL after a grace period) also ends the flow-run processes a worker
started. Everything binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import shutil
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


# --- the production server stack (docs/operations.md, "Production server") -------------------
# PostgreSQL for the database, Redis for messaging, event ordering, concurrency leases and the
# docket, API servers started with --no-services and the background services once.

def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries installed (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql "
                           "(Debian package postgresql; `make services` installs it)")
    return found[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:`port`, with database `prefect` and the
    pg_trgm extension Prefect needs, in a temporary directory of its own (the `postgres` user
    must reach it, which pytest's private tmp directories do not allow); `stop()` removes it."""

    def __init__(self):
        import tempfile

        base = self.base = Path(tempfile.mkdtemp(prefix="layerprune-postgres-"))
        self.data, self.sockets, self.port = base / "pgdata", base / "pgsock", free_port()
        self.log = base / "postgres.log"
        for d in (base, self.data, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(base, "postgres")
            for d in (self.data, self.sockets):
                shutil.chown(d, "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres")
        bin_dir = postgres_bin()
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(self.data), "-A",
                                     "trust", "-U", "postgres"]),
                       check=True, capture_output=True, timeout=120)
        self._pg_ctl = bin_dir / "pg_ctl"
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
        subprocess.run(_as_postgres([str(self._pg_ctl), "-D", str(self.data), "-o", options,
                                     "-l", str(self.log), "-w", "start"]),
                       check=True, capture_output=True, timeout=120)
        self.sql("create database prefect")
        self.sql("create extension if not exists pg_trgm", database="prefect")

    def sql(self, statement: str, database: str = "postgres") -> str:
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", database, "-tAc", statement], check=True, text=True,
                             capture_output=True, timeout=60)
        return out.stdout.strip()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self._pg_ctl), "-D", str(self.data), "-m", "fast",
                                     "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def start_redis(env: dict, log_dir: Path) -> tuple[Service, str]:
    """redis-server on 127.0.0.1, nothing persisted (Debian's `redis-server`)."""
    port = free_port()
    svc = Service("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"], env, log_dir)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return svc, f"redis://127.0.0.1:{port}"
        except OSError:
            if not svc.alive():
                raise RuntimeError(f"redis exited:\n{svc.tail()}") from None
            time.sleep(0.2)
    raise TimeoutError(f"redis not answering on {port}:\n{svc.tail()}")


def production_env(env: dict, database_url: str, redis_url: str) -> dict:
    """The environment of every API server and of the services process (docs/operations.md)."""
    return {**env,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",  # `database upgrade`, once
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_URL": f"{redis_url}/0",
            "PREFECT_SERVER_DOCKET_URL": f"{redis_url}/1"}


def start_prefect_api(env: dict, log_dir: Path, name: str = "prefect-api",
                      port: int | None = None) -> tuple[Service, str]:
    """One API server without background services (several may share one database)."""
    port = port or free_port()
    svc = Service(name, [str(BIN / "prefect"), "server", "start", "--no-services", "--host",
                         "127.0.0.1", "--port", str(port)], env, log_dir)
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", svc, 120)
    return svc, api


def start_prefect_services(env: dict, log_dir: Path) -> Service:
    """The background services (scheduler, repossessor of expired leases, ...), run once."""
    return Service("prefect-services", [str(BIN / "prefect"), "server", "services", "start"],
                   env, log_dir)


class ProductionServer:
    """The whole production stack of docs/operations.md on 127.0.0.1, as the e2e tests of the
    deployments use it: a throwaway PostgreSQL database migrated once (`prefect server database
    upgrade -y`), Redis, one API server started with `--no-services`, and the background
    services (scheduler, repossessor of expired leases, triggers of automations, ...) in a
    process of their own. `services_env`: settings of the services process only (e.g. a shorter
    repossessor loop). `stop()` stops everything it started, the database last."""

    def __init__(self, env: dict, log_dir: Path, services_env: dict | None = None):
        self.services: list[Service] = []
        self.postgres = Postgres()
        try:
            redis, redis_url = start_redis(env, log_dir)
            self.services.append(redis)
            self.env = production_env(env, self.postgres.url, redis_url)
            migrated = run_cli(["server", "database", "upgrade", "-y"], self.env)
            if migrated.returncode != 0:
                raise RuntimeError("prefect server database upgrade failed:\n"
                                   + migrated.stdout[-2000:] + migrated.stderr[-2000:])
            api, self.api = start_prefect_api(self.env, log_dir)
            self.services.append(api)
            self.services.append(start_prefect_services({**self.env, **(services_env or {})},
                                                        log_dir))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        self.postgres.stop()

    def alive(self) -> list[str]:
        return [s.name for s in self.services if s.alive()]


def start_workers_script(env: dict, log_dir: Path, **settings: str) -> Service:
    """deployments/workers.sh (what `make worker` runs), e.g. GPU_IDS="0" for the workers of a
    one-GPU host (CUDA_VISIBLE_DEVICES=0 is harmless without a GPU). Its workers run in process
    groups of their own (job control); the script stops them when it gets SIGTERM."""
    return Service("workers-sh", [str(REPO / "deployments" / "workers.sh")],
                   {**env, "PREFECT": str(BIN / "prefect"), **settings}, log_dir)
