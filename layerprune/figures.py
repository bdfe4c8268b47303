"""Figures in the style of the paper: the distance heatmap (Fig. 1c) and metric curves (Fig. 1d),
and the healing runs' train-loss curves.

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


def _save(fig, path: str | Path) -> None:
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
    _save(fig, path)


def metric_curves(rows: list[dict], path: str | Path, metrics: list[str],
                  base: dict[str, float] | None = None, title: str = "") -> None:
    """One panel per metric: value against the fraction of layers dropped, a line per variant.

    `rows` are dicts with keys `fraction`, `variant` (e.g. "similarity", "heuristic, healed") and
    one key per metric; `base` holds the unpruned model's values, drawn as reference lines.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    variants = sorted({r["variant"] for r in rows})
    for ax, metric in zip(axes[0], metrics):
        for variant in variants:
            pts = sorted((r["fraction"], r[metric]) for r in rows
                         if r["variant"] == variant and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        if base and base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle="--", label="base model")
        ax.set_xlabel("fraction of layers dropped")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


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
    _save(fig, path)
