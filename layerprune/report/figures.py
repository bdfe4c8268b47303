"""Figures in the style of the paper: the distance heatmap (Fig. 1c) and metric curves (Fig. 1d)
with error bars, the healing runs' train-loss curves, and the block choice's stability under the
calibration sample. The per-model trade-off picture is layerprune/report/tradeoff.py.

Written with matplotlib's Agg backend to PNG, atomically, so they work on headless workers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from layerprune.method.stability import runner_up  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Write `fig` to `path` as a PNG atomically (a temp file, then a rename) and close it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def distance_heatmap(distance: list[list[float]], path: str | Path, title: str = "") -> None:
    """x = first layer l of the block, y = block size n, colour = mean angular distance.

    The chosen block for each n (the row minimum) is marked, as in Fig. 1(c) of the paper.
    """
    n_layers = len(distance)
    grid = np.full((n_layers, n_layers), np.nan)
    for n, row in enumerate(distance, start=1):
        grid[n - 1, : len(row)] = row
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", vmin=0,
                   extent=(-0.5, n_layers - 0.5, 0.5, n_layers + 0.5))
    best = [int(np.nanargmin(grid[n - 1])) for n in range(1, n_layers + 1)]
    ax.plot(best, range(1, n_layers + 1), "o", color="white", markersize=3, label="argmin over l")
    ax.set_xlabel("first layer of the block, l")
    ax.set_ylabel("block size, n")
    ax.set_title(title or "angular distance d(x^(l), x^(l+n))")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax, label="shifted rescaled angular distance")
    save_figure(fig, path)


def error_bar(row: dict, metric: str) -> float | None:
    """A point's error bar: `<metric>_sd` where the row has one (the random baseline's spread
    over its blocks, which includes the sampling error of each), else `<metric>_stderr` (the
    standard error of the items' mean); None where neither is known (one item has none)."""
    for key in (f"{metric}_sd", f"{metric}_stderr"):
        value = row.get(key)
        if value is not None and np.isfinite(value):
            return float(value)
    return None


def metric_curves(rows: list[dict], path: str | Path, metrics: list[str],
                  base: dict[str, float] | None = None, title: str = "") -> None:
    """One panel per metric: value against the fraction of layers dropped, a line per variant.

    `rows` are dicts with keys `fraction`, `variant` (e.g. "similarity", "heuristic, lora") and
    one key per metric; each point's error bar is `error_bar` (sd, else stderr). `base` holds the
    unpruned model's values, drawn as reference lines with a band of ± its `<metric>_stderr`.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    variants = sorted({r["variant"] for r in rows})
    for ax, metric in zip(axes[0], metrics):
        for variant in variants:
            pts = sorted((r["fraction"], r[metric], error_bar(r, metric) or 0.0) for r in rows
                         if r["variant"] == variant and r.get(metric) is not None)
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3,
                            label=variant)
        if base and base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle="--", label="base model")
            err = error_bar(base, metric)
            if err:
                ax.axhspan(base[metric] - err, base[metric] + err, color="grey", alpha=0.15,
                           label="base ± stderr")
        ax.set_xlabel("fraction of layers dropped")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def train_loss_curves(curves: dict[str, list[dict]], path: str | Path,
                      title: str = "healing") -> None:
    """Train loss against step, one line per run; `curves` maps a label to [{"step", "loss"}]."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


HEATMAP_FILE, STABILITY_FIGURE = "heatmap.png", "stability.png"


def draw_distances(doc: dict, out_dir: str | Path, title: str = "") -> None:
    """The distance heatmap and the stability chart of a `stability.write_distances` document."""
    out_dir = Path(out_dir)
    distance_heatmap(doc["distance"], out_dir / HEATMAP_FILE, title=title)
    stability_chart(doc["stability"], doc["distance"], out_dir / STABILITY_FIGURE, title=title)


def heal_curve(heal_dir: str | Path) -> None:
    """`loss_curve.png` beside a heal's `loss_curve.json` (nothing for an empty curve: the
    linear patch trains nothing)."""
    import json

    heal_dir = Path(heal_dir)
    curve = json.loads((heal_dir / "loss_curve.json").read_text())
    if curve:
        train_loss_curves({"train loss": curve}, heal_dir / "loss_curve.png")


def stability_chart(stability: dict, distance: list[list[float]], path: str | Path,
                    title: str = "") -> None:
    """Is the block choice stable under the calibration sample? (layerprune.method.stability)

    Left, laid out as the heatmap (x = first layer l, y = block size n = 1..L-1): shading is the
    share of bootstrap resamples in which each start wins, the full sample's l*(n) is a black
    ring, and each disjoint fold's l*(n) a small marker: rings filled and folds on them mean the
    sample was enough. Right: how far the runner-up start's distance lies above the chosen
    block's, with the bootstrap interval of that gap (red where it reaches 0: a close call).
    """
    n_layers = len(distance)
    sizes = np.arange(1, n_layers)  # n = L has one start only: nothing to choose
    full = stability["start"]
    boot, folds = stability["bootstrap"], stability["folds"]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(9.6, 5.2), sharey=True,
                                   gridspec_kw={"width_ratios": [3, 2]})
    extent = (-0.5, n_layers - 0.5, 0.5, n_layers - 0.5)
    if "frequency" in boot and len(sizes):
        grid = np.full((n_layers - 1, n_layers), np.nan)
        for n in sizes:
            grid[n - 1, : len(boot["frequency"][n - 1])] = boot["frequency"][n - 1]
        im = ax.imshow(grid, origin="lower", cmap="Blues", vmin=0, vmax=1, aspect="auto",
                       extent=extent)
        fig.colorbar(im, ax=ax, label=f"share of {boot['resamples']} bootstrap resamples won",
                     pad=0.02)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.plot([full[n - 1] for n in sizes], sizes, "o", markersize=9, markerfacecolor="none",
            markeredgecolor="black", label="full sample l*(n)")
    if "start" in folds:
        k = folds["k"]
        for i, (starts, marker) in enumerate(zip(folds["start"], "x+^vsd" * k)):
            offset = (i - (k - 1) / 2) * 0.5 / k  # side by side, so agreeing folds stay visible
            ax.plot([starts[n - 1] + offset for n in sizes], sizes, marker, markersize=4,
                    color=f"C{1 + i % 9}", linestyle="none",
                    label=f"fold {i + 1} ({folds['sizes'][i]} samples)")
    ax.set_xlabel("first layer of the block, l")
    ax.set_ylabel("block size, n")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=7)
    ax.set_title("block choice: full sample, folds, bootstrap", fontsize=10)
    for n in sizes:  # how far behind the choice the next best start is, per n
        row, best = distance[n - 1], full[n - 1]
        gap = row[runner_up(row, best)] - row[best]
        margin = (boot.get("margin") or [None] * n_layers)[n - 1]
        if margin:
            close = margin["low"] <= 0  # some resamples rank the runner-up first
            # max(0, .): a percentile interval need not contain the full-sample gap.
            xerr = [[max(0.0, gap - margin["low"])], [max(0.0, margin["high"] - gap)]]
            side.errorbar(gap, n, xerr=xerr, fmt="o",
                          color="tab:red" if close else "black", markersize=3, capsize=2)
        else:
            side.plot(gap, n, "o", color="black", markersize=3)
    side.axvline(0, color="grey", linewidth=1)
    side.plot([], [], "o", color="black", markersize=3, label="interval above 0: clear")
    side.plot([], [], "o", color="tab:red", markersize=3, label="reaches 0: close call")
    side.set_xlabel("runner-up start's distance minus l*(n)'s\n"
                    f"({boot.get('level', 0.95):.0%} bootstrap interval)")
    side.grid(alpha=0.3)
    side.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
