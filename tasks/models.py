"""Describe the source model: its fingerprint (the key every later stage builds on) and depth.

Not cached: hashing the weights is what tells whether anything else can be. A hub model is pinned
here: the commit its revision resolves to now goes into the fingerprint and into `revision`, and
the flow loads that commit in every later stage, so an upstream push mid-run changes nothing.
"""

from __future__ import annotations

from prefect import task

from layerprune.config import ModelSpec
from layerprune.models.loading import check_architecture, fingerprint, pinned_revision, read_config


@task(name="describe-model", retries=1)
def describe_model(model: ModelSpec) -> dict:
    revision = pinned_revision(model.ref, model.revision)
    num_layers = check_architecture(model.ref, model.trust_remote_code, revision)
    config = read_config(model.ref, model.trust_remote_code, revision)
    return {"ref": model.ref, "revision": revision,
            "fingerprint": fingerprint(model.ref, revision), "num_layers": num_layers,
            "architecture": (config.architectures or [config.model_type])[0]}


def pinned(model: ModelSpec, model_info: dict) -> ModelSpec:
    """`model` at the commit `describe_model` resolved (unchanged for local models)."""
    return model.model_copy(update={"revision": model_info["revision"]})
