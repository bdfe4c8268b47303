"""Chaos benchmark (issue 10): kill the prune-and-heal flow at random moments, rerun it, compare.

    python benchmarks/chaos.py                                   # 10 kills, 1 pair, local + S3
    python benchmarks/chaos.py --kills 10 --pairs 1 --store local --seed 3 --keep

Per store kind (a local directory; S3 on a moto server on 127.0.0.1), on real SmolLM2 with small
settings (`real_params`), every run being `python -m flows.prune_and_heal --params FILE`:

1. undisturbed: one run on its own store; its log gives the order of the tasks and when each
   ended (the timeline).
2. killed: K moments are drawn (seeded) over that timeline. Each attempt runs the same command
   on a second store and gets SIGKILL (its whole process group) at its moment, counted from the
   end of the task that ended last before it in the undisturbed run, so kills spread along the
   pipeline instead of piling up in the imports every restart repeats. Then the command runs to
   completion (the rerun).
3. pairs: P times, two identical runs started together on one fresh store.

Checks (chaos_checks.py): every run not killed exits 0; the results table (the report's
results.parquet, every column, and the table each run prints), the base metrics and the stored
stage keys equal the undisturbed run's; every manifest's files exist with its sizes and sha256
(fetched afresh from S3); no stage dir is left in scratch, beside the committed attempt or in
the download cache. Prints where each kill landed, whether the rerun completed, mismatches and
the seconds of work redone; exit status 1 on any problem.

One Prefect server (and moto) serves the whole script in their own process groups, so kills
never hit them; PREFECT_HOME is fresh, OMP_NUM_THREADS=1. Each store's runs get their own
LAYERPRUNE_CACHE (assets linked in), so downloads and remote scratch are never shared between
the runs compared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # e2e_services: moto and Prefect servers on loopback
from chaos_checks import compare, heal_resumed_from, inspect_store, without_columns  # noqa: E402
from e2e_services import group_alive, start_moto, start_prefect_server  # noqa: E402

FINISHED = re.compile(r"Task run '([^']+)' - Finished in state (\w+)")
TASK_ERROR = re.compile(r"Task run failed with exception: (.*)")
BEGUN = "Beginning flow run"
BUCKET = "chaos"
ASSETS = ["SmolLM2-135M-Instruct", "wiki-calibration", "wiki-heldout", "wiki-heal",
          "hf_datasets"]


def real_params(root: str) -> dict:
    """About a minute undisturbed on 2 quiet cores: both strategies at n=4, BoolQ on 4 items,
    8 heal steps with a checkpoint every 2 (so kills land between and during checkpoints)."""
    return {"model": {"ref": "bundled:SmolLM2-135M-Instruct"},
            "calibration": {"samples": 8, "seq_len": 64},
            "prune": {"block_sizes": [4], "strategies": ["similarity", "heuristic"]},
            "loss": {"samples": 4, "seq_len": 64},
            "benchmarks": {"tasks": {"boolq": 4}, "block_sizes": [4]},
            "heal": {"block_sizes": [4], "strategies": ["heuristic"], "methods": ["lora"],
                     "config": {"steps": 8, "seq_len": 64, "batch_size": 2, "lr": 2e-3,
                                "save_every": 2, "gradient_checkpointing": False}},
            "batch_size": 8, "artifacts": root}


class Run:
    """One flow process in its own session (so SIGKILL reaches every process it started),
    its output in `log`, read back as it grows: when the flow began, which tasks ended when."""

    def __init__(self, params_file: Path, env: dict, log: Path):
        self.log, self._out = log, open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.prune_and_heal", "--params", str(params_file)],
            cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._ended: float | None = None  # noted by a thread: runs may be polled late
        threading.Thread(target=self._reap, daemon=True).start()
        self._pos, self._rest, self._seen = 0, b"", {}
        self.begun: float | None = None
        self.finished: list[tuple[float, tuple[str, int]]] = []  # (seconds in, task uid)
        self.rc: int | None = None
        self.seconds: float | None = None
        self.landed: str | None = None  # where a kill hit it

    def now(self) -> float:
        return time.monotonic() - self.started

    def _reap(self) -> None:
        self.proc.wait()
        self._ended = self.now()

    def poll(self) -> bool:
        """Read what the log gained; True while the process runs."""
        # The exit is read before the log, so that nothing written before it is missed.
        rc = self.proc.returncode if self._ended is not None else None
        with open(self.log, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        for line in (raw.decode(errors="replace") for raw in lines):
            if self.begun is None and BEGUN in line:
                self.begun = self.now()
            for m in FINISHED.finditer(line):
                # A task's identity across runs: its name without Prefect's random suffix
                # (`calibration-5dd`), and which occurrence of that name it is.
                name = re.sub(r"-[0-9a-f]{3}$", "", m.group(1))
                self._seen[name] = self._seen.get(name, 0) + 1
                self.finished.append((self.now(), (name, self._seen[name] - 1)))
        if rc is not None and self.rc is None:
            self.rc, self.seconds = rc, self._ended
            self._out.close()
        return rc is None

    def wait(self, timeout_s: float) -> int:
        while self.poll():
            if self.now() > timeout_s:
                self.kill()
                raise TimeoutError(f"{self.log.name}: still running after {timeout_s:.0f}s")
            time.sleep(0.1)
        return self.rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        while self._ended is None:
            time.sleep(0.01)
        deadline = time.monotonic() + 10  # children the group leader left behind
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.poll()

    def task_errors(self) -> list[str]:
        """Exceptions its tasks raised (each then retried or failing the run)."""
        return TASK_ERROR.findall(self.log.read_text(errors="replace"))

    def table(self) -> str | None:
        """The results table the run printed (its header line to `base model:`)."""
        lines = [ln.split("\r")[-1] for ln in self.log.read_text(errors="replace").splitlines()]
        ends = [i for i, ln in enumerate(lines) if ln.startswith("base model:")]
        starts = [i for i, ln in enumerate(lines[:ends[-1]]) if " variant " in f" {ln} "
                  and " loss " in f" {ln} "] if ends else []
        return "\n".join(lines[starts[-1]:ends[-1] + 1]) if starts else None


class Stores:
    """Roots, caches, params files and logs of one store kind's runs (local dirs or S3
    prefixes), each named: undisturbed, killed, pair-1, ..."""

    def __init__(self, kind: str, work: Path, env: dict, params_for: Callable[[str], dict]):
        self.kind, self.work, self.env, self.params_for = kind, work / kind, env, params_for
        self.work.mkdir(parents=True, exist_ok=True)

    def root(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}" if self.kind == "s3" else str(self.work / "stores" / name)

    def cache(self, name: str) -> Path:
        return self.work / "caches" / name

    def scratch(self, name: str) -> Path:
        return Path(self.root(name)) / ".scratch" if self.kind == "local" \
            else self.cache(name) / "scratch"

    def start(self, name: str, log: str) -> Run:
        params = self.work / f"params-{name}.json"
        params.write_text(json.dumps(self.params_for(self.root(name)), indent=1))
        env = {**self.env, "LAYERPRUNE_CACHE": str(_linked_cache(self.cache(name)))}
        return Run(params, env, self.work / f"{log}.log")

    def inspect(self, name: str) -> dict:
        return inspect_store(self.root(name), self.scratch(name), self.cache(name),
                             self.work / f"check-{name}")


def _linked_cache(cache: Path) -> Path:
    """A LAYERPRUNE_CACHE whose assets (models, data) link to the user's cache, while its
    downloads from the store and its remote scratch are its own."""
    from layerprune.store.files import cache_dir

    shared = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir() if shared.is_dir() else ():
        link = cache / entry.name
        if entry.name not in ("store", "scratch") and not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return cache


def kill_moments(run: Run, kills: int, rng: random.Random) -> list[float]:
    """`kills` sorted moments, uniform over the undisturbed `run` from the start of its flow
    (before it: imports only, which touch no store) to the end of its next-to-last task (any
    later, and a restart may finish before its moment comes)."""
    ends = [t for t, _ in run.finished]
    start = run.begun or 0.0
    stop = ends[-2] if len(ends) > 1 else (ends[-1] if ends else start)
    return sorted(rng.uniform(start, stop) for _ in range(kills))


def _checkpoints(scratch: Path) -> str:
    """The healing checkpoints in scratch; `(partial)`: without trainer_state.json, which the
    Trainer writes after the weights and the optimizer state."""
    found = sorted((p for p in scratch.rglob("checkpoint-*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) if scratch.is_dir() else []
    return ",".join(p.name.removeprefix("checkpoint-")
                    + ("" if (p / "trainer_state.json").exists() else " (partial)")
                    for p in found) or "none"


def _landing(run: Run, timeline: list, scratch: Path) -> str:
    """Where a kill hits `run`: the first task of the undisturbed order it has not finished,
    how long after its previous task's end, the healing checkpoints, the task errors so far."""
    if run.begun is None:
        return "startup (imports, Prefect)"
    done = {uid for _, uid in run.finished}
    pending = [uid[0] for _, uid in timeline if uid not in done]
    since = run.finished[-1][0] if run.finished else run.begun
    where = pending[0] if pending else "after the last task"
    text = f"{where} (+{run.now() - since:.1f}s)"
    if where.startswith("heal"):
        text += f"; checkpoints: {_checkpoints(scratch)}"
    errors = run.task_errors()
    if errors:  # a task failed and was retried: this attempt was failing already
        text += f"; {len(errors)} task errors before, first: {errors[0][:160]}"
    return text


