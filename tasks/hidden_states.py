"""Prefect task: last-token residual streams entering every layer (layerprune.method.hidden_states)."""

from __future__ import annotations

from layerprune.config import ExtractionSpec, ModelSpec
from layerprune.method import calibration, hidden_states, streaming
from layerprune.method.batching import pad_token_id
from layerprune.models.loading import load_tokenizer
from tasks.common import (
    model_in_memory,
    model_lock,
    numerics_key,
    progress_reporter,
    run_stage,
    stage_files,
    stage_task,
)

STAGE, VERSION = "hidden_states", 1


def key_params(model_info: dict, model: ModelSpec, tokens: dict) -> dict:
    # Batch size, padding side, device and extraction (in memory or streamed) do not change the
    # result (tested), so they are not part of the key; the dtype does.
    return {"model": model_info["fingerprint"], **numerics_key(model), "tokens": tokens["key"]}


@stage_task(STAGE, VERSION, key_params)
def extract_hidden_states(store_root: str, model: ModelSpec, model_info: dict, tokens: dict,
                          batch_size: int = 8, extraction: ExtractionSpec | None = None) -> dict:
    # `extraction` is not in the key: streamed and in-memory passes give the same states
    # (tests/test_streaming.py), so either one's artifact serves both.
    extraction = extraction or ExtractionSpec()

    def build(out):
        ids = calibration.load_tokens(stage_files(store_root, tokens))
        progress = progress_reporter("hidden states")
        with model_lock():
            mode = streaming.extraction_for(model, len(ids), max(map(len, ids)), batch_size,
                                            extraction.mode, extraction.max_memory)
            if mode == "in-memory":
                return hidden_states.extract(model_in_memory(model), ids, out, batch_size,
                                             progress=progress)
            pad = pad_token_id(load_tokenizer(model.ref, model.trust_remote_code, model.revision))
            states = streaming.last_token_states_streamed(
                model.ref, ids, batch_size, pad_id=pad, max_memory=extraction.max_memory,
                progress=progress, **streaming.streamed_options(model))
            return hidden_states.save_states(states, out)

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, model, tokens), build)
