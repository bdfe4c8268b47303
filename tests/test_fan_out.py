"""Bounded fan-out of child runs and heal routing, without a server (tasks/children.py,
flows/heal.py). The e2e tests (test_orchestration.py, test_heal_deadlock.py) run the same code
against a real Prefect server and workers."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import uuid4

import pytest
import yaml
from test_orchestration_units import REPO

from flows.heal import HEAL_QUEUE_ENV, heal_job
from tasks import children
from tasks.children import FanOut, admits, bounded_fan_out, overdue, run_child


def test_admission_is_first_come_and_weighted():
    assert admits(True, 0, 1, 2) and admits(True, 1, 1, 2)
    assert not admits(True, 2, 1, 2)  # full
    assert not admits(False, 0, 1, 2)  # someone asked first
    assert not admits(True, 1, 2, 2)  # a 2-GPU child does not fit beside a 1-GPU one
    assert admits(True, 0, 5, 2)  # larger than everything: alone, rather than never


def _hold_all(gate: FanOut, weights: list[int], hold_s: float = 0.05):
    """Threads asking `gate` for `weights` in order; [(start order, max units in flight)]."""
    started, peak, lock = [], [0], threading.Lock()

    def child(i, w):
        with gate.slot(w):
            with lock:
                started.append(i)
                peak[0] = max(peak[0], gate.in_flight)
            time.sleep(hold_s)

    threads = []
    for i, w in enumerate(weights):
        threads.append(threading.Thread(target=child, args=(i, w)))
        threads[-1].start()
        time.sleep(0.01)  # they ask in this order
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return started, peak[0]


def test_fan_out_never_exceeds_its_capacity_and_keeps_the_order():
    """Catches every child submitted at once (the peak would be 6)."""
    started, peak = _hold_all(FanOut(lambda: 2, refresh_s=0.01), [1] * 6)
    assert peak == 2 and started == list(range(6))
    # 2-GPU children count 2; the small one asked last does not overtake the big one waiting
    started, peak = _hold_all(FanOut(lambda: 3, refresh_s=0.01), [2, 2, 1])
    assert peak <= 3 and started == [0, 1, 2]
    started, peak = _hold_all(FanOut(lambda: 2, refresh_s=0.01), [4, 1])
    assert started == [0, 1] and peak == 4  # the big one alone, then the next


def test_fan_out_follows_the_limit_while_children_wait():
    limit = {"n": 1}
    gate = FanOut(lambda: limit["n"], refresh_s=0.01)
    release = threading.Event()
    inside = []

    def child():
        with gate.slot(1):
            inside.append(1)
            release.wait(10)

    threads = [threading.Thread(target=child) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert len(inside) == 1  # limit 1
    limit["n"] = 3  # `prefect gcl update gpu --limit 3` while the sweep waits
    deadline = time.time() + 5
    while len(inside) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(inside) == 3
    release.set()
    for t in threads:
        t.join(timeout=10)

    def broken():
        raise ConnectionError("API down")

    gate = FanOut(lambda: 2, refresh_s=0.01)
    gate._capacity_of = broken  # asked again later: the last known limit is kept
    time.sleep(0.02)
    assert gate._current_capacity() == 2


def test_a_child_times_out_on_running_time_not_queue_time():
    now = datetime.now(timezone.utc)
    queued = SimpleNamespace(start_time=None)  # Scheduled, Late, Pending: never overdue
    assert not overdue(queued, 60, now)
    running = SimpleNamespace(start_time=now - timedelta(seconds=61))
    assert overdue(running, 60, now) and not overdue(running, 62, now)
    assert not overdue(running, None, now)


class _FakeServer:
    """Plays Prefect for run_child: run_deployment creates a run, each run stays Scheduled for
    `queued_s`, then Running for `running_s`, then Completed. Counts runs not yet final."""

    def __init__(self, queued_s: float, running_s: float):
        self.queued_s, self.running_s = queued_s, running_s
        self.runs, self.cancelled, self.peak = {}, [], 0
        self.lock = threading.Lock()

    def _state(self, created):
        age = time.monotonic() - created
        if age < self.queued_s:
            return "SCHEDULED", None
        start = datetime.now(timezone.utc) - timedelta(seconds=age - self.queued_s)
        return ("RUNNING" if age < self.queued_s + self.running_s else "COMPLETED"), start

    def run(self, run_id):
        created, key = self.runs[run_id]
        name, start = self._state(created)
        if run_id in self.cancelled:
            name = "CANCELLED"
        state = SimpleNamespace(name=name, message="", is_completed=lambda: name == "COMPLETED",
                                is_final=lambda: name in ("COMPLETED", "CANCELLED"),
                                is_crashed=lambda: False)
        return SimpleNamespace(id=run_id, name=key, state=state, start_time=start)

    def active(self) -> int:
        return sum(not self.run(i).state.is_final() for i in self.runs)

    def run_deployment(self, deployment, parameters, timeout, idempotency_key, **options):
        with self.lock:
            run_id = uuid4()
            self.runs[run_id] = (time.monotonic(), idempotency_key)
            self.peak = max(self.peak, self.active())
        return self.run(run_id)

    def client(self, sync_client=True):
        server = self

        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def read_flow_run(self, run_id):
                return server.run(run_id)

            def set_flow_run_state(self, run_id, state, force=False):
                server.cancelled.append(run_id)

        return Client()


@pytest.fixture
def fake_server(monkeypatch):
    def make(queued_s, running_s):
        server = _FakeServer(queued_s, running_s)
        monkeypatch.setattr(children, "run_deployment", server.run_deployment)
        monkeypatch.setattr(children, "get_client", server.client)
        monkeypatch.setattr(children, "get_run_logger", lambda: logging.getLogger("test"))
        monkeypatch.setattr(children, "flow_run", SimpleNamespace(id=uuid4()))
        monkeypatch.setattr(children, "POLL_S", 0.01)
        return server
    return make


def _sweep(models: int, limit: int, timeout_s: float | None) -> dict:
    """What the sweep does: one thread per model calling run_child inside bounded_fan_out."""
    results = {}

    def one(i):
        try:
            results[i] = run_child("d/x", {}, f"m{i}", work=f"m{i}", timeout_s=timeout_s,
                                   job_variables={"gpu_count": 1})
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            results[i] = e

    with bounded_fan_out(lambda: limit):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    return results


def test_a_sweep_creates_at_most_the_limit_plus_one_children(fake_server):
    """Catches unbounded fan-out: 8 models, `gpu` limit 2: never more than 3 unfinished runs."""
    server = fake_server(queued_s=0.02, running_s=0.1)
    results = _sweep(8, limit=2, timeout_s=None)
    assert all(r.state.is_completed() for r in results.values()), results
    assert len(server.runs) == 8 and server.peak == 2 + children.QUEUED_AHEAD


def test_the_last_children_of_a_long_sweep_are_not_cancelled_for_their_wait(fake_server):
    """Each child runs 0.15 s under a 0.5 s timeout; 10 of them through one GPU take 1.5 s,
    and each waits in the pool's queue 0.3 s. Catches a timeout that counts queue time (the
    last ones would be cancelled before they started), and one that never fires."""
    server = fake_server(queued_s=0.3, running_s=0.15)
    results = _sweep(10, limit=1, timeout_s=0.5)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert server.cancelled == []
    server = fake_server(queued_s=0.0, running_s=5)
    with pytest.raises(TimeoutError, match="within 0.2 s of starting; cancelled"):
        run_child("d/x", {}, "slow", work="slow", timeout_s=0.2)
    assert len(server.cancelled) == 1


def test_children_poll_every_10_s_or_more():
    assert children.POLL_S >= 10


def test_heal_children_go_to_the_heal_worker_of_their_parents_gpus(monkeypatch):
    """Catches heal children sent where their parent's worker (`--limit 1`, polling `default`
    and `heal`) would have to run them: the old design's deadlock."""
    monkeypatch.setenv(HEAL_QUEUE_ENV, "heal-host-gpu-0")
    assert heal_job(1) == {"job_variables": {"gpu_count": 1},
                           "work_queue_name": "heal-host-gpu-0"}
    assert heal_job(2)["work_queue_name"] == "heal-host-gpu-0"  # that worker owns the k GPUs
    monkeypatch.delenv(HEAL_QUEUE_ENV)
    assert heal_job(1)["work_queue_name"] is None  # the deployment's queue, `heal`
    assert heal_job(2)["work_queue_name"] == "gpus-2"
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    queues = {d["entrypoint"]: d["work_pool"]["work_queue_name"] for d in doc["deployments"]}
    assert queues["flows/heal.py:heal_one"] == "heal"
    assert queues["flows/prune_and_heal.py:prune_and_heal"] == "default"
