"""Prefect task: the run's results table (parquet), figures, and Prefect table/markdown artifacts.

One row per variant: a strategy's choice at block size n ("similarity"), the random baseline's
mean ± sd over its blocks ("random", with `<metric>_sd` columns), and each healed variant
("similarity, lora"), whose row says how much of the loss gap its method closed:
100 * (pruned loss - healed loss) / (pruned loss - base loss), beside the tokens it trained on,
its seconds and its peak memory. Each variant row also carries its speed and memory
(tasks/speed.py; a healed row its unhealed variant's) and each metric's standard error
(`<metric>_stderr`), drawn as error bars; the trade-off picture (layerprune/report/tradeoff.py) sets
quality against decode speedup and memory saved. Figures are embedded in the markdown artifact
as data URIs, so the Prefect UI shows them whatever the artifact store is (a local path or an S3
URL would not render in a browser).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from layerprune.config import PruneAndHealParams
from layerprune.method.prune import describe_layers
from layerprune.report.figures import metric_curves, train_loss_curves
from layerprune.report.tradeoff import pareto_best, tradeoff_figure
from tasks.common import run_stage, stage_files, stage_task
from tasks.heal import STAGE as HEAL_STAGE
from tasks.speed import COLUMNS as SPEED_COLUMNS
from tasks.speed import STAGE as SPEED_STAGE

STAGE, VERSION = "report", 4
HEALING_FIGURE = "healing_curves.png"
TRADEOFF_FIGURE = "tradeoff.png"
# Measured, not computed, by stage: two computations of the same heal or of the same variant's
# speed differ in these (and only these). The report's key leaves them out, so it declares that
# it reads these stages' measured results: refreshing one of them refreshes the report too
# (`reads_measured`, tasks.common.refreshed).
MEASURED = {HEAL_STAGE: ("heal_seconds", "heal_peak_memory_mb"), SPEED_STAGE: SPEED_COLUMNS}
MEASURED_COLUMNS = tuple(c for columns in MEASURED.values() for c in columns)
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
    standard deviation as `<metric>_sd`; `found` holds (recipe, metrics) per block. The blocks
    all have n layers removed: their speed columns are averaged, without a spread, and a
    metric's `_stderr` is the mean of the blocks' (None unless every block has one)."""
    recipes, metrics = zip(*found)
    row = describe_variant(recipes[0], "random")
    row["removed_layers"] = "; ".join(describe_layers(r["meta"]["removed_layers"])
                                      for r in recipes)
    row["block_distance"] = round(float(pd.Series(
        [r["meta"]["block_distance"] for r in recipes]).mean()), 4)
    for key in metrics[0]:
        if any(m.get(key) is None for m in metrics):  # a stderr that one item could not give
            row[key] = None
            continue
        values = pd.Series([m[key] for m in metrics], dtype=float)
        row[key] = round(float(values.mean()), 4)
        if key == "weight_bytes" or key.endswith("_n"):  # counts stay counts
            row[key] = int(round(values.mean()))
        if not key.endswith(("_baseline", "_stderr", "_n")) and key not in SPEED_COLUMNS:
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
    # The measured costs come with the heal and speed manifests (heals are keyed by `heals`,
    # speeds by the rows' removed layers); keying them again would give two computations of
    # the same heals or speeds two reports.
    def computed(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in MEASURED_COLUMNS}

    return {"model": model_info["fingerprint"], "distances": distances["key"],
            "base": computed(base), "rows": [computed(r) for r in rows],
            "heals": {label: m["key"] for label, m in heals.items()}}


def metric_columns(rows: list[dict]) -> list[str]:
    """Metrics to plot: loss, then each benchmark that some variant has (not its baseline, its
    standard error or its item count)."""
    seen = dict.fromkeys(k for r in rows for k in r)
    return ["loss"] + [k for k in seen if f"{k}_baseline" in seen
                       and not k.endswith(("_stderr", "_n", "_sd"))]


def terminal_columns(metrics: list[str]) -> list[str]:
    """What the run prints (flows/prune_and_heal.py): which variant, its metrics with their
    error bars, what it gains, what healing did. Every column is in results.parquet and the
    Prefect artifacts; all of them would not fit a terminal."""
    return ["variant", "n", "removed_layers", *metrics, "decode_speedup", "bytes_saved_pct",
            "heal_method", "heal_tokens", "fit_tokens", "loss_gap_closed_pct"]


def _plus_minus(value, stderr) -> str:
    """'0.3158 ± 0.062': the value as stored, its standard error to two significant digits."""
    return f"{value}" if stderr is None or pd.isna(stderr) else f"{value} ± {stderr:.2g}"


def with_error_bars(table: pd.DataFrame) -> pd.DataFrame:
    """The table for reading: each metric that has a `<metric>_stderr` column shown as
    'value ± stderr' in one cell (the stderr column dropped); blank where a column does not
    apply."""
    out = table.astype(object).where(table.notna(), None)
    for metric in [c.removesuffix("_stderr") for c in table if c.endswith("_stderr")]:
        if metric in out:
            out[metric] = [None if v is None else _plus_minus(v, se)
                           for v, se in zip(out[metric], out[f"{metric}_stderr"])]
        out = out.drop(columns=[f"{metric}_stderr"])
    return out.where(out.notna(), "")


