"""The per-model trade-off picture (layerprune/report/tradeoff.py) and the report's error bars
(layerprune.report.figures.error_bar, tasks.report's table and base line, the random row)."""

from __future__ import annotations

import math
import random

import matplotlib.image
import pytest

from layerprune.report.figures import error_bar, metric_curves
from layerprune.report.tradeoff import pareto_best, pareto_front, tradeoff_figure
from tasks.report import base_line, random_row, with_error_bars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _dominated_brute_force(points, higher_is_better):
    """The definition, pair by pair: q dominates p when it is >= in speed and at least as good,
    and strictly better in one; a point with a missing coordinate takes no part."""
    def ok(p):
        return all(v is not None and not math.isnan(v) for v in p)

    def better_eq(a, b):
        return a >= b if higher_is_better else a <= b

    out = []
    for p in points:
        if not ok(p):
            out.append(False)
            continue
        dominated = any(ok(q) and q[0] >= p[0] and better_eq(q[1], p[1])
                        and (q[0] > p[0] or q[1] != p[1]) for q in points)
        out.append(not dominated)
    return out


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_pareto_front_equals_the_definition_on_random_points_with_ties(higher_is_better):
    rng = random.Random(0)
    for _ in range(300):
        # Few distinct values: ties in speed, in quality and whole duplicate points are common.
        points = [(rng.choice([1.0, 1.1, 1.2, 1.5]), rng.choice([0.2, 0.25, 0.3, 3.5]))
                  for _ in range(rng.randint(0, 9))]
        if points and rng.random() < 0.3:
            i = rng.randrange(len(points))
            points[i] = (points[i][0], rng.choice([None, float("nan")]))
        assert pareto_front(points, higher_is_better) == \
            _dominated_brute_force(points, higher_is_better), points


def test_pareto_front_edge_cases():
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # equal: neither dominates
    assert pareto_front([(2.0, 0.5), (1.0, 0.5)]) == [True, False]  # faster, as good
    assert pareto_front([(1.0, 0.6), (1.0, 0.5)]) == [True, False]  # as fast, better
    assert pareto_front([(1.0, 3.0), (1.0, 4.0)], higher_is_better=False) == [True, False]
    assert pareto_front([(2.0, 4.0), (1.0, 3.0)], higher_is_better=False) == [True, True]
    assert pareto_front([]) == []


ROWS = [  # a report's rows: two strategies at two n, a healed one, the random baseline
    {"variant": "similarity", "strategy": "similarity", "n": 2, "fraction": 0.1, "loss": 3.55,
     "loss_stderr": 0.05, "mmlu": 0.30, "mmlu_stderr": 0.06, "decode_speedup": 1.05,
     "bytes_saved_pct": 5.0},
    {"variant": "similarity", "strategy": "similarity", "n": 6, "fraction": 0.2, "loss": 3.85,
     "loss_stderr": 0.05, "mmlu": 0.28, "mmlu_stderr": 0.06, "decode_speedup": 1.2,
     "bytes_saved_pct": 15.0},
    {"variant": "heuristic", "strategy": "heuristic", "n": 6, "fraction": 0.2, "loss": 22.3,
     "loss_stderr": 0.4, "mmlu": 0.21, "mmlu_stderr": 0.05, "decode_speedup": 1.25,
     "bytes_saved_pct": 15.0},
    {"variant": "similarity, linear", "strategy": "similarity", "n": 6, "fraction": 0.2,
     "heal_method": "linear", "loss": 3.59, "loss_stderr": 0.05, "mmlu": 0.25,
     "mmlu_stderr": None, "decode_speedup": 1.2, "bytes_saved_pct": 15.0},
    {"variant": "random", "strategy": "random", "n": 6, "fraction": 0.2, "loss": 2.0,
     "loss_sd": 1.0, "loss_stderr": 0.1, "mmlu": 0.5, "mmlu_sd": 0.1, "decode_speedup": 9.0,
     "bytes_saved_pct": 15.0},
]
BASE = {"loss": 3.19, "loss_stderr": 0.05, "mmlu": 0.3158, "mmlu_stderr": 0.062, "mmlu_n": 57,
        "mmlu_baseline": 0.25, "decode_tokens_per_s": 15.9, "weight_bytes": 538060032}