def _kill_at(stores: Stores, i: int, moment: float, ref_run: Run, limit_s: float) -> Run:
    """Attempt `i`, killed at `moment` of the undisturbed timeline: `moment - t` seconds after
    it logs the end of the task that ended at t, the last before `moment` in the undisturbed
    run (after its flow begins if none did), or as soon as it logs the end of the task that
    held `moment`, if that comes first (a faster machine, or work a previous attempt did);
    at the latest at `limit_s`, whatever it is doing then."""
    prior = [(t, uid) for t, uid in ref_run.finished if t <= moment]
    anchor, delay = (prior[-1][1], moment - prior[-1][0]) if prior \
        else (None, moment - (ref_run.begun or 0.0))
    target = next((uid for t, uid in ref_run.finished if t > moment), None)
    run = stores.start("killed", f"killed-{i:02d}")
    while run.poll():
        done = [uid for _, uid in run.finished]
        anchor_at = run.begun if anchor is None else \
            next((t for t, uid in run.finished if uid == anchor), None)
        overdue = run.now() > limit_s  # stuck (e.g. waiting for a lease no one will free)
        if anchor_at is not None and run.now() >= anchor_at + delay or target in done \
                or overdue:
            run.landed = f"kill {i} at {run.now():.1f}s: " \
                + ("OVERDUE, never reached its moment; " if overdue else "") \
                + _landing(run, ref_run.finished, stores.scratch("killed"))
            run.kill()
            break
        time.sleep(0.05)
    return run  # not killed if it ended by itself before its moment


