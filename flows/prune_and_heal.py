"""The `prune-and-heal` flow: one model, calibrated, measured, pruned, healed and evaluated.

    describe model ─► calibration ─┬► hidden states ─► distances ─┬► prune(n, strategy) ─► eval
                                   └► scores ─────────────────────┘      └─► heal(method) ─► eval
                                                   eval base model ◄──┘
eval = next-token loss (+ bits per byte) and lm-eval benchmarks (MMLU, BoolQ, ...), one task run
per (variant, metric). Strategies choose the layers: similarity (distances), heuristic,
block-influence and greedy-loss (scores), random (k seeded blocks, reported as mean ± sd).
Every selected variant is healed by every method (lora, distill, linear, linear+distill) and
the report compares them. Each box is a cached task (tasks/); artifacts live in the store under
`params.artifacts`. Healing runs in this process, or as one `heal-variant` run per variant and
method on the heal worker reserved for this run's GPUs (`heal.dispatch`, flows/heal.py).
Run `python -m flows.prune_and_heal` for the demo defaults, or trigger the deployment.
"""

from __future__ import annotations

import argparse
import json
import sys

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.heal import heal_in_deployments
from layerprune.config import HealSpec, ModelSpec, PruneAndHealParams
from layerprune.config.worker import check_for_worker
from layerprune.errors import LayerPruneError
from layerprune.evaluate.benchmarks import check_args as check_benchmarks
from layerprune.evaluate.speed import DECODE_PROMPT_TOKENS
from layerprune.heal import linear_fit
from layerprune.heal.config import PATCHED
from layerprune.method.calibration import sample_texts
from layerprune.method.criteria import DATA_STRATEGIES
from layerprune.method.data import check_source
from layerprune.method.prune import check_block_size
from layerprune.models.loading import check_context
from layerprune.store.remote import check_reachable
from tasks.artifacts import show_report
from tasks.calibration import calibrate
from tasks.common import release_model, stage_files, stage_policy
from tasks.criteria import layer_scores
from tasks.distances import compute_distances
from tasks.evaluate import evaluate_variant
from tasks.gpus import GpuSlots, gpu_slots
from tasks.heal import heal_variant
from tasks.hidden_states import extract_hidden_states
from tasks.models import describe_model, pinned
from tasks.prune import prune_model
from tasks.report import base_line, describe_variant, healing_columns, publish_report, random_row
from tasks.results import write_run_summary
from tasks.speed import base_speed, measure_speed, speed_columns
from tasks.version import check_deployed_version, running_commit


