"""The leaderboard's page (`index.html`) and its Prefect markdown twin, from the nights' records.

Both show the same three things: the latest night's "layers it can lose" table and figures (the
sweep's loss curves, the bars), and the trend of every model's largest droppable fraction over
all nights (a figure and its numbers). The page is static and offline: no JavaScript, no
external URL, every text escaped (model names come from flow parameters), images referenced by
paths relative to `index.html` (`nights/<night>/figures/...`, `figures/trend-...png`), so the
directory can be copied, served by any web server or opened from disk. The markdown embeds the
same images as data URIs (the Prefect UI cannot read the store).
"""

from __future__ import annotations

import base64
import html

import pandas as pd

from layerprune.report.leaderboard.figures import metrics_of, trend_figure
from layerprune.report.leaderboard.nights import (
    FIGURES,
    LOSE_FIGURE,
    LOSS_FIGURE,
    NIGHT_FILE,
    NIGHTS_DIR,
    Leaderboard,
    nights_hash,
)
from layerprune.report.markdown import escape_md, escaped_table

TITLE = "prune-and-heal: the nightly leaderboard"
NOT_MEASURED = "not measured"


def rule_text(record: dict) -> str:
    return (f"For each model and metric: the largest fraction of layers dropped whose variant "
            f"keeps at least {record['keep']:.0%} of the base model's benchmark score, or "
            f"raises its next-token loss by at most {record['loss_rise']:.0%}; unhealed and "
            "healed; random-block variants left out. It is the largest fraction that passes, "
            "not the last before the first failure: quality is not monotone in the fraction "
            "(each n drops a different block), so a larger fraction can pass where a smaller "
            "one failed. 0 means no pruned variant passes. \"Near chance\": the base model "
            "itself scores within 2 standard errors of chance, or 90% of its score is at or "
            "below chance, so a model guessing at random would pass too.")


def _fraction(row: dict | None) -> str:
    if row is None or row["fraction"] is None:
        return NOT_MEASURED
    if not row["variant"]:
        return "0 (none passes)"
    return f"{row['fraction']:.2f} (n={int(row['n'])})"


def _speedup(row: dict | None) -> str:
    value = row and row.get("decode_speedup")
    return f"{value:.2f}×" if value else ("not measured" if row and row["variant"] else "")


def _base(metric: str, entry: dict, row: dict) -> str:
    base = entry["base"]
    text = f"{row['base']:.4g}"
    if base.get(f"{metric}_stderr") is not None:
        text += f" ± {base[f'{metric}_stderr']:.2g}"
    if row.get("chance") is not None:
        text += f" (chance {row['chance']:.3g})"
    return text


def _note(row: dict) -> str:
    if row["metric"] == "loss":
        return ""
    if row["near_chance"] or row["chance_passes"]:
        return "near chance"
    return "near chance unknown (no stderr)" if row["near_chance"] is None else ""


def latest_table(record: dict) -> pd.DataFrame:
    """One night's "layers it can lose": a row per (model, metric), unhealed beside healed."""
    out = []
    for entry in record["models"]:
        for metric in metrics_of([entry]):
            found = {r["healed"]: r for r in entry["can_lose"] if r["metric"] == metric}
            first = found.get(False) or found[True]
            out.append({
                "model": entry["model"], "depth": entry["depth"] or "", "metric": metric,
                "base": _base(metric, entry, first),
                "unhealed: largest fraction": _fraction(found.get(False)),
                "unhealed: variant": (found.get(False) or {}).get("variant") or "",
                "unhealed: decode speedup": _speedup(found.get(False)),
                "healed: largest fraction": _fraction(found.get(True)),
                "healed: variant": (found.get(True) or {}).get("variant") or "",
                "healed: decode speedup": _speedup(found.get(True)),
                "note": _note(first)})
    return pd.DataFrame(out)


def night_label(night: dict) -> str:
    return night["time"][:16].replace("T", " ") + " UTC"


def trend_table(nights: list[dict]) -> pd.DataFrame:
    """Each model's largest droppable fraction per metric and state (rows) and night (columns):
    the numbers of the trend figure."""
    cells: dict[tuple, dict] = {}
    for night in nights:
        for entry in night["models"]:
            for r in entry["can_lose"]:
                key = (entry["model"], r["metric"], "healed" if r["healed"] else "unhealed")
                cells.setdefault(key, {})[night_label(night)] = \
                    "" if r["fraction"] is None else f"{r['fraction']:.2f}"
    labels = [night_label(n) for n in nights]
    return pd.DataFrame([{"model": k[0], "metric": k[1], "state": k[2],
                          **{label: v.get(label, "") for label in labels}}
                         for k, v in cells.items()], columns=["model", "metric", "state", *labels])