def _killed(stores: Stores, ref_run: Run, kills: int, rng: random.Random, timeout_s: float,
            reference: dict, say: Callable) -> dict:
    landed, seconds, failures = [], [], []
    for i, moment in enumerate(kill_moments(ref_run, kills, rng), start=1):
        run = _kill_at(stores, i, moment, ref_run, 3 * ref_run.seconds + 60)
        seconds.append(run.seconds)
        if run.landed:
            landed.append(run.landed)
            if "OVERDUE" in run.landed:
                failures.append(f"attempt {i} took over {3 * ref_run.seconds + 60:.0f}s: see "
                                f"{run.log}")
        elif run.rc != 0:
            failures.append(f"attempt {i} failed (exit {run.rc}): see {run.log}")
        say(run.landed or f"attempt {i} ended by itself (exit {run.rc}) before its moment")
    for j in range(2):  # the rerun must succeed; a second try only to have a table to compare
        final = stores.start("killed", f"killed-rerun-{j + 1}")
        with contextlib.suppress(TimeoutError):  # then killed: its exit is not 0
            final.wait(timeout_s)
        seconds.append(final.seconds)
        if final.rc == 0:
            failures += _errors(final, "the rerun")
            break
        failures.append(f"the rerun after the kills failed (exit {final.rc}): see {final.log}")
    state = stores.inspect("killed")
    mismatches = compare(reference, state, "killed") + _printed(final, ref_run, "rerun")
    say(f"rerun: exit {final.rc}, mismatches {len(mismatches)}, store problems "
        f"{len(state['problems'])}")
    return {"kills": len(landed), "landed": landed, "rerun_completed": final.rc == 0,
            "attempt_seconds": [round(s, 1) for s in seconds],
            # The simple measure: all the time the killed attempts and the rerun took, less one
            # undisturbed run; it includes what every restart repeats (imports, model loads).
            "redone_seconds": round(sum(seconds) - ref_run.seconds, 1),
            "heal_resumed_from_step": heal_resumed_from(stores.root("killed")),
            "failures": failures, "mismatches": mismatches, "store_problems": state["problems"]}


