"""Figures of the nightly leaderboard (layerprune/report/leaderboard/nights.py), as PNG bytes to store.

- `can_lose_figure`: one night, "layers it can lose": per metric, a bar per model and state
  (unhealed, healed), hatched where the benchmark is near chance (the bar means little there).
- `trend_figure`: every night, each model's largest droppable fraction per metric: x = night,
  solid = unhealed, dashed = healed.

Bytes, not files: the leaderboard writes them to the store itself (one whole-file write each,
local or S3), and the Prefect artifact embeds the same bytes.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STATES = ((False, "unhealed"), (True, "healed"))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def metrics_of(models: list[dict]) -> list[str]:
    """Loss first, then the benchmarks, in the order the models list them."""
    seen = dict.fromkeys(r["metric"] for m in models for r in m["can_lose"])
    return ["loss", *[k for k in seen if k != "loss"]] if seen else []


def _bar_label(metric: str, keep: float, loss_rise: float) -> str:
    return f"loss ≤ +{loss_rise:.0%}" if metric == "loss" else f"{metric} ≥ {keep:.0%} of base"


def can_lose_figure(record: dict) -> bytes:
    """Bars of one night's "layers it can lose" (module doc)."""
    models = record["models"]
    metrics = metrics_of(models) or ["loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 * len(models)) *
                                                        len(metrics), 3.8),
                             squeeze=False, sharey=True)
    x = np.arange(len(models))
    for ax, metric in zip(axes[0], metrics):
        for offset, (healed, label) in zip((-0.2, 0.2), STATES):
            heights, hatches = [], []
            for m in models:
                row = next((r for r in m["can_lose"] if r["metric"] == metric
                            and r["healed"] == healed), None)
                heights.append(np.nan if row is None or row["fraction"] is None
                               else row["fraction"])
                hatches.append("//" if row and (row["near_chance"] or row["chance_passes"])
                               else "")
            bars = ax.bar(x + offset, np.nan_to_num(heights), width=0.4, label=label,
                          color="C0" if not healed else "C2")
            for bar, hatch, h in zip(bars, hatches, heights):
                bar.set_hatch(hatch)
                if np.isnan(h):  # not measured: say so rather than draw a 0
                    ax.text(bar.get_x() + bar.get_width() / 2, 0.005, "n/a", ha="center",
                            va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, [m["model"] for m in models], rotation=20, ha="right", fontsize=8)
        ax.set_title(_bar_label(metric, record["keep"], record["loss_rise"]), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("largest fraction of layers dropped")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("layers it can lose (hatched: benchmark near chance)", fontsize=11)
    return _png(fig)


def trend_figure(nights: list[dict]) -> bytes:
    """Lines over nights of each model's largest droppable fraction (module doc)."""
    metrics = metrics_of([m for n in nights for m in n["models"]]) or ["loss"]
    models = list(dict.fromkeys(m["model"] for n in nights for m in n["models"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8),
                             squeeze=False, sharey=True)
    x = np.arange(len(nights))
    for ax, metric in zip(axes[0], metrics):
        for i, model in enumerate(models):
            for healed, label in STATES:
                y = []
                for night in nights:
                    entry = next((m for m in night["models"] if m["model"] == model), None)
                    row = entry and next((r for r in entry["can_lose"] if r["metric"] == metric
                                          and r["healed"] == healed), None)
                    y.append(np.nan if not row or row["fraction"] is None else row["fraction"])
                if not np.isnan(y).all():
                    ax.plot(x, y, marker="o", color=f"C{i % 10}",
                            linestyle="--" if healed else "-", label=f"{model}, {label}")
        ax.set_xticks(x, [n["time"][:16].replace("T", " ") for n in nights], rotation=30,
                      ha="right", fontsize=7)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("night (UTC)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("largest fraction of layers dropped")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("layers it can lose, night after night (solid: unhealed, dashed: healed)",
                 fontsize=11)
    return _png(fig)
