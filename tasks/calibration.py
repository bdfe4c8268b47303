"""Prefect task: sample and tokenize calibration text (layerprune.method.calibration)."""

from __future__ import annotations

from layerprune.config import CalibrationSpec, ModelSpec
from layerprune.method import calibration
from layerprune.method.data import source_fingerprint as data_fingerprint
from layerprune.models.loading import load_tokenizer
from tasks.common import run_stage, stage_task

STAGE, VERSION = "calibration", 1


def key_params(model_info: dict, spec: CalibrationSpec) -> dict:
    # The tokenizer is part of the model, so the model's fingerprint is in the key.
    return {"model": model_info["fingerprint"], "data": data_fingerprint(spec.data),
            **spec.model_dump(exclude={"data"})}


@stage_task(STAGE, VERSION, key_params)
def calibrate(store_root: str, model: ModelSpec, model_info: dict,
              spec: CalibrationSpec) -> dict:
    def build(out):
        tokenizer = load_tokenizer(model.ref, model.trust_remote_code)
        return calibration.build(spec.data, tokenizer, spec.samples, spec.seq_len, out,
                                 spec.seed, spec.text_field)

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, spec), build)
