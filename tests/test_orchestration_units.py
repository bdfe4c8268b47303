"""Fast checks of the orchestration pieces that need no services: sweep parameters, S3 options,
result storage location, deployment files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from layerprune.config import PruneAndHealParams, SweepParams
from layerprune.remote import (S3_CLIENT_CONFIG, StoreUnavailable, check_reachable,
                               storage_options_from_env)
from tasks.results import block_name, result_storage_for
from tasks.sweep import model_label

REPO = Path(__file__).resolve().parent.parent


def test_sweep_params_validate_and_fan_out():
    p = SweepParams(models=["a/b", "/x/tiny-llama"], fractions=[0.1, 0.5, 0.9])
    assert p.block_sizes_for(30) == [3, 15, 27]
    assert p.block_sizes_for(4) == [1, 2, 3]  # at least 1, and one layer always remains
    child = p.child("a/b", [3])
    assert isinstance(child, PruneAndHealParams)
    assert child.model.ref == "a/b" and child.prune.block_sizes == [3]
    assert child.artifacts == p.artifacts
    assert SweepParams(block_sizes=[2, 1, 2]).block_sizes_for(0) == [1, 2]


@pytest.mark.parametrize("bad, field", [
    ({"models": []}, "models"),
    ({"fractions": [0.0]}, "fractions"),
    ({"fractions": [1.5]}, "fractions"),
    ({"block_sizes": [0]}, "block_sizes"),
    ({"fractions": [0.2], "block_sizes": [2]}, "not both"),
    ({"deployment": "no-slash"}, "deployment"),
    ({"batch_size": 0}, "batch_size"),
    ({"child_timeout_s": 5}, "child_timeout_s"),
])
def test_bad_sweep_params_name_the_parameter(bad, field):
    with pytest.raises(ValueError, match=field):
        SweepParams.model_validate(bad)


def test_model_labels_are_short_unless_ambiguous():
    refs = ["/tmp/a/tiny-llama", "/tmp/b/tiny-gpt2", "HuggingFaceTB/SmolLM2-135M"]
    assert [model_label(r, refs) for r in refs] == ["tiny-llama", "tiny-gpt2", refs[2]]
    clash = ["/a/model", "/b/model"]
    assert [model_label(r, clash) for r in clash] == clash


def test_s3_options_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage_options_from_env("/local/dir") == {}
    opts = storage_options_from_env("s3://bucket/prefix")
    assert opts == {"config_kwargs": S3_CLIENT_CONFIG,
                    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the S3-specific wins
    assert storage_options_from_env("s3://b")["client_kwargs"]["endpoint_url"].endswith(":10")
    assert "client_kwargs" not in storage_options_from_env("s3://b", with_endpoint=False)
    assert "secret" not in json.dumps(opts).lower()  # credentials stay with botocore


def test_local_results_live_next_to_the_artifacts(tmp_path):
    storage = result_storage_for(str(tmp_path / "store"))
    assert Path(storage.basepath) == tmp_path / "store" / "prefect-results"
    assert block_name("s3://b/p") == block_name("s3://b/p") != block_name("s3://b/q")
    check_reachable(str(tmp_path / "new" / "store"))  # creates the directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable, match="artifacts: cannot create"):
        check_reachable(str(tmp_path / "file" / "store"))


def test_deployments_file_matches_the_flows():
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert deps["default"]["entrypoint"] == "flows/prune_and_heal.py:prune_and_heal"
    assert deps["default"]["work_pool"]["name"] == "gpu"
    assert deps["nightly"]["entrypoint"] == "flows/sweep.py:sweep"
    assert deps["nightly"]["work_pool"]["name"] == "cpu"
    assert all(d["enforce_parameter_schema"] for d in deps.values())
    assert deps["nightly"]["schedules"][0]["timezone"]
    SweepParams.model_validate(deps["nightly"]["parameters"]["params"])  # defaults are valid
    docker = json.loads((REPO / "deployments" / "docker-gpu-pool.json").read_text())
    assert docker["job_configuration"]["container_create_kwargs"]["device_requests"]
    k8s = json.loads((REPO / "deployments" / "kubernetes-gpu-pool.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"][0]
    assert "nvidia.com/gpu" in container["resources"]["limits"]


def test_a_store_that_stops_answering_mid_stage_fails_with_one_clear_error(monkeypatch,
                                                                           tmp_path):
    import socket

    from layerprune.store import ArtifactStore

    with socket.socket() as s:  # a loopback port nobody listens on: every connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = ArtifactStore("s3://bucket/prefix")
    with pytest.raises(StoreUnavailable, match=r"reading eval/abc/manifest.json in "
                                               r"'s3://bucket/prefix' failed after bounded"):
        store.manifest("eval", "abc")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(StoreUnavailable, match="publishing eval/abc in 's3://bucket/prefix'"):
        store.publish("eval", "abc", out, {})
    assert (out / "metrics.json").exists()  # the stage's output is kept for a retry
