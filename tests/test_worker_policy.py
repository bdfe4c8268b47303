"""What a flow run may ask of its worker (layerprune/config/worker.py): remote code only with the
worker's consent, local paths only under the worker's allowed roots. Hostile input: a run that
sets trust_remote_code, a model path outside the roots, a symlink inside a root that leads out,
an artifact root elsewhere on the host. Catches a check that reads the run's own parameters or
job variables for consent, compares unresolved paths, or forgets a field."""

from __future__ import annotations

import os

import pytest

from layerprune.config import ModelSpec, PruneAndHealParams, SweepParams
from layerprune.config.worker import ALLOWED_ROOTS_ENV, REMOTE_CODE_ENV, check_for_worker
from layerprune.errors import LayerPruneError


def _params(tmp_path, **model) -> PruneAndHealParams:
    return PruneAndHealParams(model=ModelSpec(**model), artifacts=str(tmp_path / "store"))


def test_remote_code_needs_the_workers_consent(tmp_path):
    hostile = _params(tmp_path, ref="org/model", trust_remote_code=True)
    with pytest.raises(LayerPruneError, match=f"model.trust_remote_code: .*{REMOTE_CODE_ENV}=1"):
        check_for_worker(hostile, environ={})
    with pytest.raises(LayerPruneError, match=REMOTE_CODE_ENV):
        check_for_worker(hostile, environ={REMOTE_CODE_ENV: "true"})  # exactly 1, nothing else
    check_for_worker(hostile, environ={REMOTE_CODE_ENV: "1"})
    check_for_worker(_params(tmp_path, ref="org/model"), environ={})  # nothing asked


def test_local_paths_stay_under_the_allowed_roots(tmp_path):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    (allowed / "model").mkdir(parents=True)
    (elsewhere / "model").mkdir(parents=True)
    (allowed / "escape").symlink_to(elsewhere / "model")
    env = {ALLOWED_ROOTS_ENV: f"/nonexistent{os.pathsep}{allowed}"}
    store = str(allowed / "store")

    def run(ref, data="bundled:wiki-calibration", artifacts=store):
        p = PruneAndHealParams(model=ModelSpec(ref=ref), artifacts=artifacts,
                               calibration={"data": data})
        check_for_worker(p, environ=env)

    run(str(allowed / "model"))
    run("org/model")  # a hub id
    run("bundled:SmolLM2-135M-Instruct", artifacts="s3://bucket/prefix")
    for ref, name in ((str(elsewhere / "model"), "model.ref"),
                      (str(allowed / "escape"), "model.ref"),  # a symlink that leads out
                      (str(allowed / ".." / "elsewhere" / "model"), "model.ref")):
        with pytest.raises(LayerPruneError, match=f"{name}: .*{ALLOWED_ROOTS_ENV}"):
            run(ref)
    with pytest.raises(LayerPruneError, match="calibration.data"):
        run(str(allowed / "model"), data="/etc/passwd")
    with pytest.raises(LayerPruneError, match="artifacts"):
        run(str(allowed / "model"), artifacts=str(elsewhere / "store"))
    check_for_worker(PruneAndHealParams(model=ModelSpec(ref=str(elsewhere / "model")),
                                        artifacts=store), environ={})  # unset: any path


def test_a_sweep_checks_every_model(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    sweep = SweepParams(models=["org/a", str(tmp_path / "b")], artifacts=str(allowed / "s"))
    with pytest.raises(LayerPruneError, match="models.1"):
        check_for_worker(sweep, environ={ALLOWED_ROOTS_ENV: str(allowed)})
