"""Prefect task: the run's results table (parquet), figures, and Prefect table/markdown artifacts.

One row per variant: a strategy's choice at block size n ("similarity"), the random baseline's
mean ± sd over its blocks ("random", with `<metric>_sd` columns), and each healed variant
("similarity, lora"), whose row says how much of the loss gap its method closed:
100 * (pruned loss - healed loss) / (pruned loss - base loss), beside the tokens it trained on,
its seconds and its peak memory. Figures are embedded in the markdown artifact as data URIs, so
the Prefect UI shows them whatever the artifact store is (a local path or an S3 URL would not
render in a browser).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from layerprune.config import PruneAndHealParams
from layerprune.distances import HEATMAP_FILE
from layerprune.stability import STABILITY_FIGURE
from layerprune.figures import metric_curves, train_loss_curves
from layerprune.prune import describe_layers
from tasks.common import run_stage, stage_files, stage_task

STAGE, VERSION = "report", 3
HEALING_FIGURE = "healing_curves.png"
# Measured, not computed: two computations of the same heal differ in these (and only these).
MEASURED_COLUMNS = ("heal_seconds", "heal_peak_memory_mb")
# The comparison of healing methods, in the order a reader wants it.
HEALING_COLUMNS = ["strategy", "n", "heal_method", "pruned_loss", "loss", "loss_gap_closed_pct",
                   "heal_tokens", "fit_tokens", "heal_seconds", "heal_peak_memory_mb"]


def describe_variant(recipe: dict, variant: str) -> dict:
    """The columns that say which variant a row is, from its prune recipe."""
    r = recipe["meta"]
    distance = r.get("block_distance")
    return {"variant": variant, "strategy": r["strategy"], "n": r["n"],
            "fraction": round(r["fraction"], 4),
            "removed_layers": describe_layers(r["removed_layers"]),
            "block_distance": None if distance is None else round(distance, 4)}


def random_row(found: list[tuple[dict, dict]]) -> dict:
    """The random baseline at one n: each metric's mean over the k blocks, and its sample
    standard deviation as `<metric>_sd`; `found` holds (recipe, metrics) per block."""
    recipes, metrics = zip(*found)
    row = describe_variant(recipes[0], "random")
    row["removed_layers"] = "; ".join(describe_layers(r["meta"]["removed_layers"])
                                      for r in recipes)
    row["block_distance"] = round(float(pd.Series(
        [r["meta"]["block_distance"] for r in recipes]).mean()), 4)
    for key in metrics[0]:
        values = pd.Series([m[key] for m in metrics], dtype=float)
        row[key] = round(float(values.mean()), 4)
        if not key.endswith("_baseline"):
            row[f"{key}_sd"] = round(float(values.std(ddof=1)), 4)
    return row


def healing_columns(healed: dict) -> dict:
    """What a healed row says about its healing, from the heal stage's manifest."""
    m = healed["meta"]
    train_loss = m.get("final_train_loss")
    return {"heal_method": m["method"], "heal_tokens": m["tokens_seen"],
            "fit_tokens": m.get("fit_tokens") or 0,
            "heal_seconds": round(m["wall_seconds"], 1),
            "heal_peak_memory_mb": round(m["peak_memory_mb"]),
            "heal_train_loss": None if train_loss is None else round(train_loss, 4)}


def with_gap_closed(table: pd.DataFrame, base_loss: float) -> pd.DataFrame:
    """Add, to each healed row, its unhealed variant's loss and the % of the gap it closed."""
    if "heal_method" not in table:
        return table
    healed = table["heal_method"].notna()
    unhealed = table[~healed].set_index(["strategy", "n"])["loss"]
    pruned = unhealed.reindex(pd.MultiIndex.from_frame(table[["strategy", "n"]])).to_numpy()
    table["pruned_loss"] = pd.Series(pruned, index=table.index).where(healed)
    table["loss_gap_closed_pct"] = (100 * (table["pruned_loss"] - table["loss"])
                                    / (table["pruned_loss"] - base_loss)).round(1)
    return table


def key_params(model_info: dict, distances: dict, base: dict, rows: list[dict],
               heals: dict[str, dict]) -> dict:
    # The measured costs come with the heal manifests, which are keyed by `heals`; keying them
    # again would give two computations of the same heals two reports.
    return {"model": model_info["fingerprint"], "distances": distances["key"], "base": base,
            "rows": [{k: v for k, v in r.items() if k not in MEASURED_COLUMNS} for r in rows],
            "heals": {label: m["key"] for label, m in heals.items()}}


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
    table = with_gap_closed(table, base_loss)
    for column in ("heal_tokens", "fit_tokens", "heal_peak_memory_mb"):  # counts, where healed
        if column in table:
            table[column] = table[column].astype("Int64")
    healing = table[table["heal_method"].notna()][
        [c for c in HEALING_COLUMNS if c in table]] if "heal_method" in table else None
    metrics = metric_columns(rows)

    def build(out: Path):
        table.to_parquet(out / "results.parquet", index=False)
        metric_curves(rows, out / "metrics_vs_fraction.png", metrics, base=base,
                      title=model_info["ref"])
        if heals:
            curves = {label: json.loads((stage_files(store_root, m) / "loss_curve.json")
                                        .read_text()) for label, m in heals.items()}
            curves = {label: c for label, c in curves.items() if c}  # linear: no training
            if curves:
                train_loss_curves(curves, out / HEALING_FIGURE, title="healing (training)")
        return {"rows": len(rows), "base": base}

    manifest = run_stage(store_root, STAGE, VERSION,
                         key_params(model_info, distances, base, rows, heals), build)
    report_dir = stage_files(store_root, manifest)
    heatmap = stage_files(store_root, distances) / HEATMAP_FILE
    shown = table.drop(columns=[c for c in table if c.endswith("_baseline")])
    records = shown.astype(object).where(shown.notna(), None).to_dict(orient="records")
    blank = shown.astype(object).where(shown.notna(), "")  # where a column does not apply
    text = blank.to_string(index=False)
    create_table_artifact(table=records,
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
            "## How stable is the choice of block",
            f"{distances['meta']['stability']}. Left: the share of bootstrap resamples of "
            "the calibration samples each start wins (ring: the full sample's choice; markers: "
            "each disjoint fold's); right: how much further the runner-up block is, red where "
            "its 95% interval reaches 0 (a close call).",
            _img(stage_files(store_root, distances) / STABILITY_FIGURE, "stability"),
            "## Metrics against the fraction of layers dropped (the paper's Fig. 1d)",
            _img(report_dir / "metrics_vs_fraction.png", "metric curves"),
            *(["## Healing methods compared",
               "Each method healed the same pruned model on the same data; the training "
               "methods saw the same number of tokens (`heal_tokens`). Gap closed: 100 x "
               "(pruned loss - healed loss) / (pruned loss - base loss).",
               healing.astype(object).where(healing.notna(), "").to_markdown(index=False)]
              if healing is not None else []),
            *(["## Healing: train loss of each training run",
               _img(report_dir / HEALING_FIGURE, "healing curves")]
              if (report_dir / HEALING_FIGURE).exists() else []),
            "## Variants",
            blank.to_markdown(index=False),
        ]),
    )
    return {"report_uri": manifest["uri"], "table": text, "base": base, "base_loss": base_loss,
            "rows": records}
