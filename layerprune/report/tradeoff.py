"""The trade-off of pruning one model: what each variant keeps (loss, each benchmark) against
what it gains (decode speedup, weight bytes saved), and which variants are Pareto-best.

A variant is Pareto-best on a metric when no other point (another variant or the base model) is
at least as fast and at least as good and strictly better in one of the two: every variant off
the front has a better choice. The random baseline's row is a mean over blocks, not a model one
could ship, so it is drawn but never on the front. Rows are the flow's variant rows
(tasks/report.py): `variant`, `n`, `strategy`, `heal_method` (healed rows), the metric,
`<metric>_stderr` or `<metric>_sd` (random), `decode_speedup`, `bytes_saved_pct`.
"""

from __future__ import annotations

import math

from matplotlib.ticker import ScalarFormatter

from layerprune.report.figures import error_bar, plt, save_figure

# The x axes of the picture: (row column, axis label, the base model's value).
AXES = (("decode_speedup", "decode speedup (variant / base tokens per s)", 1.0),
        ("bytes_saved_pct", "weight bytes saved (%)", 0.0))
# One marker per healing method ("o": not healed), so healed and unhealed points differ in shape.
MARKERS = {None: "o", "linear": "s", "lora": "^", "distill": "D", "linear+distill": "v"}


def higher_is_better(metric: str) -> bool:
    """Benchmarks are accuracies; loss (and bits per byte) is better lower."""
    return metric not in ("loss", "bits_per_byte")


def _number(x) -> float | None:
    """A finite float, or None for a missing value (None, NaN from a table)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[bool]:
    """For each (speedup, quality) point: is it non-dominated? Point q dominates p when q's
    speedup >= p's and q's quality is at least as good, with one of the two strictly better;
    equal points do not dominate each other (both stay on the front). Quality is better higher,
    or lower if not `higher_is_better` (loss). A point with a missing or NaN coordinate is not
    on the front and dominates nothing.

    One pass over the points sorted by speedup, fastest first: a point is on the front when it
    is the best of its speedup and strictly better than every strictly faster point."""
    sign = 1.0 if higher_is_better else -1.0
    valid = [i for i, (x, y) in enumerate(points)
             if _number(x) is not None and _number(y) is not None]
    on_front = [False] * len(points)
    order = sorted(valid, key=lambda i: -float(points[i][0]))
    best_faster = -math.inf  # the best quality among points strictly faster than this group
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and float(points[order[end]][0]) == float(points[order[start]][0]):
            end += 1
        group = order[start:end]  # the points of one speedup
        best = max(sign * float(points[i][1]) for i in group)
        for i in group:
            quality = sign * float(points[i][1])
            on_front[i] = quality == best and quality > best_faster
        best_faster = max(best_faster, best)
        start = end
    return on_front


def pareto_best(rows: list[dict], base: dict, metric: str,
                x: str = "decode_speedup") -> list[dict]:
    """The variant rows on the front of `metric` against column `x` (the base model competes at
    its own point, speedup 1 and nothing saved, but is not returned)."""
    base_x = dict((a, v) for a, _, v in AXES)[x]
    candidates = [r for r in rows if r.get("strategy") != "random"
                  and _number(r.get(metric)) is not None and _number(r.get(x)) is not None]
    points = [(r[x], r[metric]) for r in candidates]
    if _number(base.get(metric)) is not None:
        points.append((base_x, base[metric]))
    front = pareto_front(points, higher_is_better(metric))
    return [r for r, best in zip(candidates, front) if best]


def label(row: dict) -> str:
    return f"{row['variant']} n={row['n']}"


def tradeoff_figure(rows: list[dict], base: dict, metrics: list[str], path, title: str = "") \
        -> None:
    """One column of panels per metric: quality against decode speedup (top row) and against
    the weight bytes saved (bottom row); one colour per strategy, one marker per healing method,
    error bars (stderr, or sd over the random blocks), the base model as a black star with its
    own error bar, and the Pareto-best variants ringed and labelled "variant n=N"."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    colour = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    fig, axes = plt.subplots(len(AXES), len(metrics), figsize=(4.4 * len(metrics), 7.6),
                             squeeze=False)
    for column, metric in enumerate(metrics):
        for (x, xlabel, base_x), ax in zip(AXES, axes[:, column]):
            for variant in dict.fromkeys(r["variant"] for r in rows):
                pts = [r for r in rows if r["variant"] == variant
                       and _number(r.get(metric)) is not None and _number(r.get(x)) is not None]
                if not pts:
                    continue
                first = pts[0]
                random = first["strategy"] == "random"
                ax.errorbar([r[x] for r in pts], [r[metric] for r in pts],
                            yerr=[error_bar(r, metric) or 0.0 for r in pts], linestyle="none",
                            marker=MARKERS.get(first.get("heal_method"), "P"), capsize=3,
                            color="grey" if random else colour[first["strategy"]],
                            markerfacecolor="none" if random else None, label=variant)
            if _number(base.get(metric)) is not None:
                ax.errorbar([base_x], [base[metric]], yerr=[error_bar(base, metric) or 0.0],
                            marker="*", markersize=11, color="black", capsize=3,
                            linestyle="none", label="base model")
            # Variants at one point (strategies that chose the same block; healed ones at the
            # bytes of their unhealed one) share one ring and one label.
            at: dict[tuple, list[str]] = {}
            for r in pareto_best(rows, base, metric, x):
                at.setdefault((r[x], r[metric]), []).append(label(r))
            for k, ((px, py), names) in enumerate(sorted(at.items())):
                ax.plot(px, py, "o", markersize=15, markerfacecolor="none",
                        markeredgecolor="red", markeredgewidth=1.5)
                # Staggered: neighbouring points' labels would print over each other.
                ax.annotate("\n".join(names), (px, py), textcoords="offset points",
                            xytext=(8, 4 - 12 * (k % 3)), fontsize=7, color="red", va="top")
            values = [float(r[metric]) for r in rows if _number(r.get(metric)) is not None]
            if metric == "loss" and values and min(values) > 0 and max(values) > 3 * min(values):
                # A badly chosen block's loss can be many times the base's: a log axis keeps
                # the good variants apart.
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
            better = "higher is better" if higher_is_better(metric) else "lower is better"
            ax.set_ylabel(f"{metric} ({better})")
            ax.set_xlabel(xlabel)
            ax.margins(x=0.15)  # room for the labels of the rightmost points
            ax.grid(alpha=0.3)
    axes[0][0].plot([], [], "o", markersize=10, markerfacecolor="none", markeredgecolor="red",
                    label="Pareto-best")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
