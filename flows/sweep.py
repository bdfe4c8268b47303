"""The `sweep` flow: many models, one `prune-and-heal` run each, one comparison at the end.

    plan (depth of each model) ─► run-model × M (run_deployment, ≤ `gpu` limit at once) ─► report

Each child asks for `gpu_count` GPUs (SweepParams.gpu_count / gpu_counts): a job variable the
Docker and Kubernetes templates turn into a device request, and that many `gpu` slots held by
the child itself (tasks/gpus.py).

Runs on the `cpu` work pool; its children run on the `gpu` pool. A parent that waits on its
children must not share their pool: with the pool's slots all taken by waiting parents, no
child could ever start (a deadlock seen with a limit of 1). Deploy with `make deploy`; run with
`prefect deployment run sweep/nightly`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import wait

from layerprune.config import SweepParams
from tasks.results import use_artifact_store
from tasks.sweep import model_depth, model_label, publish_sweep_report, run_model


@flow(name="sweep", log_prints=True, persist_result=True, result_serializer="json")
def sweep(params: SweepParams = SweepParams()) -> dict:
    logger = get_run_logger()
    use_artifact_store(params.artifacts)  # fails fast if the store is unreachable
    labels = {ref: model_label(ref, params.models) for ref in params.models}
    if params.block_sizes is not None:
        sizes = {ref: params.block_sizes_for(0) for ref in params.models}
    else:  # fractions need each model's depth: read from its config, no weights
        depths = {ref: model_depth.submit(ref) for ref in params.models}
        sizes = {ref: params.block_sizes_for(d.result()) for ref, d in depths.items()}

    runs = {ref: run_model.submit(params.deployment,
                                  params.child(ref, sizes[ref]).model_dump(mode="json"),
                                  params.child_timeout_s, labels[ref], params.gpus_for(ref))
            for ref in params.models}
    wait(list(runs.values()))
    done = [f.result() for f in runs.values() if f.state.is_completed()]
    failed = {labels[ref]: f.state.message for ref, f in runs.items()
              if not f.state.is_completed()}

    summary: dict = {"models": len(params.models), "completed": [d["model"] for d in done],
                     "failed": failed}
    if done:  # a partial comparison is still worth having
        summary.update(publish_sweep_report(params.artifacts, done))
        logger.info("sweep report: %s", summary["report_uri"])
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(params.models)} model runs failed: "
                           + "; ".join(f"{m}: {msg}" for m, msg in failed.items()))
    return summary
