"""Describe the source model: its fingerprint (the key every later stage builds on) and depth.

Not cached: hashing the weights is what tells whether anything else can be.
"""

from __future__ import annotations

from prefect import task

from layerprune.config import ModelSpec
from layerprune.models import check_architecture, fingerprint, read_config


@task(name="describe-model", retries=1)
def describe_model(model: ModelSpec) -> dict:
    num_layers = check_architecture(model.ref, model.trust_remote_code)
    config = read_config(model.ref, model.trust_remote_code)
    return {"ref": model.ref, "fingerprint": fingerprint(model.ref), "num_layers": num_layers,
            "architecture": (config.architectures or [config.model_type])[0]}