def _html_table(frame: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:left}th{background:#eee}
img{max-width:100%;display:block;margin:1em 0;border:1px solid #ddd}
p.rule{max-width:60em;font-size:14px}"""


def figure_paths(record: dict) -> dict[str, str]:
    """A night's figures, by name, as paths relative to index.html."""
    return {name: f"{NIGHTS_DIR}/{record['night']}/{rel}"
            for name, rel in record.get("figures", {}).items()}


def render_html(nights: list[dict], trend_name: str) -> str:
    """The page (module doc); `nights` oldest first, `trend_name` the trend figure's file under
    `figures/`."""
    latest = nights[-1]
    figures = figure_paths(latest)
    parts = [f"<h1>{html.escape(TITLE)}</h1>",
             f"<p>Latest night: <b>{html.escape(night_label(latest))}</b>, sweep flow run "
             f"<code>{html.escape(str(latest['flow_run_id']))}</code>, "
             f"{len(latest['models'])} model(s); {len(nights)} night(s) in all.</p>",
             "<h2>Layers it can lose</h2>",
             f'<p class="rule">{html.escape(rule_text(latest))}</p>',
             _html_table(latest_table(latest), "can-lose")]
    if LOSS_FIGURE in figures:
        parts += ["<h2>Loss against the fraction of layers dropped</h2>",
                  _img(figures[LOSS_FIGURE], "loss against the fraction of layers dropped")]
    if LOSE_FIGURE in figures:
        parts += ["<h2>Layers it can lose, by model</h2>",
                  _img(figures[LOSE_FIGURE], "layers it can lose, by model")]
    parts += ["<h2>Trend over nights</h2>",
              _img(f"{FIGURES}/{trend_name}", "trend of the largest droppable fraction"),
              _html_table(trend_table(nights), "trend"),
              "<h2>Every number of every night</h2><ul>"]
    for night in reversed(nights):
        link = html.escape(f"{NIGHTS_DIR}/{night['night']}/{NIGHT_FILE}")
        parts.append(f'<li><a href="{link}">{html.escape(night_label(night))}</a> (flow run '
                     f"{html.escape(str(night['flow_run_id']))})</li>")
    parts.append("</ul>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(TITLE)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _data_uri(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def render_markdown(nights: list[dict], figures: dict[str, bytes], trend_png: bytes,
                    index_uri: str) -> str:
    """The Prefect artifact: the page's content, figures embedded (`figures`: the latest
    night's PNG bytes by name)."""
    latest = nights[-1]
    parts = [f"# {TITLE}",
             f"Latest night: **{night_label(latest)}**, sweep flow run "
             f"`{latest['flow_run_id']}`, {len(latest['models'])} model(s); {len(nights)} "
             f"night(s) in all. The page: {escape_md(index_uri)}.",
             "## Layers it can lose", rule_text(latest), escaped_table(latest_table(latest))]
    if LOSS_FIGURE in figures:
        parts += ["## Loss against the fraction of layers dropped",
                  _data_uri(figures[LOSS_FIGURE], "loss curves")]
    if LOSE_FIGURE in figures:
        parts += ["## Layers it can lose, by model",
                  _data_uri(figures[LOSE_FIGURE], "layers it can lose")]
    parts += ["## Trend over nights", _data_uri(trend_png, "trend"),
              escaped_table(trend_table(nights))]
    return "\n\n".join(parts)


def publish_night(store_root: str, record: dict, figures: dict[str, bytes],
                  storage_options: dict | None = None) -> dict:
    """Write one night (`record` from layerprune.report.leaderboard.nights.night_record, `figures` its PNGs
    by name) under `<store_root>/leaderboard/`, then rebuild the page from every night.
    Returns the page's and the night's URIs and the markdown of the Prefect artifact."""
    board = Leaderboard(store_root, storage_options)
    night_uri = board.write_night(record, figures)
    built: dict = {}

    def render(nights: list[dict]) -> tuple[str, bytes, str]:
        built["trend"] = trend_figure(nights)
        name = f"trend-{nights_hash(nights)}.png"
        return render_html(nights, name), built["trend"], name

    nights, index_uri = board.rebuild_index(render)
    return {"leaderboard_uri": index_uri, "night_uri": night_uri, "nights": len(nights),
            "markdown": render_markdown(nights, figures, built["trend"], index_uri)}