def _printed(run: Run, ref_run: Run, label: str) -> list[str]:
    got = without_columns(run.table())
    return [] if run.rc != 0 or got == without_columns(ref_run.table()) else \
        [f"{label}: the table it printed differs:\n{got}"]


def _errors(run: Run, label: str) -> list[str]:
    """A run that succeeded only because a task was retried counts too: in a sound pipeline on
    loopback services nothing fails (e.g. two runs sharing a directory do)."""
    return [f"{label}: task error, retried: {e[:200]}" for e in run.task_errors()]


def _pair(stores: Stores, p: int) -> list[Run]:
    return [stores.start(f"pair-{p}", f"pair-{p}{c}") for c in "ab"]


def _pair_outcome(stores: Stores, p: int, runs: list[Run], ref_run: Run, reference: dict,
                  timeout_s: float) -> dict:
    for run in runs:
        with contextlib.suppress(TimeoutError):  # then killed: its exit is not 0
            run.wait(timeout_s)
    state = stores.inspect(f"pair-{p}")
    return {"pair": f"pair-{p}", "exit": [r.rc for r in runs],
            "seconds": [round(r.seconds, 1) for r in runs],
            "failures": [f"{r.log.stem} failed (exit {r.rc}): see {r.log}"
                         for r in runs if r.rc != 0]
            + sum((_errors(r, r.log.stem) for r in runs if r.rc == 0), []),
            "mismatches": compare(reference, state, f"pair-{p}")
            + sum((_printed(r, ref_run, r.log.stem) for r in runs), []),
            "store_problems": state["problems"]}


def chaos(stores: Stores, kills: int, pairs: int, rng: random.Random, timeout_s: float = 900,
          overlap: bool = False) -> dict:
    """The undisturbed run, the killed attempts and their rerun, the concurrent pairs, on one
    store kind. `overlap`: start the pairs with the first attempt, not after the rerun (faster;
    the attempts then run slower, which moves kills earlier into the task their moments name
    and adds to the redone seconds; the undisturbed reference still runs alone)."""
    say = lambda text: print(f"[{stores.kind}] {text}", flush=True)  # noqa: E731
    ref_run = stores.start("undisturbed", "undisturbed")
    if ref_run.wait(timeout_s) != 0:
        raise RuntimeError(f"the undisturbed run failed (exit {ref_run.rc}); see {ref_run.log}")
    reference = stores.inspect("undisturbed")
    say(f"undisturbed: {ref_run.seconds:.1f}s, {len(ref_run.finished)} tasks; store problems: "
        f"{reference['problems'] or 'none'}")
    started = {p: _pair(stores, p) for p in range(1, pairs + 1)} if overlap else {}
    result = {"store": stores.kind, "undisturbed_seconds": round(ref_run.seconds, 1),
              "failures": _errors(ref_run, "undisturbed"), "mismatches": [],
              "store_problems": {"undisturbed": reference["problems"]}}
    if kills:
        killed = _killed(stores, ref_run, kills, rng, timeout_s, reference, say)
        result.update({k: v for k, v in killed.items() if k not in result})
        result["store_problems"]["killed"] = killed["store_problems"]
        result["failures"] += killed["failures"]
        result["mismatches"] += killed["mismatches"]
    result["pairs"] = []
    for p in range(1, pairs + 1):
        outcome = _pair_outcome(stores, p, started.get(p) or _pair(stores, p), ref_run,
                                reference, timeout_s)
        say(f"pair-{p}: exit {outcome['exit']}, mismatches {len(outcome['mismatches'])}, "
            f"store problems {len(outcome['store_problems'])}")
        result["pairs"].append(outcome)
        result["store_problems"][f"pair-{p}"] = outcome["store_problems"]
        result["failures"] += outcome["failures"]
        result["mismatches"] += outcome["mismatches"]
    result["store_problems"] = {k: v for k, v in result["store_problems"].items() if v}
    return result


