"""The GPUs a run owns: slots of the `gpu` concurrency limit, and how a k-GPU run is requested.

Design (docs/operations.md, "Pools, concurrency"): every GPU run takes its own slots, in its own
process: `prune-and-heal` and `heal-variant` enter `gpu_slots()` first thing, holding k slots of
the global concurrency limit `gpu` (k = the run's job variable `gpu_count`, default 1). So the
limit covers every run however it was started (UI, CLI, schedule, sweep, a heal dispatched by a
parent), and a k-GPU run counts k. A deployment's or a work pool's concurrency limit would
cover them too, but counts one per run and cannot be let go by a run that is waiting on its
children; `GpuSlots.released()` can: a `prune-and-heal` run releases its slots while its
`heal-variant` children heal, and takes them again to evaluate what they produced.

A run outside a deployment (the demo, the tests, `python -m flows.prune_and_heal`) takes no slot:
it was not dispatched to the `gpu` pool, and Prefect's temporary local server has no limit.

A run that dies (SIGKILL, a lost machine) cannot give its slots back: they are held under a lease
that the live run renews every 3/4 of its duration, and the server's repossessor (every 15 s)
frees the slots of a lease that expired. So a dead run's slots come back at most `gpu_lease_s()`
(+ 15 s) after its last renewal, with no one's help. Prefect's default lease is 300 s; 120 s
returns a dead worker's GPUs within about 2 minutes, for one renewal request every 90 s. Marking
the dead run Crashed is the heartbeat automation's job (deployments/zombie-automation.yaml);
Prefect releases a deployment's concurrency slot on that transition, but not global-limit
leases, hence the short lease.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.runtime import deployment, flow_run

GPU_LIMIT = "gpu"  # global concurrency limit: `prefect gcl create gpu --limit N` (make deploy)
GPU_LEASE_S = 120.0  # default lease (module doc); LAYERPRUNE_GPU_LEASE_S overrides it
# How long a run waits for its slots before failing with a clear error rather than waiting
# forever (a leaked slot, a limit set too low): 6 h, the longest a 70B model's run holds them
# (SweepParams.child_timeout_s). LAYERPRUNE_GPU_WAIT_S overrides it.
GPU_WAIT_S = 6 * 3600.0


def _seconds(name: str, default: float, low: float, high: float, low_why: str = "") -> float:
    """$`name` as seconds within [low, high], else `default`; one error naming the variable."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not low <= value <= high:
        raise ValueError(f"{name} must be a number of seconds from {low:g}{low_why} to "
                         f"{high:g}, got {text!r}")
    return value


def gpu_lease_s() -> float:
    """Lease duration of the `gpu` slots: $LAYERPRUNE_GPU_LEASE_S, else GPU_LEASE_S."""
    return _seconds("LAYERPRUNE_GPU_LEASE_S", GPU_LEASE_S, 60, 86400,
                    " (the Prefect server's minimum lease)")


def gpu_wait_s() -> float:
    """Seconds a run waits for its `gpu` slots: $LAYERPRUNE_GPU_WAIT_S, else GPU_WAIT_S."""
    return _seconds("LAYERPRUNE_GPU_WAIT_S", GPU_WAIT_S, 1, 7 * 86400)


class GpuSlotsTimeout(TimeoutError):
    """The run's `gpu` slots did not come free in time (gpu_wait_s)."""


def gpu_job(gpu_count: int) -> dict:
    """`run_deployment` keywords for a run of `gpu_count` GPUs.

    The job variable sizes the container's request (Docker, Kubernetes templates) and the run's
    slots; runs of more than one GPU go to the work queue `gpus-<k>`, which only workers owning k
    GPUs poll (deployments/workers.sh), since a process worker cannot read the job variable.
    """
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be >= 1, got {gpu_count}")
    return {"job_variables": {"gpu_count": gpu_count},
            "work_queue_name": f"gpus-{gpu_count}" if gpu_count > 1 else None}


def run_gpu_count() -> int:
    """GPUs of the running flow run: job variable `gpu_count` of the run, else of its deployment,
    else the number of `gpu_ids` (Docker template), else 1."""
    variables = dict(flow_run.job_variables or {})
    if "gpu_count" not in variables and deployment.id is not None:
        with get_client(sync_client=True) as client:
            variables = {**(client.read_deployment(deployment.id).job_variables or {}),
                         **variables}
    count = variables.get("gpu_count", len(variables.get("gpu_ids") or [None]))
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"job variable gpu_count must be an integer >= 1, got {count!r}")
    return count


class GpuSlots:
    """`with GpuSlots(k):` holds k slots of `gpu` (strict: a missing limit is an error, never an
    unbounded run); `count=0` holds nothing."""

    def __init__(self, count: int):
        self.count = count
        self._held = None

    def __enter__(self) -> GpuSlots:
        if self.count:
            wait_s = gpu_wait_s()
            get_run_logger().info("waiting for %d slot(s) of the `%s` concurrency limit (at "
                                  "most %.0f s)", self.count, GPU_LIMIT, wait_s)
            # A context manager object is single-use: a fresh one per acquisition. The holder
            # is this flow run, so the UI shows who holds each GPU.
            held = concurrency(GPU_LIMIT, occupy=self.count, strict=True,
                               lease_duration=gpu_lease_s(), timeout_seconds=wait_s,
                               holder=ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id)
                               if flow_run.id else None,
                               raise_on_lease_renewal_failure=False)
            try:
                held.__enter__()
            except TimeoutError:
                raise GpuSlotsTimeout(
                    f"no {self.count} slot(s) of the `{GPU_LIMIT}` concurrency limit came free "
                    f"within {wait_s:.0f} s (LAYERPRUNE_GPU_WAIT_S); see who holds them with "
                    f"`prefect gcl inspect {GPU_LIMIT}`, and docs/operations.md on leaked "
                    "slots") from None
            self._held = held
        return self

    def __exit__(self, *exc) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(*exc)

    @contextmanager
    def released(self) -> Iterator[None]:
        """Give the slots back for the body (waiting on children that need them), then retake."""
        self.__exit__(None, None, None)
        yield  # on an error in the body, nothing is retaken
        self.__enter__()


def gpu_limit() -> int:
    """The `gpu` global concurrency limit, read from the API now (a parent sizes its fan-out
    with it: tasks.children.bounded_fan_out). A missing limit counts as 1: every child would
    then fail on it by itself (strict), one at a time rather than all at once."""
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            return max(1, client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit)
    except ObjectNotFound:
        get_run_logger().warning("no `%s` concurrency limit on the server: children start one "
                                 "at a time", GPU_LIMIT)
        return 1


def gpu_slots() -> GpuSlots:
    """The slots of the running flow run: its GPU count inside a deployment, none outside."""
    return GpuSlots(run_gpu_count() if deployment.id is not None else 0)
