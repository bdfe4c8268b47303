"""The work pools' base job templates (deployments/*-pool.json): whoever can call the Prefect API
can start runs with job variables, so nothing a run may set grants host access or picks the
code a worker executes. A real Prefect server refuses such job variables when the run is
created, before any worker sees it.

Catches: a template that still offers `command`, `image`, `privileged`, `volumes`,
`network_mode`, `namespace`, `service_account_name` or `cluster_config` as a variable (or
accepts unknown ones), and an `env` that would let a run set `LAYERPRUNE_ALLOW_REMOTE_CODE`,
`LD_PRELOAD` or `PYTHONPATH`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect.testing.utilities import prefect_test_harness

from tests.test_orchestration_units import _render

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = {name: json.loads((REPO / "deployments" / f"{name}.json").read_text())
             for name in ("process-pool", "docker-gpu-pool", "kubernetes-gpu-pool")}
HOST_ACCESS = ("command", "working_dir", "image", "registry_credentials", "privileged",
               "volumes", "network_mode", "networks", "namespace", "service_account_name",
               "cluster_config")
HOSTILE_ENV = ("LAYERPRUNE_ALLOW_REMOTE_CODE", "LAYERPRUNE_ALLOWED_ROOTS", "LD_PRELOAD",
               "PYTHONPATH", "AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("name", TEMPLATES)
def test_no_job_variable_grants_host_access(name):
    template = TEMPLATES[name]
    variables = template["variables"]
    assert variables["additionalProperties"] is False
    assert not set(HOST_ACCESS) & set(variables["properties"])
    rendered = _render(template)  # what a worker runs with the defaults
    assert rendered.get("privileged", False) is False and not rendered.get("volumes")
    for key in HOST_ACCESS:
        with pytest.raises(jsonschema.ValidationError):
            _render(template, **{key: "anything"})
    for key in HOSTILE_ENV:
        with pytest.raises(jsonschema.ValidationError):
            _render(template, env={key: "1"})
    assert _render(template, env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                   gpu_count=2)["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


def test_kubernetes_namespace_and_account_are_the_templates():
    template = TEMPLATES["kubernetes-gpu-pool"]
    job = _render(template)["job_manifest"]
    assert job["metadata"]["namespace"] == _render(template)["namespace"] == "default"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "args" not in container  # the worker's own command, not a run's


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_a_real_server_refuses_hostile_job_variables_at_submission(prefect_api):
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name="gpu-hardened", type="process",
            base_job_template=TEMPLATES["process-pool"]))
        flow_id = client.create_flow_from_name("prune-and-heal")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="hardened", work_pool_name="gpu-hardened",
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}})
        for hostile in ({"command": "sh -c 'touch /tmp/pwned'"}, {"working_dir": "/"},
                        {"env": {"LAYERPRUNE_ALLOW_REMOTE_CODE": "1"}},
                        {"env": {"LD_PRELOAD": "/tmp/evil.so"}}):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment_id,
                                                       job_variables=hostile)
            assert refused.value.response.status_code in (409, 422), hostile
        run = client.create_flow_run_from_deployment(  # tuning and GPU count: fine
            deployment_id, job_variables={"gpu_count": 2, "env": {"OMP_NUM_THREADS": "4"}})
        assert run.job_variables == {"gpu_count": 2, "env": {"OMP_NUM_THREADS": "4"}}
