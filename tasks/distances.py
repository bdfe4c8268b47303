"""Prefect task: the angular distance matrix and its heatmap (layerprune.method.distances, drawn by layerprune.report.figures), and how
stable the block choice is under the calibration sample (layerprune.method.stability)."""

from __future__ import annotations

from layerprune.method import hidden_states, stability
from layerprune.report.figures import draw_distances
from tasks.common import run_stage, stage_files, stage_task

# 2: also stability.json / stability.png. Their settings are the library defaults (3 folds, 200
# resamples, seed 0), fixed by this version rather than keyed: they do not change
# distances.json, and a key change here would recompute every stage keyed on this one.
STAGE, VERSION = "distances", 2


def key_params(states: dict) -> dict:
    return {"states": states["key"]}


@stage_task(STAGE, VERSION, key_params)
def compute_distances(store_root: str, states: dict, title: str = "") -> dict:
    def build(out):
        tensor = hidden_states.load_states(stage_files(store_root, states))
        doc = stability.write_distances(tensor, out, folds=stability.default_folds(tensor.shape[1]))
        draw_distances(doc, out, title=title)
        folds = doc["stability"]["folds"]
        return {"num_layers": doc["num_layers"], "n_samples": doc["n_samples"],
                "stability": stability.summary_line(doc["stability"]),
                "agreement": folds.get("agreement")}  # per n = 1..L; None when skipped

    return run_stage(store_root, STAGE, VERSION, key_params(states), build)
