"""Prefect task: the run's results table (parquet), figures, and Prefect table/markdown artifacts.

Figures are embedded in the markdown artifact as data URIs, so the Prefect UI shows them
whatever the artifact store is (a local path or an S3 URL would not render in a browser).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from layerprune.config import PruneAndHealParams
from layerprune.distances import HEATMAP_FILE
from layerprune.figures import metric_curves, train_loss_curves
from tasks.common import run_stage, stage_files, stage_task

STAGE, VERSION = "report", 1
HEALING_FIGURE = "healing_curves.png"


def key_params(model_info: dict, distances: dict, base: dict, rows: list[dict],
               heals: dict[str, dict]) -> dict:
    return {"model": model_info["fingerprint"], "distances": distances["key"], "base": base,
            "rows": rows, "heals": {label: m["key"] for label, m in heals.items()}}


def metric_columns(rows: list[dict]) -> list[str]:
    """Metrics to plot: loss, then each benchmark that some variant has (not its baseline)."""
    seen = dict.fromkeys(k for r in rows for k in r)
    return ["loss"] + [k for k in seen if f"{k}_baseline" in seen]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


@stage_task(STAGE, VERSION, key_params)
def publish_report(store_root: str, params: PruneAndHealParams, model_info: dict,
                   distances: dict, base: dict, rows: list[dict],
                   heals: dict[str, dict]) -> dict:
    """`heals`: {variant label: heal stage manifest}; their loss curves go in one figure."""
    base_loss = base["loss"]
    table = pd.DataFrame(rows).sort_values(["n", "variant"]).reset_index(drop=True)
    table["loss_increase"] = (table["loss"] - base_loss).round(4)
    metrics = metric_columns(rows)

    def build(out: Path):
        table.to_parquet(out / "results.parquet", index=False)
        metric_curves(rows, out / "metrics_vs_fraction.png", metrics, base=base,
                      title=model_info["ref"])
        if heals:
            curves = {label: json.loads((stage_files(store_root, m) / "loss_curve.json")
                                        .read_text()) for label, m in heals.items()}
            train_loss_curves(curves, out / HEALING_FIGURE, title="QLoRA healing")
        return {"rows": len(rows), "base": base}

    manifest = run_stage(store_root, STAGE, VERSION,
                         key_params(model_info, distances, base, rows, heals), build)
    report_dir = stage_files(store_root, manifest)
    heatmap = stage_files(store_root, distances) / HEATMAP_FILE
    shown = table.drop(columns=[c for c in table if c.endswith("_baseline")])
    text = shown.to_string(index=False)
    create_table_artifact(table=shown.to_dict(orient="records"),
                          key="pruned-models", description="Pruned variants and their loss")
    create_markdown_artifact(
        key="prune-report",
        description=f"prune-and-heal report for {model_info['ref']}",
        markdown="\n\n".join([
            f"# prune-and-heal: {model_info['ref']}",
            f"{model_info['num_layers']} layers; base model: "
            + ", ".join(f"{k} **{v}**" for k, v in base.items() if not k.endswith("_baseline"))
            + f" (loss on {params.loss.samples} records of `{params.loss.data}`; chance: "
            + ", ".join(f"{k[:-9]} {v}" for k, v in base.items() if k.endswith("_baseline"))
            + f"). Artifacts in `{manifest['uri']}`.",
            "## Angular distance between the inputs of layers l and l+n",
            _img(heatmap, "distance heatmap"),
            "## Metrics against the fraction of layers dropped (the paper's Fig. 1d)",
            _img(report_dir / "metrics_vs_fraction.png", "metric curves"),
            *(["## Healing: train loss of each QLoRA run",
               _img(report_dir / HEALING_FIGURE, "healing curves")] if heals else []),
            "## Variants",
            shown.to_markdown(index=False),
        ]),
    )
    return {"report_uri": manifest["uri"], "table": text, "base": base, "base_loss": base_loss,
            "rows": shown.to_dict(orient="records")}
