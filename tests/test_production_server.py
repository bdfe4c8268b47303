"""The production server stack of docs/operations.md, for real on 127.0.0.1: PostgreSQL as the
database (migrated once, by `prefect server database upgrade`), Redis for messaging, event
ordering, concurrency leases and the docket, two API servers started with `--no-services`
sharing them, and the background services in a process of their own.

The restart test is the one that matters at scale: the `gpu` slots a run holds are leases, and
Prefect's default lease storage lives in the API process's memory, so after a restart the
release of an unknown lease does nothing and the slot stays held forever (every later run
waits). With Redis lease storage the lease outlives the API process. Catches: a server stack
without `PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage` (the slot is
still held at the end), and API servers that do not share one database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from e2e_services import (
    REPO,
    Postgres,
    production_env,
    run_cli,
    start_prefect_api,
    start_prefect_services,
    start_redis,
)

pytestmark = pytest.mark.e2e

HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from prefect import flow
    from prefect.runtime import flow_run
    from tasks.gpus import GpuSlots

    ready, go = Path(sys.argv[1]), Path(sys.argv[2])

    @flow(name="holds-a-gpu")
    def hold():
        with GpuSlots(1):
            ready.write_text(str(flow_run.id))
            while not go.exists():
                time.sleep(0.2)

    hold()
""")

# The holders of the `gpu` limit's leases, as the server's lease storage (Redis) keeps them.
HOLDERS = textwrap.dedent("""
    import asyncio, json, sys
    from uuid import UUID
    from prefect_redis.lease_storage import ConcurrencyLeaseStorage

    async def main():
        held = await ConcurrencyLeaseStorage().list_holders_for_limit(UUID(sys.argv[1]))
        print(json.dumps([holder.model_dump(mode="json") for _, holder in held]))

    asyncio.run(main())
""")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("production")
    env = {**os.environ, "PREFECT_HOME": str(base / "home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    started = []
    postgres = Postgres()
    try:
        redis, redis_url = start_redis(env, base)
        started.append(redis)
        server_env = production_env(env, postgres.url, redis_url)
        migrated = run_cli(["server", "database", "upgrade", "-y"], server_env)
        assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
        apis = []
        for name in ("api-1", "api-2"):
            svc, url = start_prefect_api(server_env, base, name)
            started.append(svc)
            apis.append((svc, url))
        started.append(start_prefect_services(server_env, base))
        yield {"base": base, "env": env, "server_env": server_env, "apis": apis,
               "postgres": postgres, "started": started}
    finally:
        for svc in reversed(started):
            svc.stop()
        postgres.stop()


def _cli(stack, api: str, *args: str) -> subprocess.CompletedProcess:
    out = run_cli(list(args), {**stack["env"], "PREFECT_API_URL": api})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def _gpu_limit(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name("gpu")


def _active_slots(stack, api: str) -> int:
    return _gpu_limit(api).active_slots


def test_two_api_servers_share_one_migrated_postgres_database(stack):
    (_, first), (_, second) = stack["apis"]
    _cli(stack, first, "gcl", "create", "gpu", "--limit", "2")
    assert _gpu_limit(second).limit == 2  # written through one, read through the other
    postgres = stack["postgres"]
    assert postgres.sql("select count(*) from information_schema.tables "
                        "where table_name = 'flow_run'", database="prefect") == "1"
    assert postgres.sql("select extname from pg_extension where extname = 'pg_trgm'",
                        database="prefect") == "pg_trgm"


def _holders(stack, api: str) -> list[dict]:
    import json

    out = subprocess.run([sys.executable, "-c", HOLDERS, str(_gpu_limit(api).id)],
                         env=stack["server_env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _hold(stack, url: str, name: str) -> tuple[subprocess.Popen, Path, Path]:
    ready, go = stack["base"] / f"{name}-ready", stack["base"] / f"{name}-go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(go)],
                            env={**stack["env"], "PREFECT_API_URL": url}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    return proc, ready, go


def test_a_wait_for_gpu_slots_ends_in_a_clear_error_and_the_holder_is_the_flow_run(stack):
    """Catches a wait with no timeout (this test would hang, then fail on its own timeout)
    and slots held anonymously (the UI could not say which run holds a GPU)."""
    (_, url), (_, other) = stack["apis"]
    _cli(stack, url, "gcl", "update", "gpu", "--limit", "1")
    holder, ready, go = _hold(stack, url, "first")
    try:
        assert _holders(stack, other) == [{"type": "flow_run", "id": ready.read_text()}]
        started = time.time()
        waiter = subprocess.run([sys.executable, "-c", HOLDER, str(stack["base"] / "never"),
                                 str(stack["base"] / "never-go")], cwd=REPO, timeout=300,
                                env={**stack["env"], "PREFECT_API_URL": url,
                                     "LAYERPRUNE_GPU_WAIT_S": "5"},
                                capture_output=True, text=True)
        assert waiter.returncode != 0 and time.time() - started < 120
        assert "no 1 slot(s) of the `gpu` concurrency limit came free within 5 s " \
               "(LAYERPRUNE_GPU_WAIT_S)" in waiter.stdout + waiter.stderr
        assert not (stack["base"] / "never").exists()
    finally:
        go.write_text("go")
        holder.communicate(timeout=120)
    _cli(stack, url, "gcl", "update", "gpu", "--limit", "2")


def test_gpu_slots_survive_an_api_server_restart(stack):
    (api, url), (_, other) = stack["apis"]
    base = stack["base"]
    ready, go = base / "ready", base / "go"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(go)],
                              env={**stack["env"], "PREFECT_API_URL": url}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline, holder.stdout.read()
            time.sleep(0.2)
        assert _active_slots(stack, other) == 1
        port = url.rsplit(":", 1)[1].split("/")[0]
        api.stop()  # the API server the run talks to goes away, and comes back
        restarted, again = start_prefect_api(stack["server_env"], base, "api-1-again",
                                             port=int(port))
        stack["started"].append(restarted)
        assert again == url
        go.write_text("go")
        output, _ = holder.communicate(timeout=120)
        assert holder.returncode == 0, output[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
    deadline = time.time() + 30
    while _active_slots(stack, other) and time.time() < deadline:
        time.sleep(0.5)
    assert _active_slots(stack, other) == 0  # released: the lease was found after the restart
