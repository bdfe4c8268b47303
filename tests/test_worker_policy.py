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


def test_every_flow_asks_before_any_work(tmp_path, tiny_models, weights_must_not_load,
                                         monkeypatch):
    """The flows call the check first: a run asking for remote code, or a sweep naming a path
    outside the allowed roots, is refused before a model or a store is touched (the tripwire
    fails the test if weights start to load; the store root is never created)."""
    from flows.heal import heal_one
    from flows.prune_and_heal import prune_and_heal
    from flows.sweep import sweep
    from layerprune.config import HealSpec

    monkeypatch.delenv(REMOTE_CODE_ENV, raising=False)
    store = tmp_path / "store"
    hostile = _params(tmp_path, ref=tiny_models["llama"], trust_remote_code=True)
    with pytest.raises(LayerPruneError, match=REMOTE_CODE_ENV):
        prune_and_heal.fn(hostile)
    with pytest.raises(LayerPruneError, match=REMOTE_CODE_ENV):
        heal_one.fn(str(store), hostile.model, {}, {}, HealSpec(), "lora")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "allowed"))
    with pytest.raises(LayerPruneError, match="models.0"):
        sweep.fn(SweepParams(models=[tiny_models["llama"]], artifacts=str(store)))
    assert not store.exists()
