"""What the Prefect UI shows of a run: its report and tables, as Prefect artifacts.

Published by plain (uncached) tasks after the cached stages, so a rerun whose stages are all
cache hits publishes them too. Keys are per model (`prune-report-<model>`, `pruned-models-
<model>`): one model's report never replaces another's in the UI. Names that come from users
(model refs, labels, data paths) are escaped before they go into markdown, so a model named
`[x](javascript:...)` or `<img onerror=...>` is shown as text, never rendered as a link or HTML.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from layerprune.config import PruneAndHealParams
from layerprune.report.figures import HEATMAP_FILE, STABILITY_FIGURE
from layerprune.report.markdown import escape_md, escaped_table
from layerprune.store.artifacts import ArtifactStore
from tasks.common import stage_files
from tasks.report import (
    HEALING_FIGURE,
    STAGE,
    TRADEOFF_FIGURE,
    base_line,
    publish_report,
    report_tables,
    shown_table,
    tradeoff_text,
    with_error_bars,
)


def artifact_key(kind: str, model_ref: str) -> str:
    """A Prefect artifact key for `kind` of one model: lowercase letters, digits and dashes, as
    Prefect requires; the model's last path component, then a hash of its whole ref (two models
    named alike in different folders get different keys)."""
    name = re.sub(r"[^a-z0-9]+", "-", model_ref.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    digest = hashlib.sha256(model_ref.encode()).hexdigest()[:8]
    return f"{kind}-{name[:40] or 'model'}-{digest}"


def _img(path: Path, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


@task(name="report-artifacts", cache_policy=NO_CACHE)
def show_report(store_root: str, params: PruneAndHealParams, model_info: dict,
                distances: dict, base: dict, rows: list[dict], heals: dict[str, dict],
                report: dict) -> None:
    """The run's table and markdown report artifacts, from the report stage's stored files
    (found by the stage's own key: `report`, the stage's result, may come from a cache)."""
    ref = model_info["ref"]
    table, healing, metrics = report_tables(rows, base)
    shown = shown_table(table)
    create_table_artifact(table=shown.astype(object).where(shown.notna(), None)
                          .to_dict(orient="records"), key=artifact_key("pruned-models", ref),
                          description=f"Pruned variants of {escape_md(ref)} and their metrics")
    key = publish_report.key({"store_root": store_root, "params": params,
                              "model_info": model_info, "distances": distances, "base": base,
                              "rows": rows, "heals": heals})
    report_dir = Path(stage_files(store_root, ArtifactStore(store_root).manifest(STAGE, key)))
    tradeoff = report_dir / TRADEOFF_FIGURE
    curves = report_dir / HEALING_FIGURE
    create_markdown_artifact(
        key=artifact_key("prune-report", ref),
        description=f"prune-and-heal report for {escape_md(ref)}",
        markdown="\n\n".join([
            f"# prune-and-heal: {escape_md(ref)}",
            f"{model_info['num_layers']} layers; base model: " + base_line(base)
            + f" (loss on {params.loss.samples} records of {escape_md(params.loss.data)}; "
            "chance: " + ", ".join(f"{k[:-9]} {v}" for k, v in base.items()
                                   if k.endswith("_baseline"))
            + f"). Artifacts in {escape_md(report['report_uri'])}.",
            "## Angular distance between the inputs of layers l and l+n",
            _img(stage_files(store_root, distances) / HEATMAP_FILE, "distance heatmap"),
            "## How stable is the choice of block",
            f"{distances['meta']['stability']}. Left: the share of bootstrap resamples of "
            "the calibration samples each start wins (ring: the full sample's choice; markers: "
            "each disjoint fold's); right: how much further the runner-up block is, red where "
            "its 95% interval reaches 0 (a close call).",
            _img(stage_files(store_root, distances) / STABILITY_FIGURE, "stability"),
            "## Metrics against the fraction of layers dropped (the paper's Fig. 1d)",
            _img(report_dir / "metrics_vs_fraction.png", "metric curves"),
            *(["## Quality against speed and memory", tradeoff_text(rows, base, metrics, params),
               _img(tradeoff, "trade-off")] if tradeoff.exists() else []),
            *(["## Healing methods compared",
               "Each method healed the same pruned model on the same data; the training "
               "methods saw the same number of tokens (`heal_tokens`). Gap closed: 100 x "
               "(pruned loss - healed loss) / (pruned loss - base loss).",
               escaped_table(healing)] if healing is not None else []),
            *(["## Healing: train loss of each training run", _img(curves, "healing curves")]
              if curves.exists() else []),
            "## Variants",
            "Metrics as value ± standard error; random: the mean over its blocks, with the sd "
            "over them in `<metric>_sd`.",
            escaped_table(with_error_bars(shown)),
        ]))


@task(name="sweep-artifacts", cache_policy=NO_CACHE)
def show_sweep_report(store_root: str, children: list[dict], report: dict) -> None:
    """The sweep's table and markdown report artifacts (its own keys: one sweep, many models),
    on every run, from the sweep report stage's stored files."""
    import pandas as pd

    table = pd.DataFrame(report["rows"])
    create_table_artifact(table=report["rows"], key="sweep-models",
                          description="Pruned variants of every model in the sweep")
    figure = Path(report["report_uri"].removeprefix("file://")) / "loss_vs_fraction.png"
    if not figure.exists():  # a remote store: the stage's files, downloaded once
        from tasks.sweep import STAGE, publish_sweep_report

        key = publish_sweep_report.key({"store_root": store_root, "children": children})
        figure = stage_files(store_root, ArtifactStore(store_root).manifest(STAGE, key)) \
            / "loss_vs_fraction.png"
    create_markdown_artifact(
        key="sweep-report", description="prune-and-heal sweep across models",
        markdown="\n\n".join([
            f"# prune-and-heal sweep: {len(children)} models",
            f"Artifacts in {escape_md(report['report_uri'])}; each model's own report is "
            "linked below.",
            "## Loss against the fraction of layers dropped", _img(figure, "loss curves"),
            "## Variants", escaped_table(table),
            "## Per-model runs",
            "\n".join(f"- {escape_md(c['model'])}: {escape_md(c['report_uri'])} (flow run "
                      f"{c['flow_run']})" for c in children),
        ]))
