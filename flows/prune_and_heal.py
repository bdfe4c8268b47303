"""The `prune-and-heal` flow: one model, calibrated, measured, pruned and evaluated.

    describe model ─► calibration ─► hidden states ─► distances ─┬► prune(n, strategy) ─► eval
                                                                  │        └─► heal ─► eval
                                                                  └──────────── eval base model
eval = next-token loss (+ bits per byte) and lm-eval benchmarks (MMLU, BoolQ, ...), one task run
per (variant, metric). Each box is a cached task (tasks/); artifacts live in the store under
`params.artifacts`. Healing runs in this process, or as one `heal-variant` run per variant on
the gpu pool (`heal.dispatch`, flows/heal.py).
Run `python -m flows.prune_and_heal` for the demo defaults, or trigger the deployment.
"""

from __future__ import annotations

import argparse
import json
import sys

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.heal import heal_in_deployments
from layerprune.config import ModelSpec, PruneAndHealParams
from layerprune.data import check_source
from layerprune.models import check_context
from layerprune.prune import check_block_size
from layerprune.remote import check_reachable
from tasks.calibration import calibrate
from tasks.distances import compute_distances
from tasks.evaluate import evaluate_variant
from tasks.common import stage_files, stage_policy
from tasks.gpus import GpuSlots, gpu_slots
from tasks.heal import heal_variant
from tasks.hidden_states import extract_hidden_states
from tasks.models import describe_model, pinned
from tasks.prune import prune_model
from tasks.report import publish_report
from tasks.results import write_run_summary


# The summary is stored in the artifact store (runs/<flow run id>/summary.json, where a sweep
# reads it from another machine), so the flow's return value needs no Prefect result storage.
@flow(name="prune-and-heal", log_prints=True, persist_result=False)
def prune_and_heal(params: PruneAndHealParams = PruneAndHealParams()) -> dict:
    # Cheap checks first: a bad data path or block size fails before any model is loaded.
    check_source(params.calibration.data)
    check_source(params.loss.data)
    if params.heal.enabled:
        check_source(params.heal.data)
    check_reachable(params.artifacts)  # one clear error, before any work, if unreachable
    # A run from a deployment (UI, CLI, schedule, sweep) holds its `gpu_count` slots of the
    # global limit `gpu` from here on: taken by the run itself, so the limit covers every run
    # however started, and given back while heal-variant children heal (tasks/gpus.py).
    with gpu_slots() as gpus, stage_policy(params.refresh, params.verify_artifacts):
        summary = _prune_and_heal(params, gpus)
    write_run_summary(params.artifacts, flow_run.id, summary)  # for a parent (tasks/results.py)
    return summary


def _prune_and_heal(params: PruneAndHealParams, gpus: GpuSlots) -> dict:
    logger = get_run_logger()
    root = params.artifacts
    model_info = describe_model(params.model)
    params = params.model_copy(update={"model": pinned(params.model, model_info)})
    for n in params.prune.block_sizes:
        check_block_size(n, model_info["num_layers"])
    _check_contexts(params)

    tokens = calibrate(root, params.model, model_info, params.calibration)
    states = extract_hidden_states(root, params.model, model_info, tokens, params.batch_size,
                                   params.extraction)
    distances = compute_distances(root, states, title=f"{params.model.ref}")
    base = _evaluate(params, params.model, model_info, [], benchmarks=True)

    rows, recipes = [], []
    for n in params.prune.block_sizes:
        for strategy in params.prune.strategies:
            recipe = prune_model(root, params.model, model_info, distances, n, strategy,
                                 params.prune.export_checkpoints)
            drop = recipe["meta"]["removed_layers"]
            metrics = _evaluate(params, params.model, model_info, drop, _benchmarked(params, n))
            rows.append({**_describe(recipe, strategy), **metrics})
            recipes.append(recipe)

    # Healing last: evaluating a healed model loads it in place of the source model.
    chosen = [r for r in recipes if params.heal.enabled
              and r["meta"]["n"] in params.heal.block_sizes
              and r["meta"]["strategy"] in params.heal.strategies]
    dispatched = {}
    if chosen and params.heal.dispatch == "deployment":
        with gpus.released():  # each heal-variant run holds slots of its own (flows/heal.py)
            dispatched = dict(enumerate(heal_in_deployments(
                root, params.model, model_info, chosen, params.heal, max(gpus.count, 1))))
    heals = {}
    for i, recipe in enumerate(chosen):
        n, strategy = recipe["meta"]["n"], recipe["meta"]["strategy"]
        healed = dispatched[i] if dispatched else heal_variant(root, params.model, model_info,
                                                                recipe, params.heal)
        heals[f"{strategy}, n={n}"] = healed
        merged = params.model.model_copy(
            update={"ref": str(stage_files(root, healed) / "merged")})
        merged_info = {"fingerprint": f"healed-{healed['key']}",
                       "num_layers": model_info["num_layers"] - n}
        metrics = _evaluate(params, merged, merged_info, [], _benchmarked(params, n))
        rows.append({**_describe(recipe, f"{strategy}, healed"), **metrics,
                     "heal_train_loss": round(healed["meta"]["final_train_loss"], 4)})
    summary = publish_report(root, params, model_info, distances, base, rows, heals)
    logger.info("report: %s", summary["report_uri"])
    return summary


