"""The `prune-and-heal` flow: one model, calibrated, measured, pruned and evaluated.

    describe model ─► calibration ─► hidden states ─► distances ─┬► prune(n, strategy) ─► loss
                                                                  └───────────── base model loss
Each box is a cached task (tasks/); artifacts live in the store under `params.artifacts`.
Run `python -m flows.prune_and_heal` for the demo defaults, or trigger the deployment.
"""

from __future__ import annotations

import argparse
import json
import sys

from prefect import flow, get_run_logger

from tasks.report import publish_report
from layerprune.config import PruneAndHealParams
from layerprune.data import check_source
from layerprune.prune import check_block_size
from tasks.calibration import calibrate
from tasks.distances import compute_distances
from tasks.hidden_states import extract_hidden_states
from tasks.loss import evaluate_loss
from tasks.models import describe_model
from tasks.prune import prune_model


@flow(name="prune-and-heal", log_prints=True)
def prune_and_heal(params: PruneAndHealParams = PruneAndHealParams()) -> dict:
    logger = get_run_logger()
    root = params.artifacts
    # Cheap checks first: a bad data path or block size fails before any model is loaded.
    check_source(params.calibration.data)
    check_source(params.loss.data)
    model_info = describe_model(params.model)
    for n in params.prune.block_sizes:
        check_block_size(n, model_info["num_layers"])

    tokens = calibrate(root, params.model, model_info, params.calibration)
    states = extract_hidden_states(root, params.model, model_info, tokens, params.batch_size)
    distances = compute_distances(root, states, title=f"{params.model.ref}")
    base = evaluate_loss(root, params.model, model_info, None, params.loss, params.batch_size)

    rows = []
    for n in params.prune.block_sizes:
        for strategy in params.prune.strategies:
            recipe = prune_model(root, params.model, model_info, distances, n, strategy,
                                 params.prune.export_checkpoints)
            result = evaluate_loss(root, params.model, model_info, recipe, params.loss,
                                   params.batch_size)
            rows.append(_row(recipe, result))
    summary = publish_report(root, params, model_info, distances, base, rows)
    logger.info("report: %s", summary["report_uri"])
    return summary


def _row(recipe: dict, result: dict) -> dict:
    r = recipe["meta"]
    return {"strategy": r["strategy"], "n": r["n"], "fraction": round(r["fraction"], 4),
            "removed_layers": f"{r['removed_layers'][0]}-{r['removed_layers'][-1]}",
            "block_distance": round(r["block_distance"], 4),
            "loss": round(result["meta"]["loss"], 4), "tokens": result["meta"]["tokens"],
            "recipe": recipe["uri"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the prune-and-heal flow locally.")
    parser.add_argument("--params", help="JSON file with PruneAndHealParams (default: demo)")
    args = parser.parse_args(argv)
    params = PruneAndHealParams()
    if args.params:
        with open(args.params) as f:
            params = PruneAndHealParams.model_validate(json.load(f))
    summary = prune_and_heal(params)
    print(summary["table"])
    print(f"\nartifacts: {summary['report_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
