"""Child flow runs: started once per parent run, started again (a bounded number of times) when
one crashes. Used by the sweep (one prune-and-heal run per model) and by a prune-and-heal run
that heals its variants as heal-variant runs.

Each child is created with an idempotency key `<parent flow run id>/<what>/try-<k>`: the
Prefect server returns the existing run for a key it has seen instead of creating a second one.
So a parent that is itself retried (a UI or API retry, after it crashed or failed) re-attaches
to the children it already started, running or done, and never starts a second child for the
same work and try.

Try k+1 is started only when try k ended Crashed (its process or machine died; a run whose
heartbeats stop is marked Crashed by the automation of deployments/zombie-automation.yaml), at
most `CRASH_RETRIES` times per parent attempt. A Failed or Cancelled child is not retried by the
same parent attempt: a failure of the work itself would only fail again. When a retried parent
finds a child that had already ended unsuccessfully before it attached, that verdict belongs to
an earlier attempt, so it moves on to the next try: retrying a sweep re-attempts its failed
models and reuses the completed ones. Work is content-addressed, so a new try redoes only the
stages its predecessor did not complete.
"""

from __future__ import annotations

import itertools
import time

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelling

CRASH_RETRIES = 2  # new tries after a crashed child, per parent attempt
POLL_S = 2.0


class ChildRunFailed(RuntimeError):
    """A child flow run ended without completing (after any crash retries)."""


def run_child(deployment: str, parameters: dict, label: str, work: str,
              timeout_s: float | None = None, crash_retries: int = CRASH_RETRIES,
              **run_options) -> FlowRun:
    """Run `deployment` as a child of the current flow run and wait for it; the completed run.

    `work` names what the child does, uniquely within the parent (e.g. a model or a stage key):
    with the parent's flow run id and the try number it makes the idempotency key.
    `timeout_s`: how long to wait for one try (its queueing and its wait for `gpu` slots
    included) before cancelling it and failing. `run_options`: more `run_deployment` keywords
    (job_variables, work_queue_name)."""
    logger = get_run_logger()
    parent = flow_run.id
    waited = 0
    # Bounded: tries that ended before this attempt are finite, new ones are counted (`waited`).
    for attempt in itertools.count():
        key = f"{parent}/{work}/try-{attempt}" if parent else None
        run = run_deployment(deployment, parameters=parameters, timeout=0,
                             idempotency_key=key, **run_options)
        if run.state is not None and run.state.is_completed():
            return run  # done before this parent attempt attached: reuse it
        if run.state is not None and run.state.is_final():
            logger.info("%s: try %d (flow run %s) had ended %s before this attempt; "
                        "starting the next try", label, attempt, run.name, run.state.name)
            continue
        waited += 1
        run = _wait(run, timeout_s, label)
        state = run.state
        if state.is_completed():
            return run
        if state.is_crashed() and waited <= crash_retries:
            logger.warning("%s: flow run %s (try %d) crashed (%s); starting try %d", label,
                           run.name, attempt, state.message, attempt + 1)
            continue
        raise ChildRunFailed(f"{label}: flow run {run.name} ({run.id}) ended {state.name}: "
                             f"{state.message}")
    raise AssertionError("unreachable: itertools.count() does not end")


def _wait(run: FlowRun, timeout_s: float | None, label: str) -> FlowRun:
    """Poll `run` until it is final; past `timeout_s`, cancel it (a hung child must not keep
    its `gpu` slots) and fail."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while run.state is None or not run.state.is_final():
            if deadline is not None and time.monotonic() > deadline:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
                raise TimeoutError(f"{label}: flow run {run.name} ({run.id}) did not finish "
                                   f"within {timeout_s:g} s; cancelled")
            time.sleep(POLL_S)
            run = client.read_flow_run(run.id)
    return run