def test_pareto_best_per_metric_leaves_out_random_and_lets_the_base_compete():
    names = {m: [f"{r['variant']} n={r['n']}" for r in pareto_best(ROWS, BASE, m)]
             for m in ("loss", "mmlu")}
    # Loss: the linear patch is as fast as its unhealed variant and better; heuristic is the
    # fastest. The random mean (fast and good) is not a variant, so it blocks nothing.
    assert names["loss"] == ["similarity n=2", "heuristic n=6", "similarity, linear n=6"]
    # MMLU: similarity n=2 (0.30) is below the base (0.3158) yet faster: on the front.
    assert names["mmlu"] == ["similarity n=2", "similarity n=6", "heuristic n=6"]
    slow = [{**ROWS[0], "decode_speedup": 0.98}]  # slower than the base and worse: dominated
    assert pareto_best(slow, BASE, "loss") == []
    assert [r["n"] for r in pareto_best(ROWS, BASE, "loss", x="bytes_saved_pct")] == [2, 6]


def test_the_tradeoff_figure_is_a_png_with_a_panel_per_metric_and_axis(tmp_path):
    path = tmp_path / "tradeoff.png"
    tradeoff_figure(ROWS, BASE, ["loss", "mmlu"], path, title="tiny")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 30_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 700 and height > 700  # 2 columns (metrics) x 2 rows (speed, memory)
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]  # no temp file left


def test_error_bars_prefer_the_spread_over_blocks_and_tolerate_missing_stderr(tmp_path):
    assert error_bar(ROWS[4], "loss") == 1.0  # random: its sd, not its blocks' mean stderr
    assert error_bar(ROWS[0], "loss") == 0.05
    assert error_bar(ROWS[3], "mmlu") is None and error_bar({"mmlu_sd": float("nan")}, "mmlu") \
        is None
    metric_curves(ROWS, tmp_path / "curves.png", ["loss", "mmlu"], base=BASE)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_shows_values_with_their_error_bars():
    import pandas as pd

    shown = with_error_bars(pd.DataFrame(ROWS))
    assert "loss_stderr" not in shown and "mmlu_stderr" not in shown
    assert list(shown["mmlu"]) == ["0.3 ± 0.06", "0.28 ± 0.06", "0.21 ± 0.05", "0.25",
                                   "0.5"]
    assert list(shown["loss_sd"])[:2] == ["", ""]  # blank where a column does not apply
    line = base_line(BASE)
    assert line == "loss **3.19** ± 0.05, mmlu **0.3158** ± 0.062 (57 items)", line
    # the terminal's line (the demo prints it): the same, without markdown
    assert base_line(BASE, markdown=False) == "loss 3.19 ± 0.05, mmlu 0.3158 ± 0.062 (57 items)"


def test_random_row_averages_speed_without_a_spread_and_keeps_a_missing_stderr_missing():
    recipes = [{"meta": {"strategy": "random", "n": 1, "fraction": 0.25, "removed_layers": [i],
                         "block_distance": 0.1}} for i in (1, 2)]
    metrics = [{"loss": 3.0, "loss_stderr": 0.1, "mmlu_stderr": None, "mmlu_n": 57,
                "decode_speedup": 1.2, "weight_bytes": 100},
               {"loss": 5.0, "loss_stderr": 0.3, "mmlu_stderr": 0.05, "mmlu_n": 57,
                "decode_speedup": 1.4, "weight_bytes": 101}]
    row = random_row(list(zip(recipes, metrics)))
    assert row["loss"] == 4.0 and row["loss_sd"] == pytest.approx(math.sqrt(2), abs=1e-4)
    assert row["loss_stderr"] == 0.2 and row["mmlu_stderr"] is None and row["mmlu_n"] == 57
    assert row["decode_speedup"] == 1.3 and row["weight_bytes"] == 100  # round(100.5): even
    assert not {"decode_speedup_sd", "weight_bytes_sd", "loss_stderr_sd", "mmlu_n_sd"} & set(row)
