"""Prefect task: choose the layers to drop and store the pruned model (layerprune.method.prune).

The artifact is a recipe (source fingerprint + removed layers, a few hundred bytes); a full
checkpoint is written only when asked (`export=True`), since evaluation applies the recipe to the
source model already in memory. The checkpoint is cut from the source's safetensors files on disk
when it has them (`surgery.write_pruned`), from the model in memory otherwise.

What a strategy reads: similarity the distances stage, block-influence and greedy-loss the
scores stage (tasks/criteria.py), heuristic nothing, random its seed. Only that input is in the
recipe's key, so e.g. new distances never invalidate a heuristic recipe.
"""

from __future__ import annotations

from pathlib import Path

from layerprune.config import ModelSpec
from layerprune.method import distances as dist
from layerprune.method import prune, surgery
from layerprune.store.files import write_json_atomic
from tasks.common import model_in_memory, model_lock, run_stage, stage_files, stage_task
from tasks.criteria import load_scores

STAGE, VERSION = "prune", 2
RECIPE_FILE = "recipe.json"


def key_params(model_info: dict, distances: dict, n: int, strategy: str, export: bool,
               scores: dict | None, seed: int) -> dict:
    return {"model": model_info["fingerprint"], "n": n, "strategy": strategy, "export": export,
            "distances": distances["key"] if strategy == "similarity" else None,
            "scores": scores["key"] if scores is not None else None,
            "seed": seed if strategy == "random" else None}


def run_name() -> str:
    """e.g. prune-similarity-n6, prune-random-n6-seed2 (shown in the Prefect UI)."""
    from prefect.runtime import task_run

    p = task_run.parameters
    seed = f"-seed{p.get('seed', 0)}" if p["strategy"] == "random" else ""
    return f"prune-{p['strategy']}-n{p['n']}{seed}"


@stage_task(STAGE, VERSION, key_params, task_run_name=run_name)
def prune_model(store_root: str, model: ModelSpec, model_info: dict, distances: dict, n: int,
                strategy: str, export: bool = False, scores: dict | None = None,
                seed: int = 0) -> dict:
    """`scores`: the scores stage's manifest, for block-influence and greedy-loss; `seed`: which
    of the random blocks."""
    prune.check_block_size(n, model_info["num_layers"])

    def build(out: Path):
        doc = dist.load(stage_files(store_root, distances))
        found = load_scores(store_root, scores) if scores is not None else {}
        drop = prune.choose_layers(strategy, n, doc["num_layers"], distance=doc["distance"],
                                   influence=found.get("influence"),
                                   greedy_order=found.get("order"), seed=seed)
        contiguous = drop == list(range(drop[0], drop[0] + n))
        recipe = {"source": model.ref, "source_fingerprint": model_info["fingerprint"],
                  "num_layers": model_info["num_layers"], "removed_layers": drop,
                  "strategy": strategy, "n": n, "seed": seed if strategy == "random" else None,
                  "fraction": n / model_info["num_layers"],
                  # d(x^(l), x^(l+n)) is defined for a contiguous block only
                  "block_distance": doc["distance"][n - 1][drop[0]] if contiguous else None}
        write_json_atomic(out / RECIPE_FILE, recipe)
        if export:  # by surgery on disk when the source is a safetensors checkpoint
            surgery.write_pruned(model.ref, drop, out / "checkpoint",
                               {"strategy": strategy, "block_size": n,
                                "block_distance": recipe["block_distance"],
                                "calibration_samples": doc["n_samples"]},
                               dtype=model.dtype, load=lambda: model_in_memory(model),
                               lock=model_lock())
        return recipe

    return run_stage(store_root, STAGE, VERSION,
                     key_params(model_info, distances, n, strategy, export, scores, seed), build)