# The summary is stored in the artifact store (runs/<flow run id>/summary.json, where a sweep
# reads it from another machine), so the flow's return value needs no Prefect result storage.
@flow(name="prune-and-heal", log_prints=True, persist_result=False)
def prune_and_heal(params: PruneAndHealParams = PruneAndHealParams()) -> dict:
    # The code deployed is the code running, and this worker allows what the run asks (remote
    # code, local paths); then the other cheap checks: a bad data path or block size fails
    # before any model is loaded.
    commit = check_deployed_version()
    check_for_worker(params)
    check_source(params.calibration.data)
    check_source(params.loss.data)
    if params.benchmarks.tasks:  # e.g. an online-only task in an offline run
        try:
            check_benchmarks(list(params.benchmarks.tasks))
        except LayerPruneError as e:
            raise LayerPruneError(f"benchmarks.{e}") from None
    if params.heal.enabled:
        _check_heal_data(params.heal)
    check_reachable(params.artifacts)  # one clear error, before any work, if unreachable
    # A run from a deployment (UI, CLI, schedule, sweep) holds its `gpu_count` slots of the
    # global limit `gpu` from here on: taken by the run itself, so the limit covers every run
    # however started, and given back while heal-variant children heal (tasks/gpus.py).
    # A refreshed stage refreshes its readers too (e.g. speed the report, whose key leaves the
    # measured columns out: tasks.common.refreshed).
    with gpu_slots() as gpus, stage_policy(params.refresh, params.verify_artifacts):
        summary = {**_prune_and_heal(params, gpus), "commit": commit}
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
    scores = {c: layer_scores(root, params.model, model_info, tokens, c,
                              params.prune.greedy_samples, max(params.prune.block_sizes),
                              params.batch_size)
              for c in DATA_STRATEGIES if c in params.prune.strategies}
    base = _evaluate(params, params.model, model_info, [], benchmarks=True)

    rows, recipes, evaluated, speeds = [], [], {}, {}
    for n in params.prune.block_sizes:
        for strategy in params.prune.strategies:
            seeds = range(params.prune.random_blocks) if strategy == "random" else [0]
            found = []
            for seed in seeds:
                recipe = prune_model(root, params.model, model_info, distances, n, strategy,
                                     params.prune.export_checkpoints, scores.get(strategy), seed)
                drop = tuple(recipe["meta"]["removed_layers"])
                if drop not in evaluated:  # strategies often agree: each block is scored once
                    evaluated[drop] = _evaluate(params, params.model, model_info, list(drop),
                                                _benchmarked(params, n))
                    if params.speed.enabled:  # on the model in memory, as the evaluation
                        speeds[drop] = measure_speed(root, params.model, model_info, list(drop),
                                                     params.speed)
                        evaluated[drop] = {**evaluated[drop], **speed_columns(speeds[drop])}
                found.append((recipe, evaluated[drop]))
            if strategy == "random":  # the baseline: one row, mean ± sd over the blocks
                rows.append(random_row(found))
            else:
                rows.append({**describe_variant(found[0][0], strategy), **found[0][1]})
                recipes.append(found[0][0])

    # Healing last: evaluating a healed model loads it in place of the source model.
    jobs = [(r, method) for r in recipes if params.heal.enabled
            and r["meta"]["n"] in params.heal.block_sizes
            and r["meta"]["strategy"] in params.heal.strategies
            for method in params.heal.methods]
    for recipe, method, why in refused_heals(jobs, model_info["num_layers"]):
        logger.warning("%s, n=%d: not healed by %s: %s", recipe["meta"]["strategy"],
                       recipe["meta"]["n"], method, why)
        jobs.remove((recipe, method))
    dispatched = []
    if jobs and params.heal.dispatch == "deployment":
        # The children heal on the GPUs this run frees (flows/heal.py): its model's GPU memory
        # first (evaluating a healed model loads that model anyway), then its `gpu` slots; each
        # heal-variant run takes slots of its own, on a worker no prune-and-heal run can hold.
        release_model()
        with gpus.released():
            dispatched = heal_in_deployments(root, params.model, model_info, jobs, params.heal,
                                             max(gpus.count, 1))
    heals = {}
    for i, (recipe, method) in enumerate(jobs):
        n, strategy = recipe["meta"]["n"], recipe["meta"]["strategy"]
        healed = dispatched[i] if dispatched else heal_variant(root, params.model, model_info,
                                                                recipe, params.heal, method)
        heals[f"{strategy}, n={n}, {method}"] = healed
        merged = params.model.model_copy(
            update={"ref": str(stage_files(root, healed) / "merged")})
        merged_info = {"fingerprint": f"healed-{healed['key']}",
                       "num_layers": model_info["num_layers"] - n,
                       "variant": f"{strategy}-n{n}-{method}"}  # names its eval task runs
        metrics = _evaluate(params, merged, merged_info, [], _benchmarked(params, n))
        # A healed model has the architecture of its unhealed variant (the same layers removed;
        # the linear patch is folded into a kept layer's weights and LoRA is merged, so no
        # shape changes): it takes that variant's speed columns without a second measurement.
        drop = tuple(recipe["meta"]["removed_layers"])
        speed = speed_columns(speeds[drop]) if drop in speeds else {}
        rows.append({**describe_variant(recipe, f"{strategy}, {method}"), **metrics,
                     **healing_columns(healed), **speed})
    base = {**base, **base_speed(list(speeds.values()))}  # each measurement timed the base
    summary = publish_report(root, params, model_info, distances, base, rows, heals)
    show_report(root, params, model_info, distances, base, rows, heals, summary)  # cached or not
    logger.info("report: %s (code: commit %s)", summary["report_uri"], running_commit())
    return summary