def base_line(base: dict, markdown: bool = True) -> str:
    """The base model's metrics with their error bars, e.g. 'loss **3.19** ± 0.05,
    bits_per_byte **1.08**, mmlu **0.3158** ± 0.062 (57 items)' (values bold in markdown)."""
    bold = "**" if markdown else ""
    parts = []
    for k, v in base.items():
        if k.endswith(("_baseline", "_stderr", "_n")) or k in SPEED_COLUMNS:
            continue
        part = f"{k} {bold}{v}{bold}"
        if base.get(f"{k}_stderr") is not None:
            part += f" ± {base[f'{k}_stderr']:.2g}"
        if base.get(f"{k}_n") is not None:
            part += f" ({int(base[f'{k}_n'])} items)"  # a count, even read back as a float
        parts.append(part)
    return ", ".join(parts)


def tradeoff_text(rows: list[dict], base: dict, metrics: list[str], params) -> str:
    """What the trade-off figure shows, and its Pareto-best variants per metric by name."""
    best = []
    for metric in metrics:
        names = [f"{r['variant']} n={r['n']}" for r in pareto_best(rows, base, metric)]
        best.append(f"{metric}: {', '.join(names) or 'none (the base model itself)'}")
    s = params.speed
    return (f"Each metric against the decode speedup (top: tokens/s of the variant over the "
            f"base model's, {s.decode_tokens} greedy tokens at batch 1 on this run's device, "
            f"median of {s.repeats} alternated rounds) and against the weight bytes saved "
            "(bottom). Error bars: standard errors (random: the sd over its blocks). A healed "
            "variant has the layers, and so the speed, of its unhealed one. Base model: decode "
            f"{base.get('decode_tokens_per_s')} tokens/s, prefill "
            f"{base.get('prefill_tokens_per_s')} tokens/s ({s.batch} x {s.prefill_tokens} "
            f"tokens), weights {base.get('weight_bytes', 0) / 1e6:.1f} MB. Pareto-best by "
            "decode speedup (no other variant, nor the base model, is at least as fast and at "
            "least as good): " + "; ".join(best) + ".")


def report_tables(rows: list[dict], base: dict) -> tuple[pd.DataFrame, pd.DataFrame | None,
                                                          list[str]]:
    """(the variants' table, the healing methods' table or None, the metric columns)."""
    table = pd.DataFrame(rows).sort_values(["n", "variant"]).reset_index(drop=True)
    table["loss_increase"] = (table["loss"] - base["loss"]).round(4)
    table = with_gap_closed(table, base["loss"])
    for column in ("heal_tokens", "fit_tokens", "heal_peak_memory_mb", "weight_bytes"):  # counts
        if column in table:
            table[column] = table[column].astype("Int64")
    healing = table[table["heal_method"].notna()][
        [c for c in HEALING_COLUMNS if c in table]] if "heal_method" in table else None
    return table, healing, metric_columns(rows)


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as shown: without the per-metric chance and item-count columns."""
    return table.drop(columns=[c for c in table if c.endswith(("_baseline", "_n"))])


@stage_task(STAGE, VERSION, key_params, reads_measured=MEASURED)
def publish_report(store_root: str, params: PruneAndHealParams, model_info: dict,
                   distances: dict, base: dict, rows: list[dict],
                   heals: dict[str, dict]) -> dict:
    """`heals`: {variant label: heal stage manifest}; their loss curves go in one figure. The
    Prefect artifacts of the report are `tasks.artifacts.show_report`'s, on every run."""
    base_loss = base["loss"]
    table, healing, metrics = report_tables(rows, base)

    def build(out: Path):
        table.to_parquet(out / "results.parquet", index=False)
        metric_curves(rows, out / "metrics_vs_fraction.png", metrics, base=base,
                      title=model_info["ref"])
        if "decode_speedup" in table:
            tradeoff_figure(rows, base, metrics, out / TRADEOFF_FIGURE,
                            title=f"{model_info['ref']}: quality against speed and memory")
        if heals:
            curves = {label: json.loads((stage_files(store_root, m) / "loss_curve.json")
                                        .read_text()) for label, m in heals.items()}
            curves = {label: c for label, c in curves.items() if c}  # linear: no training
            if curves:
                train_loss_curves(curves, out / HEALING_FIGURE, title="healing (training)")
        return {"rows": len(rows), "base": base}

    manifest = run_stage(store_root, STAGE, VERSION,
                         key_params(model_info, distances, base, rows, heals), build)
    shown = shown_table(table)
    records = shown.astype(object).where(shown.notna(), None).to_dict(orient="records")
    readable = with_error_bars(shown)
    text = readable[[c for c in terminal_columns(metrics) if c in readable]].to_string(
        index=False)
    return {"report_uri": manifest["uri"], "table": text, "base": base, "base_loss": base_loss,
            "rows": records}
