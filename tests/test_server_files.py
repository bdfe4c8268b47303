"""deployments/server/ says what tests/test_production_server.py runs: the same Prefect server
settings in the compose file and the Helm values as in `e2e_services.production_env`, the same
commands (migrations once, API servers without services, the services once), and no secret in
any committed file. Catches a compose stack that drifted from the tested one (a lease storage
or broker left out, migrations on every API start) or a password typed into a file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from e2e_services import production_env

SERVER = Path(__file__).resolve().parent.parent / "deployments" / "server"
TESTED = set(production_env({}, "postgresql+asyncpg://u@h/db", "redis://h:1"))


def _compose() -> dict:
    return yaml.safe_load((SERVER / "compose.yaml").read_text())


def test_compose_runs_the_tested_stack():
    compose = _compose()
    services = compose["services"]
    env = compose["x-prefect-env"]
    assert TESTED <= set(env), TESTED - set(env)
    assert env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] == "false"
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"
    assert services["migrate"]["command"] == ["prefect", "server", "database", "upgrade", "-y"]
    apis = [s for s in services.values() if "--no-services" in s.get("command", [])]
    assert len(apis) == 2 and all(s["environment"] == env for s in apis)
    assert services["services"]["command"] == ["prefect", "server", "services", "start"]
    assert services["postgres"]["image"].split(":")[1] >= "14"  # Prefect needs >= 14.9
    assert "pg_trgm" in (SERVER / "postgres-init.sql").read_text()
    haproxy = (SERVER / "haproxy.cfg").read_text()
    assert "option httpchk GET /api/health" in haproxy
    assert len(re.findall(r"^\s*server api-\d", haproxy, re.M)) == 2
    assert services["proxy"]["ports"] == ["127.0.0.1:4200:4200"]  # TLS in front, not clear


def test_helm_values_set_the_same_server_settings():
    values = yaml.safe_load((SERVER / "helm" / "prefect-server-values.yaml").read_text())
    names = {e["name"] for e in values["server"]["env"]}
    # the connection URL comes from the chart's database secret; the rest are ours
    assert TESTED - {"PREFECT_SERVER_DATABASE_CONNECTION_URL"} <= names
    assert values["backgroundServices"]["runAsSeparateDeployment"] is True
    assert values["server"]["replicaCount"] >= 2 and values["migrations"]["enabled"]
    assert values["server"]["basicAuth"]["enabled"] and values["server"]["basicAuth"][
        "existingSecret"]


def test_no_secret_is_committed():
    for path in SERVER.rglob("*"):
        if path.is_file() and path.name != "env.example":
            text = re.sub(r"\$\{[^}]*\}", "", path.read_text())  # ${VAR}: from .env
            assert not re.search(r"(?i)password[\"']?\s*[:=][ \t]*[^\s]", text), path
            assert "change-me" not in text, path
