"""Prefect task: per-layer scores that the data-driven block criteria read (layerprune.method.criteria).

- `block-influence` (ShortGPT): 1 - cos(input, output) of every layer, over every token of the
  calibration samples: one forward pass.
- `greedy-loss` (SLEB, BlockPruner): the order in which layers are removed, one at a time, each
  time the one whose removal raises the calibration loss least, up to the run's largest n. The
  drop for any n is the first n of that order, so one stage serves every block size. It costs
  sum_{k<n}(L-k) loss passes over `greedy_samples` records.

The scores go in `scores.json`; the prune stage keys its recipes on this stage's key.
"""

from __future__ import annotations

from layerprune.config import ModelSpec
from layerprune.method import calibration, criteria
from layerprune.method.batching import pad_token_id
from layerprune.store.files import write_json_atomic
from tasks.common import (
    model_in_memory,
    model_lock,
    numerics_key,
    progress_reporter,
    run_stage,
    stage_files,
    stage_task,
)

STAGE, VERSION = "scores", 1
SCORES_FILE = "scores.json"


def key_params(model_info: dict, model: ModelSpec, tokens: dict, criterion: str,
               samples: int | None, n_max: int) -> dict:
    params = {"model": model_info["fingerprint"], **numerics_key(model), "tokens": tokens["key"],
              "criterion": criterion}
    if criterion == "greedy-loss":
        params.update(samples=samples, n_max=n_max)
    return params


@stage_task(STAGE, VERSION, key_params, task_run_name="scores-{criterion}")
def layer_scores(store_root: str, model: ModelSpec, model_info: dict, tokens: dict,
                 criterion: str, samples: int | None = None, n_max: int = 1,
                 batch_size: int = 8) -> dict:
    """`samples`: the first records scored by greedy-loss (block-influence uses all)."""
    if criterion not in criteria.DATA_STRATEGIES:
        raise ValueError(f"criterion must be one of {criteria.DATA_STRATEGIES}, "
                         f"got {criterion!r}")

    def build(out):
        ids = calibration.load_tokens(stage_files(store_root, tokens))
        progress = progress_reporter(criterion)
        with model_lock():
            loaded = model_in_memory(model)
            if criterion == "block-influence":
                doc = {"influence": criteria.block_influence(
                    loaded.model, ids, batch_size, pad_token_id(loaded.tokenizer), progress)}
            else:
                doc = criteria.greedy_loss_order(loaded.model, loaded.tokenizer, ids[:samples],
                                                 n_max, batch_size, progress)
        write_json_atomic(out / SCORES_FILE, {"criterion": criterion, **doc})
        return {"criterion": criterion, "samples": len(ids if samples is None else ids[:samples])}

    return run_stage(store_root, STAGE, VERSION,
                     key_params(model_info, model, tokens, criterion, samples, n_max), build)


def load_scores(store_root: str, manifest: dict) -> dict:
    import json

    return json.loads((stage_files(store_root, manifest) / SCORES_FILE).read_text())
