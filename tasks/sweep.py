"""Prefect tasks of the sweep: plan each model, run it as a deployment, gather one report, and
publish the night on the leaderboard page (layerprune/report/leaderboard/nights.py).

The per-model work runs as separate flow runs of the `prune-and-heal` deployment on the `gpu`
work pool (Prefect dispatches flow runs, not tasks, to pools); these tasks only wait for them
(tasks/children.py: one child per model and try, started again if it crashes).
Each child run holds `gpu_count` slots of the global concurrency limit `gpu` itself
(tasks/gpus.py), so at most that many GPUs are in use across every sweep and every other run;
the waiting parent holds none, so it can never take a slot its child needs.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import fsspec
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from layerprune.models.loading import check_architecture
from layerprune.report.figures import metric_curves
from layerprune.report.leaderboard.figures import can_lose_figure
from layerprune.report.leaderboard.nights import (
    LOSE_FIGURE,
    LOSS_FIGURE,
    Leaderboard,
    model_entry,
    night_record,
)
from layerprune.report.leaderboard.page import publish_night
from layerprune.store.remote import storage_options_from_env
from tasks.children import run_child
from tasks.common import run_stage, stage_task
from tasks.gpus import gpu_job
from tasks.results import read_run_summary, summary_path

STAGE, VERSION = "sweep", 1


@task(name="plan-model", retries=1, cache_policy=NO_CACHE)
def model_depth(ref: str) -> int:
    """Number of decoder layers of `ref`, from its config alone (no weights are read)."""
    return check_architecture(ref)


@task(name="run-model", task_run_name="run-{label}", cache_policy=NO_CACHE)
def run_model(deployment: str, params: dict, timeout_s: int, label: str,
              gpu_count: int = 1) -> dict:
    """Run one model through `deployment` on `gpu_count` GPUs; its summary.

    One child flow run per model and try (tasks.children: idempotent, retried if it crashes);
    `timeout_s` includes the child's wait for its `gpu` slots. The summary is the one the child
    stored in the artifact store (tasks.results.read_run_summary), not a Prefect result."""
    logger = get_run_logger()
    model = hashlib.sha256(params["model"]["ref"].encode()).hexdigest()[:16]
    run = run_child(deployment, {"params": params}, label, work=f"model-{model}",
                    timeout_s=timeout_s, **gpu_job(gpu_count))
    summary = read_run_summary(params["artifacts"], str(run.id))
    if summary is None:
        raise RuntimeError(f"{label}: flow run {run.name} ({run.id}) completed but stored no "
                           f"summary at {summary_path(params['artifacts'], str(run.id))}")
    logger.info("%s: flow run %s completed; report %s", label, run.name, summary["report_uri"])
    return {"model": label, "flow_run": str(run.id), **summary}


def _short(ref: str) -> str:
    return Path(ref.rstrip("/")).name if Path(ref).is_absolute() else ref


def model_label(ref: str, refs: list[str]) -> str:
    """A short name for figures and tables: a path's last component, unless that is ambiguous."""
    short = _short(ref)
    return short if [_short(r) for r in refs].count(short) == 1 else ref


def _read_results(report_uri: str) -> pd.DataFrame:
    with fsspec.open(f"{report_uri.rstrip('/')}/results.parquet", "rb",
                     **storage_options_from_env(report_uri)) as f:
        return pd.read_parquet(f)


def key_params(children: list[dict]) -> dict:
    return {"reports": sorted((c["model"], c["report_uri"]) for c in children)}


@stage_task(STAGE, VERSION, key_params)
def publish_sweep_report(store_root: str, children: list[dict]) -> dict:
    """One table (parquet) and one figure across models, from each run's stored results."""
    frames = []
    for c in children:
        df = _read_results(c["report_uri"])
        df.insert(0, "model", c["model"])
        df["base_loss"] = round(c["base_loss"], 4)
        frames.append(df.drop(columns=["recipe"], errors="ignore"))
    # Children label their rows by `variant` ("similarity", "similarity, lora", ...).
    kind = "variant" if all("variant" in f for f in frames) else "strategy"
    table = pd.concat(frames, ignore_index=True).sort_values(["model", kind, "n"])
    # One line per model: the paper's method when it ran, unhealed, from the unpruned model.
    strategy = "similarity" if "similarity" in set(table[kind]) else table[kind].iloc[0]
    curve = [{"fraction": 0.0, "variant": c["model"], "loss": c["base_loss"]} for c in children]
    curve += [{"fraction": r["fraction"], "variant": r["model"], "loss": r["loss"]}
              for r in table[table[kind] == strategy].to_dict(orient="records")]

    def build(out: Path) -> dict:
        table.to_parquet(out / "results.parquet", index=False)
        metric_curves(curve, out / "loss_vs_fraction.png", ["loss"],
                      title=f"next-token loss against fraction dropped ({strategy})")
        return {"models": [c["model"] for c in children], "rows": len(table)}

    manifest = run_stage(store_root, STAGE, VERSION, key_params(children), build)
    records = table.to_dict(orient="records")
    return {"report_uri": manifest["uri"], "rows": records}


def _read_bytes(uri: str) -> bytes | None:
    try:
        with fsspec.open(uri, "rb", **storage_options_from_env(uri)) as f:
            return f.read()
    except FileNotFoundError:
        return None


@task(name="publish-leaderboard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_leaderboard(store_root: str, children: list[dict], sweep_report_uri: str,
                        flow_run_id: str, started: datetime) -> dict:
    """This sweep's night on the leaderboard (`<store_root>/leaderboard/`): every number as
    JSON, its figures, and the page rebuilt from every night; also the markdown artifact
    `leaderboard`. Not a cached stage: a night belongs to one sweep run (named by `started`
    and the run's id), and a retry of the run rewrites its own night.

    Each model's rows are its run's results.parquet, its base values the run's summary; speed
    columns a run did not measure read as None."""
    entries = [model_entry(c["model"], _read_results(c["report_uri"]),
                           c.get("base") or {"loss": c["base_loss"]}, c["report_uri"])
               for c in children]
    night = Leaderboard(store_root).night_for(flow_run_id, started)
    record = night_record(flow_run_id, night, entries, sweep_report_uri)
    figures = {LOSE_FIGURE: can_lose_figure(record)}
    loss_curves = _read_bytes(f"{sweep_report_uri.rstrip('/')}/loss_vs_fraction.png")
    if loss_curves is not None:
        figures[LOSS_FIGURE] = loss_curves
    published = publish_night(store_root, record, figures)
    create_markdown_artifact(key="leaderboard", markdown=published.pop("markdown"),
                             description="prune-and-heal nightly leaderboard")
    get_run_logger().info("leaderboard: %s (%d nights; this one: %s)",
                          published["leaderboard_uri"], published["nights"],
                          published["night_uri"])
    return published
