"""Prefect task: one metric (next-token loss or an lm-eval benchmark) of one model variant.

A variant is the source model with a block of layers removed (a prune recipe) or a healed
checkpoint; `removed_layers` is applied to the model already in memory, so every variant of a
model costs one load. One task run per (variant, metric): adding a benchmark to a run computes
only that benchmark.
"""

from __future__ import annotations

import contextlib

from layerprune.config import LossSpec, ModelSpec
from layerprune.evaluate import benchmarks, run
from layerprune.method.data import source_fingerprint as data_fingerprint
from layerprune.method.prune import describe_layers, removed_layers
from tasks.common import model_in_memory, model_lock, numerics_key, run_stage, stage_task

STAGE, VERSION = "eval", 1


def key_params(model_info: dict, model: ModelSpec, drop: list[int], task: str,
               limit: int | None, shots: int | None, loss: LossSpec) -> dict:
    # Keyed by the removed layers, not the recipe: when both strategies pick the same block,
    # the variant is evaluated once.
    params = {"model": model_info["fingerprint"], **numerics_key(model), "removed_layers": drop,
              "task": task}
    if task == "loss":
        params.update(data=data_fingerprint(loss.data), samples=loss.samples,
                      seq_len=loss.seq_len, text_field=loss.text_field)
    else:
        params.update(limit=limit, shots=shots)
    return params


def run_name() -> str:
    """e.g. eval-mmlu-base, eval-loss-drop-12-17, eval-loss-drop-3,7,9,
    eval-boolq-similarity-n6-lora (a healed model: its `model_info["variant"]`), shown in the
    Prefect UI."""
    from prefect.runtime import task_run

    p = task_run.parameters
    drop, info = p["drop"], p["model_info"]
    variant = info.get("variant") or (f"drop-{describe_layers(drop)}" if drop else "base")
    return f"eval-{p['task']}-{variant}"


@stage_task(STAGE, VERSION, key_params, task_run_name=run_name)
def evaluate_variant(store_root: str, model: ModelSpec, model_info: dict, drop: list[int],
                     task: str, limit: int | None = None, shots: int | None = None,
                     loss: LossSpec = LossSpec(), batch_size: int = 8) -> dict:
    def build(out):
        with model_lock():
            loaded = model_in_memory(model)
            view = removed_layers(loaded.model, drop) if drop else contextlib.nullcontext()
            with view:
                metrics = run.evaluate(
                    loaded.model, loaded.tokenizer, [task], limit=limit, shots=shots,
                    batch_size=batch_size, loss_data=loss.data, loss_seq_len=loss.seq_len,
                    loss_samples=loss.samples, loss_text_field=loss.text_field)
        benchmarks.write_metrics(metrics, out)
        return {**metrics[task], "task": task, "removed_layers": drop}

    return run_stage(store_root, STAGE, VERSION,
                     key_params(model_info, model, drop, task, limit, shots, loss), build)
