"""Prefect task: the angular distance matrix and its heatmap (layerprune.distances)."""

from __future__ import annotations

from layerprune import distances, hidden_states
from tasks.common import run_stage, stage_files, stage_task

STAGE, VERSION = "distances", 1


def key_params(states: dict) -> dict:
    return {"states": states["key"]}


@stage_task(STAGE, VERSION, key_params)
def compute_distances(store_root: str, states: dict, title: str = "") -> dict:
    def build(out):
        doc = distances.compute(hidden_states.load_states(stage_files(store_root, states)),
                                out, title=title)
        return {"num_layers": doc["num_layers"], "n_samples": doc["n_samples"]}

    return run_stage(store_root, STAGE, VERSION, key_params(states), build)
