"""Child flow runs: started once per parent run, started again (a bounded number of times) when
one crashes, no more at once than the `gpu` limit allows. Used by the sweep (one prune-and-heal
run per model) and by a prune-and-heal run that heals its variants as heal-variant runs.

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

Bounded fan-out (`bounded_fan_out`): within the block, the children a flow run starts (from
any of its task threads) take `gpu_count` units each of a budget of the `gpu` limit plus
`QUEUED_AHEAD`; a child past the budget is not created until one in flight ends, so a sweep of
100 models has at most limit + 1 runs on the pool, the next one already queued when a GPU frees.
A child's timeout counts from the moment it started running (its `start_time`), never its time
in a queue: the last models of a large sweep are not cancelled before they start.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelling

CRASH_RETRIES = 2  # new tries after a crashed child, per parent attempt
# Seconds between two reads of a child's state (and of the `gpu` limit by a waiting fan-out):
# child runs last minutes to hours, and a sweep of many models must not poll the API 50 times a
# second. Prefect's run_deployment polls every 5 s by default.
POLL_S = 10.0
QUEUED_AHEAD = 1  # GPUs' worth of children created beyond the `gpu` limit: the next one waits
#                   in the pool's queue, so a freed GPU is taken without waiting for a poll


class ChildRunFailed(RuntimeError):
    """A child flow run ended without completing (after any crash retries)."""


def admits(queued_first: bool, in_flight: int, weight: int, capacity: int) -> bool:
    """Whether a child of `weight` GPUs may start now: it is first in line (children start in
    the order they asked) and fits in `capacity` beside the `in_flight` ones; a child larger
    than the whole capacity starts alone, when nothing else is in flight (it then waits for its
    slots in its own process, and fails with a clear error if they never come)."""
    return queued_first and (in_flight == 0 or in_flight + weight <= capacity)


class FanOut:
    """A weighted, first-come-first-served gate: at most `capacity()` units in flight.

    `capacity` is asked again every `refresh_s` while someone waits (the `gpu` limit may be
    raised while a sweep runs); an error asking it keeps the last answer."""

    def __init__(self, capacity: Callable[[], int], refresh_s: float | None = None):
        self._capacity_of = capacity
        self._refresh_s = refresh_s
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._in_flight = 0
        self._capacity = max(1, capacity())
        self._asked = time.monotonic()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _current_capacity(self) -> int:
        refresh = POLL_S if self._refresh_s is None else self._refresh_s
        if time.monotonic() - self._asked >= refresh:
            self._asked = time.monotonic()
            try:
                self._capacity = max(1, self._capacity_of())
            except Exception:  # the API briefly unreachable: keep the last known limit
                pass
        return self._capacity

    @contextlib.contextmanager
    def slot(self, weight: int) -> Iterator[None]:
        """Wait for `weight` units, hold them for the block."""
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            try:
                while not admits(self._line[0] is ticket, self._in_flight, weight,
                                 self._current_capacity()):
                    self._cond.wait(POLL_S if self._refresh_s is None else self._refresh_s)
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()
            self._in_flight += weight
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= weight
                self._cond.notify_all()


_fan_outs: dict[str, FanOut] = {}  # parent flow run id -> its gate
_fan_outs_lock = threading.Lock()


@contextlib.contextmanager
def bounded_fan_out(gpu_limit: Callable[[], int]) -> Iterator[FanOut]:
    """Within the block, every child this flow run starts through `run_child`, from any of its
    task threads, first takes its `gpu_count` units of `gpu_limit()` + QUEUED_AHEAD
    (tasks.gpus.gpu_limit: the `gpu` limit, asked again every POLL_S while a child waits) and
    holds them until it ends, crash retries included.

    Registered under the flow run's id because run_child is called from task runs (one per
    model) that Prefect runs in threads of its task runner; they find it by the same id."""
    parent = str(flow_run.id)
    gate = FanOut(lambda: gpu_limit() + QUEUED_AHEAD)
    with _fan_outs_lock:
        _fan_outs[parent] = gate
    try:
        yield gate
    finally:
        with _fan_outs_lock:
            _fan_outs.pop(parent, None)


def _gate() -> FanOut | None:
    with _fan_outs_lock:
        return _fan_outs.get(str(flow_run.id))


def run_child(deployment: str, parameters: dict, label: str, work: str,
              timeout_s: float | None = None, crash_retries: int = CRASH_RETRIES,
              **run_options) -> FlowRun:
    """Run `deployment` as a child of the current flow run and wait for it; the completed run.

    `work` names what the child does, uniquely within the parent (e.g. a model or a stage key):
    with the parent's flow run id and the try number it makes the idempotency key.
    `timeout_s`: how long one try may run, from its start (time queued is not counted; its
    wait for `gpu` slots in its own process is), before it is cancelled and this fails.
    `run_options`: more `run_deployment` keywords (job_variables, work_queue_name). Inside
    `bounded_fan_out`, the child is created only once its GPUs fit in the fan-out."""
    gate = _gate()
    weight = int((run_options.get("job_variables") or {}).get("gpu_count", 1))
    with gate.slot(weight) if gate is not None else contextlib.nullcontext():
        return _run_child(deployment, parameters, label, work, timeout_s, crash_retries,
                          run_options)


def _run_child(deployment: str, parameters: dict, label: str, work: str,
               timeout_s: float | None, crash_retries: int, run_options: dict) -> FlowRun:
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


def overdue(run: FlowRun, timeout_s: float | None, now: datetime) -> bool:
    """Whether `run` has been running longer than `timeout_s`: counted from its `start_time`
    (set by the server when it first enters Running), so a run still Scheduled, Late, Pending
    or waiting for a deployment slot is never overdue."""
    if timeout_s is None or run.start_time is None:
        return False
    return (now - run.start_time).total_seconds() > timeout_s


def _wait(run: FlowRun, timeout_s: float | None, label: str) -> FlowRun:
    """Poll `run` every POLL_S until it is final; once it has run longer than `timeout_s`,
    cancel it (a hung child must not keep its `gpu` slots) and fail."""
    with get_client(sync_client=True) as client:
        while run.state is None or not run.state.is_final():
            if overdue(run, timeout_s, datetime.now(timezone.utc)):
                client.set_flow_run_state(run.id, Cancelling(), force=True)
                raise TimeoutError(f"{label}: flow run {run.name} ({run.id}) did not finish "
                                   f"within {timeout_s:g} s of starting; cancelled")
            time.sleep(POLL_S)
            run = client.read_flow_run(run.id)
    return run
