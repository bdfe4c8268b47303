"""Prefect task: choose the block to drop and store the pruned model (layerprune.prune).

The artifact is a recipe (source fingerprint + removed layers, a few hundred bytes); a full
checkpoint is written only when asked (`export=True`), since evaluation applies the recipe to the
source model already in memory. The checkpoint is cut from the source's safetensors files on disk
when it has them (`prune.write_pruned`), from the model in memory otherwise.
"""

from __future__ import annotations

from pathlib import Path

from layerprune import distances as dist
from layerprune import prune
from layerprune.config import ModelSpec
from layerprune.io import write_json_atomic
from tasks.common import model_in_memory, model_lock, run_stage, stage_files, stage_task

STAGE, VERSION = "prune", 1
RECIPE_FILE = "recipe.json"


def key_params(model_info: dict, distances: dict, n: int, strategy: str, export: bool) -> dict:
    # The heuristic ignores the distances, so its recipe does not depend on them.
    return {"model": model_info["fingerprint"], "n": n, "strategy": strategy, "export": export,
            "distances": distances["key"] if strategy == "similarity" else None}


@stage_task(STAGE, VERSION, key_params, task_run_name="prune-{strategy}-n{n}")
def prune_model(store_root: str, model: ModelSpec, model_info: dict, distances: dict, n: int,
                strategy: str, export: bool = False) -> dict:
    prune.check_block_size(n, model_info["num_layers"])

    def build(out: Path):
        doc = dist.load(stage_files(store_root, distances))
        drop = prune.choose_block(strategy, n, doc["num_layers"], doc["distance"])
        recipe = {"source": model.ref, "source_fingerprint": model_info["fingerprint"],
                  "num_layers": model_info["num_layers"], "removed_layers": drop,
                  "strategy": strategy, "n": n,
                  "fraction": n / model_info["num_layers"],
                  "block_distance": doc["distance"][n - 1][drop[0]]}
        write_json_atomic(out / RECIPE_FILE, recipe)
        if export:  # by surgery on disk when the source is a safetensors checkpoint
            prune.write_pruned(model.ref, drop, out / "checkpoint",
                               {"strategy": strategy, "block_size": n,
                                "block_distance": recipe["block_distance"],
                                "calibration_samples": doc["n_samples"]},
                               dtype=model.dtype, load=lambda: model_in_memory(model),
                               lock=model_lock())
        return recipe

    return run_stage(store_root, STAGE, VERSION,
                     key_params(model_info, distances, n, strategy, export), build)