def _check_contexts(params: PruneAndHealParams) -> None:
    """Every sequence length within the model's context, before any weights load (config only)."""
    m = params.model
    lengths = {"calibration.seq_len": params.calibration.seq_len,
               "loss.seq_len": params.loss.seq_len}
    if params.heal.enabled:
        lengths["heal.config.seq_len"] = params.heal.config.seq_len
    for name, seq_len in lengths.items():
        check_context(m.ref, seq_len, name, m.trust_remote_code, m.revision)


def _benchmarked(params: PruneAndHealParams, n: int) -> bool:
    sizes = params.benchmarks.block_sizes
    return sizes is None or n in sizes


def _evaluate(params: PruneAndHealParams, model: ModelSpec, model_info: dict, drop: list[int],
              benchmarks: bool) -> dict:
    """{metric: value} for one variant: loss and bits per byte, and the benchmarks if asked."""
    root, bs = params.artifacts, params.batch_size
    loss = evaluate_variant(root, model, model_info, drop, "loss", loss=params.loss,
                            batch_size=bs)["meta"]
    values = {"loss": round(loss["value"], 4), "bits_per_byte": round(loss["bits_per_byte"], 4)}
    for task, limit in (params.benchmarks.tasks.items() if benchmarks else ()):
        result = evaluate_variant(root, model, model_info, drop, task, limit,
                                  params.benchmarks.shots, batch_size=bs)["meta"]
        values[task] = round(result["value"], 4)
        values[f"{task}_baseline"] = round(result["baseline"], 4)
    return values


def _describe(recipe: dict, variant: str) -> dict:
    r = recipe["meta"]
    return {"variant": variant, "strategy": r["strategy"], "n": r["n"],
            "fraction": round(r["fraction"], 4),
            "removed_layers": f"{r['removed_layers'][0]}-{r['removed_layers'][-1]}",
            "block_distance": round(r["block_distance"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the prune-and-heal flow locally.")
    parser.add_argument("--params", help="JSON file with PruneAndHealParams (default: demo)")
    args = parser.parse_args(argv)
    try:
        params = PruneAndHealParams()
        if args.params:
            with open(args.params) as f:
                params = PruneAndHealParams.model_validate(json.load(f))
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = e.errors()[0] if hasattr(e, "errors") else None
        where = ".".join(str(x) for x in first["loc"]) if first else "--params"
        print(f"prune-and-heal: error: {where}: {first['msg'] if first else e}", file=sys.stderr)
        return 2
    summary = prune_and_heal(params)
    print(summary["table"])
    print("base model: " + ", ".join(f"{k} {v}" for k, v in summary["base"].items()))
    print(f"\nartifacts: {summary['report_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