def refused_heals(jobs: list[tuple[dict, str]], num_layers: int) -> list[tuple[dict, str, str]]:
    """(recipe, method, why) for each heal job that the library would refuse: a linear patch
    (`PATCHED` methods) for removed layers that `layerprune.heal.linear_fit.check_runs` rejects
    (a run starting at layer 0), why in its words. The rule is the library's, asked here, not
    restated: the flow skips such a job with a warning, before any healing starts, instead of
    failing its heal stage on it."""
    refused = []
    for recipe, method in jobs:
        if method not in PATCHED:
            continue
        try:
            linear_fit.check_runs(list(recipe["meta"]["removed_layers"]), num_layers)
        except LayerPruneError as e:
            refused.append((recipe, method, str(e)))
    return refused


def _check_contexts(params: PruneAndHealParams) -> None:
    """Every sequence length within the model's context, before any weights load (config only)."""
    m = params.model
    lengths = {"calibration.seq_len": params.calibration.seq_len,
               "loss.seq_len": params.loss.seq_len}
    if params.heal.enabled:
        lengths["heal.config.seq_len"] = params.heal.config.seq_len
    if params.speed.enabled:  # a timed decode call generates after a fixed-length prompt
        lengths["speed.prefill_tokens"] = params.speed.prefill_tokens
        lengths[f"speed.decode_tokens + {DECODE_PROMPT_TOKENS} (its prompt)"] = \
            DECODE_PROMPT_TOKENS + params.speed.decode_tokens
    for name, seq_len in lengths.items():
        check_context(m.ref, seq_len, name, m.trust_remote_code, m.revision)


def _check_heal_data(spec: HealSpec) -> None:
    """The healing text exists and, for the linear patch, holds its `linear_samples` records."""
    check_source(spec.data)
    if any(m in PATCHED for m in spec.methods):
        try:
            sample_texts(spec.data, spec.config.linear_samples, text_field=spec.config.text_field)
        except LayerPruneError as e:
            raise LayerPruneError(f"heal.config.linear_samples: {e}") from None


def _benchmarked(params: PruneAndHealParams, n: int) -> bool:
    sizes = params.benchmarks.block_sizes
    return sizes is None or n in sizes


def _evaluate(params: PruneAndHealParams, model: ModelSpec, model_info: dict, drop: list[int],
              benchmarks: bool) -> dict:
    """{metric: value} for one variant: loss and bits per byte, and the benchmarks if asked."""
    root, bs = params.artifacts, params.batch_size
    loss = evaluate_variant(root, model, model_info, drop, "loss", loss=params.loss,
                            batch_size=bs)["meta"]
    values = {"loss": round(loss["value"], 4), "loss_stderr": _rounded(loss.get("stderr")),
              "bits_per_byte": round(loss["bits_per_byte"], 4)}
    for task, limit in (params.benchmarks.limits().items() if benchmarks else ()):
        result = evaluate_variant(root, model, model_info, drop, task, limit,
                                  params.benchmarks.shots, batch_size=bs)["meta"]
        values[task] = round(result["value"], 4)
        values[f"{task}_baseline"] = round(result["baseline"], 4)
        values[f"{task}_stderr"] = _rounded(result.get("stderr"))  # None: one item
        values[f"{task}_n"] = result["n"]  # items scored, for the report's error bars
    return values


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


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
    # With their standard errors: the demo's samples are small (57 MMLU items: about ±0.06).
    print("base model: " + base_line(summary["base"], markdown=False))
    print(f"\nartifacts: {summary['report_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
