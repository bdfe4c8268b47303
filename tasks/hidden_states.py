"""Prefect task: last-token residual streams entering every layer (layerprune.hidden_states)."""

from __future__ import annotations

from layerprune import calibration, hidden_states
from layerprune.config import ModelSpec
from tasks.common import (model_in_memory, model_lock, progress_reporter, run_stage,
                          stage_files, stage_task)

STAGE, VERSION = "hidden_states", 1


def key_params(model_info: dict, model: ModelSpec, tokens: dict) -> dict:
    # Batch size, padding side and device do not change the result (tested), so they are not
    # part of the key; the dtype does.
    return {"model": model_info["fingerprint"], "dtype": model.dtype, "tokens": tokens["key"]}


@stage_task(STAGE, VERSION, key_params)
def extract_hidden_states(store_root: str, model: ModelSpec, model_info: dict, tokens: dict,
                          batch_size: int = 8) -> dict:
    def build(out):
        ids = calibration.load_tokens(stage_files(store_root, tokens))
        with model_lock():
            loaded = model_in_memory(model)
            return hidden_states.extract(loaded, ids, out, batch_size,
                                         progress=progress_reporter("hidden states"))

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, model, tokens), build)