@contextlib.contextmanager
def services(work: Path, s3: bool) -> Iterator[dict]:
    """The environment of every run: one Prefect server, and a moto S3 server with the bucket
    when `s3`; both stopped on exit."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PREFECT_HOME": str(work / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    started = []
    try:
        server, env["PREFECT_API_URL"] = start_prefect_server(env, work)
        started.append(server)
        if s3:
            moto, endpoint = start_moto(env, work)
            started.append(moto)
            aws = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            env.update(aws)
            os.environ.update(aws)  # this process reads the stores too (inspect_store)
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for svc in reversed(started):
            svc.stop()


def problem_count(result: dict) -> int:
    return len(result["mismatches"]) + len(result["failures"]) + \
        sum(len(p) for p in result["store_problems"].values())


def summary_lines(r: dict) -> list[str]:
    lines = [f"== {r['store']} store: undisturbed run {r['undisturbed_seconds']}s =="]
    if "kills" in r:
        lines += [f"kills: {r['kills']}, survived: "
                  + ("yes, the rerun completed" if r["rerun_completed"] else "NO, the rerun "
                     "failed"), *(f"  {text}" for text in r["landed"]),
                  f"attempts and rerun (s): {r['attempt_seconds']}",
                  f"seconds of work redone: {r['redone_seconds']} (all attempts and the rerun, "
                  "less one undisturbed run)",
                  f"healing in the killed store resumed from step: "
                  f"{r['heal_resumed_from_step']}"]
    for p in r["pairs"]:
        lines.append(f"concurrent {p['pair']}: exit {p['exit']}, {p['seconds']}s, mismatches "
                     f"{len(p['mismatches'])}, store problems {len(p['store_problems'])}")
    lines += [f"failed runs: {len(r['failures'])}", *(f"  {f}" for f in r["failures"]),
              f"mismatches: {len(r['mismatches'])}", *(f"  {m}" for m in r["mismatches"])]
    for name, problems in r["store_problems"].items():
        lines += [f"store problems ({name}): {len(problems)}", *(f"  {p}" for p in problems)]
    return lines


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=_count, default=10, help="SIGKILLs per store (>= 0)")
    p.add_argument("--pairs", type=_count, default=1, help="concurrent pairs per store (>= 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--store", choices=["local", "s3", "both"], default="both")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where logs, stores and caches go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the stores (GBs) after the run")
    p.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = p.parse_args(argv)
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        p.error(f"--workdir: {str(args.workdir)!r} is a file; give a directory")
    if args.timeout <= 0:
        p.error(f"--timeout: {args.timeout} must be > 0 seconds")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    from layerprune.models import assets

    assets.fetch(ASSETS, verbose=False)  # before any run: the runs' caches link to them
    kinds = ["local", "s3"] if args.store == "both" else [args.store]
    print(f"chaos: {args.kills} kills and {args.pairs} pairs per store on {kinds}, seed "
          f"{args.seed}, OMP_NUM_THREADS=1; logs in {work}", flush=True)
    started, results = time.monotonic(), []
    try:
        with services(work, "s3" in kinds) as env:
            for kind in kinds:
                stores = Stores(kind, work, env, real_params)
                results.append(chaos(stores, args.kills, args.pairs, random.Random(args.seed),
                                     args.timeout))
                if not args.keep:
                    for sub in ("stores", "caches"):
                        shutil.rmtree(stores.work / sub, ignore_errors=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    (work / "chaos.json").write_text(json.dumps(results, indent=1))
    print()
    for result in results:
        print("\n".join(summary_lines(result)) + "\n")
    print(f"total: {sum(r.get('kills', 0) for r in results)} kills, "
          f"{sum(problem_count(r) for r in results)} problems, "
          f"{time.monotonic() - started:.0f}s; details in {work / 'chaos.json'}")
    return 1 if any(problem_count(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
