"""Prefect task: next-token loss of the base model or a pruned recipe (layerprune.loss)."""

from __future__ import annotations

import contextlib

from layerprune import calibration, loss
from layerprune.config import LossSpec, ModelSpec
from layerprune.data import fingerprint as data_fingerprint
from layerprune.data import read_records
from layerprune.io import write_json_atomic
from layerprune.prune import removed_layers
from tasks.common import (model_in_memory, model_lock, progress_reporter, run_stage,
                          stage_task)

STAGE, VERSION = "loss", 1


def _removed(recipe: dict | None) -> list[int]:
    return recipe["meta"]["removed_layers"] if recipe else []


def key_params(model_info: dict, model: ModelSpec, recipe: dict | None, spec: LossSpec) -> dict:
    # Keyed by the removed layers, not the recipe: when both strategies pick the same block,
    # the model is evaluated once.
    return {"model": model_info["fingerprint"], "dtype": model.dtype,
            "removed_layers": _removed(recipe), "data": data_fingerprint(spec.data),
            **spec.model_dump(exclude={"data"})}


@stage_task(STAGE, VERSION, key_params)
def evaluate_loss(store_root: str, model: ModelSpec, model_info: dict, recipe: dict | None,
                  spec: LossSpec, batch_size: int = 8) -> dict:
    drop = _removed(recipe)

    def build(out):
        texts = read_records(spec.data, limit=spec.samples, text_field=spec.text_field)
        with model_lock():
            loaded = model_in_memory(model)
            ids = calibration.tokenize(texts, loaded.tokenizer, spec.seq_len)
            view = removed_layers(loaded.model, drop) if drop else contextlib.nullcontext()
            with view:
                result = loss.next_token_loss(loaded.model, loaded.tokenizer, ids, batch_size,
                                              progress=progress_reporter("loss"))
        write_json_atomic(out / "loss.json", result)
        return {**result, "removed_layers": drop}

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, model, recipe, spec),
                     build)
