"""The `sweep` flow: many models, one `prune-and-heal` run each, one comparison at the end.

    plan (depth of each model) ─► run-model × M (run_deployment, ≤ `gpu` limit + 1 at once)
                               ─► report (one table, one figure) ─► leaderboard (the night's page)

Each child asks for `gpu_count` GPUs (SweepParams.gpu_count / gpu_counts): a job variable the
Docker and Kubernetes templates turn into a device request, and that many `gpu` slots held by
the child itself (tasks/gpus.py).

Bounded fan-out (tasks/children.py: bounded_fan_out): a child run is created only when its GPUs
fit in the `gpu` limit (read from the API, again while children wait) plus one queued ahead;
the other models wait in this process, not in the pool's queue. So `child_timeout_s` counts a
child's running time only, and a sweep of 100 models puts 2 runs, not 100, on a one-GPU pool.

Runs on the `cpu` work pool; its children run on the `gpu` pool. A parent that waits on its
children must not share their pool: with the pool's slots all taken by waiting parents, no
child could ever start (a deadlock seen with a limit of 1). Deploy with `make deploy`; run with
`prefect deployment run sweep/nightly`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.runtime import flow_run

from layerprune.config import SweepParams
from layerprune.config.worker import check_for_worker
from layerprune.store.remote import check_reachable
from tasks.artifacts import show_sweep_report
from tasks.children import bounded_fan_out
from tasks.gpus import gpu_limit
from tasks.results import write_run_summary
from tasks.sweep import (
    model_depth,
    model_label,
    publish_leaderboard,
    publish_sweep_report,
    run_model,
)
from tasks.version import check_deployed_version


# The summary goes to the artifact store (runs/<flow run id>/summary.json), not to Prefect's
# result storage: nothing reads the flow's return value from another process.
@flow(name="sweep", log_prints=True, persist_result=False)
def sweep(params: SweepParams = SweepParams()) -> dict:
    """One child run per model; a model that cannot be planned or whose run fails is reported
    and the others go on. The comparison of the models that completed is always published; the
    sweep then ends Failed, naming each model that did not complete and why, because a sweep
    that did not measure every model it was asked to is not a success (a nightly that silently
    dropped a model would go unnoticed). Retrying it re-attaches to the children that completed
    and re-attempts the others (tasks/children.py)."""
    commit = check_deployed_version()
    check_for_worker(params)  # local paths this worker allows (each child checks again)
    logger = get_run_logger()
    logger.info("code: commit %s", commit)
    check_reachable(params.artifacts)  # one clear error if the store is unreachable
    labels = {ref: model_label(ref, params.models) for ref in params.models}
    failed: dict[str, str] = {}
    sizes = _plan(params, labels, failed)

    with bounded_fan_out(gpu_limit):  # each run-model task waits for room before its child
        runs = {ref: run_model.submit(params.deployment,
                                      params.child(ref, n).model_dump(mode="json"),
                                      params.child_timeout_s, labels[ref], params.gpus_for(ref))
                for ref, n in sizes.items()}
        wait(list(runs.values()))
    done = [f.result() for f in runs.values() if f.state.is_completed()]
    failed.update({labels[ref]: _why(f) for ref, f in runs.items() if not f.state.is_completed()})

    summary: dict = {"commit": commit, "models": len(params.models),
                     "completed": [d["model"] for d in done],
                     "failed": {m: failed[m] for m in labels.values() if m in failed}}
    if done:  # a partial comparison is still worth having
        report = publish_sweep_report(params.artifacts, done)
        show_sweep_report(params.artifacts, done, report)  # its artifacts, cached or not
        summary.update(report)
        logger.info("sweep report: %s", summary["report_uri"])
        # The night on the leaderboard page; if that fails, the summary is still stored and
        # the sweep ends Failed saying so.
        page = publish_leaderboard(params.artifacts, done, summary["report_uri"],
                                   str(flow_run.id), flow_run.scheduled_start_time,
                                   return_state=True)
        if page.is_completed():
            published = page.result()
            summary.update(leaderboard_uri=published["leaderboard_uri"],
                           leaderboard_night_uri=published["night_uri"])
        else:
            summary["leaderboard_error"] = _why_state(page)
    write_run_summary(params.artifacts, flow_run.id, summary)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(params.models)} models did not complete: "
                           + "; ".join(f"{m}: {msg}" for m, msg in summary["failed"].items()))
    if "leaderboard_error" in summary:
        raise RuntimeError(f"the leaderboard was not published: {summary['leaderboard_error']}")
    return summary


def _plan(params: SweepParams, labels: dict[str, str], failed: dict[str, str]) -> dict:
    """{ref: block sizes} of every model that can be planned; the others go into `failed`."""
    if params.block_sizes is not None:
        return {ref: params.block_sizes_for(0) for ref in params.models}
    # Fractions need each model's depth: read from its config, no weights.
    depths = {ref: model_depth.submit(ref) for ref in params.models}
    wait(list(depths.values()))
    sizes = {}
    for ref, depth in depths.items():
        if not depth.state.is_completed():
            failed[labels[ref]] = f"planning it failed: {_why(depth)}"
            continue
        try:
            sizes[ref] = params.block_sizes_for(depth.result())
        except ValueError as e:
            failed[labels[ref]] = f"planning it failed: {e}"
    return sizes


def _why(future) -> str:
    """The error a failed task run raised, as one line."""
    return _why_state(future.state)


def _why_state(state) -> str:
    """The same, from a task run's final state (a call with `return_state=True`)."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return state.message or state.name
