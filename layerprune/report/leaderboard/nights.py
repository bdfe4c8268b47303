"""The nightly leaderboard: how many layers each model of a sweep can lose, night after night.

"Layers it can lose" (`layers_it_can_lose`): per model, metric (next-token loss, each benchmark)
and state (unhealed, healed), the largest fraction of layers dropped among the model's
non-random variants whose score keeps >= `keep` x the base model's (benchmarks), or whose loss
stays <= (1 + `loss_rise`) x the base loss, with that variant's name, n and decode speedup.
The rule is "the largest fraction that passes", not "the fraction before the first failure":
quality is not monotone in the fraction dropped (a 30% variant may pass where a 20% one fails,
because each n removes a different block), and the table says which variant it was.

A benchmark whose base score is itself close to chance makes "keeps 90%" meaningless: a model
guessing at random meets it. Such a metric is flagged, not hidden (`near_chance`: the base is
within 2 standard errors of chance; `chance_passes`: 90% of the base is at or below chance).

The store layout, under `<artifacts>/leaderboard/` (local directory or s3://, fsspec):

    nights/<UTC time>-<flow run id[:8]>/leaderboard.json   every number of one night: written
                                                            last, so a listed night is complete
    nights/<night>/figures/*.png                            that night's figures
    figures/trend-<hash of the nights>.png                  the trend over all nights
    index.html                                              the page (leaderboard_page.py)

No file is read, modified and written back: each night owns its directory, and the index is
rebuilt from the listing of every night's JSON, then the listing is read again and the index
rebuilt until they agree. The last index written therefore holds every night whose JSON was
complete before that writer's final listing; a night completed later has a writer that lists,
and writes the index, after it (so two sweeps publishing at once never lose each other's
night). Each file is written whole: a temp file renamed over it locally, one PUT on S3. The trend
figure is named by a hash of the nights it shows, so two writers never overwrite each other's
figure under an index that names it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from layerprune.errors import LayerPruneError
from layerprune.store.remote import storage_options_from_env

KEEP, LOSS_RISE = 0.9, 0.1  # the bar: >= 90% of the base score, <= +10% loss
CHANCE_STDERRS = 2  # "near chance": the base within 2 standard errors of the chance score
LEADERBOARD_DIR, NIGHTS_DIR, NIGHT_FILE = "leaderboard", "nights", "leaderboard.json"
INDEX, FIGURES = "index.html", "figures"
LOSS_FIGURE, LOSE_FIGURE = "loss_vs_fraction.png", "layers_it_can_lose.png"
NIGHT_TIME = "%Y%m%dT%H%M%SZ"  # UTC, in night names: sorts as time does
_TOLERANCE = 1e-9  # scores are rounded to 4 decimals: 0.45 must pass a 0.9 x 0.5 bar
CAN_LOSE_COLUMNS = ["metric", "healed", "fraction", "n", "variant", "decode_speedup", "value",
                    "base", "threshold", "chance", "near_chance", "chance_passes", "candidates"]


def _number(value) -> float | None:
    """A float, or None for null/NaN (a column a variant does not have)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def benchmark_metrics(rows: pd.DataFrame, base: dict) -> list[str]:
    """The benchmarks measured on both the variants and the base model: each `<t>` with a
    `<t>_baseline` (its chance score), in the order of the columns."""
    scored = [c for c in rows.columns if f"{c}_baseline" in rows.columns or f"{c}_baseline" in base]
    return [c for c in scored if c in base]


def layers_it_can_lose(rows: pd.DataFrame, base: dict, keep: float = KEEP,
                       loss_rise: float = LOSS_RISE) -> pd.DataFrame:
    """One row per metric (loss, then each benchmark) and state (unhealed, then healed): the
    largest `fraction` of layers dropped that passes (module doc), its `variant`, `n`,
    `decode_speedup` (None when not measured) and `value`, the `base` value and the `threshold`
    it had to meet. `fraction` is 0 when no variant passes and None when no variant of that
    state measured the metric (`candidates` = how many did); benchmarks carry `chance`,
    `near_chance` (None without the base's stderr) and `chance_passes`.

    `rows`: one model's results (`fraction`, `n`, `variant`, optional `strategy`,
    `heal_method` (null = unhealed), `loss`, each benchmark `<t>` with `<t>_baseline`);
    `base`: the unpruned model's values ({"loss": .., "mmlu": .., "mmlu_baseline": .., ...}).
    Random-block rows are the baseline to beat, not a variant one would ship: left out."""
    if not 0 < keep <= 1:
        raise LayerPruneError(f"keep: {keep!r} must be in (0, 1] (the share of the base score "
                              "a variant must keep)")
    if not loss_rise >= 0:
        raise LayerPruneError(f"loss_rise: {loss_rise!r} must be >= 0 (the allowed relative "
                              "rise of the loss)")
    missing = [c for c in ("fraction", "n", "variant", "loss") if c not in rows.columns]
    if missing:
        raise LayerPruneError(f"rows: missing column(s) {missing}; results rows carry "
                              "fraction, n, variant, loss and each benchmark")
    if _number(base.get("loss")) is None:
        raise LayerPruneError(f"base: no 'loss' value (got keys {sorted(base)})")
    kind = rows["strategy"] if "strategy" in rows.columns else rows["variant"]
    shipped = rows[kind.astype(str) != "random"]
    healed = shipped["heal_method"].notna() if "heal_method" in shipped.columns \
        else pd.Series(False, index=shipped.index)
    out = []
    for metric in ["loss", *benchmark_metrics(rows, base)]:
        base_value = _number(base.get(metric))
        if base_value is None:
            continue
        is_loss = metric == "loss"
        threshold = (1 + loss_rise) * base_value if is_loss else keep * base_value
        chance = None if is_loss else _number(base.get(f"{metric}_baseline"))
        if chance is None and not is_loss and f"{metric}_baseline" in rows.columns:
            chance = _number(rows[f"{metric}_baseline"].dropna().iloc[0]) \
                if rows[f"{metric}_baseline"].notna().any() else None
        stderr = _number(base.get(f"{metric}_stderr"))
        near = None if is_loss or chance is None or stderr is None \
            else base_value - chance <= CHANCE_STDERRS * stderr
        passes_at_chance = None if is_loss or chance is None else threshold <= chance + _TOLERANCE
        for state in (False, True):
            measured = shipped[(healed == state) & shipped[metric].notna()] \
                if metric in shipped.columns else shipped.iloc[0:0]
            if is_loss:
                ok = measured[measured[metric] <= threshold + _TOLERANCE]
            else:
                ok = measured[measured[metric] >= threshold - _TOLERANCE]
            best = None
            if len(ok):  # largest fraction; among equals the better score, then the name
                order = ok.assign(_score=-ok[metric] if is_loss else ok[metric])
                best = order.sort_values(["fraction", "_score", "variant"],
                                         ascending=[False, False, True]).iloc[0]
            out.append({
                "metric": metric, "healed": state,
                "fraction": None if not len(measured) else
                (round(float(best["fraction"]), 4) if best is not None else 0.0),
                "n": int(best["n"]) if best is not None else (0 if len(measured) else None),
                "variant": None if best is None else str(best["variant"]),
                "decode_speedup": None if best is None else _number(best.get("decode_speedup")),
                "value": None if best is None else _number(best[metric]),
                "base": base_value, "threshold": round(threshold, 6), "chance": chance,
                "near_chance": near, "chance_passes": passes_at_chance,
                "candidates": int(len(measured))})
    return pd.DataFrame(out, columns=CAN_LOSE_COLUMNS)


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN as null, numpy scalars as Python ones."""
    return json.loads(frame.to_json(orient="records"))


def model_depth(rows: pd.DataFrame) -> int | None:
    """Decoder layers of the unpruned model, from its variants (n / fraction)."""
    dropped = rows[rows["fraction"] > 0] if "fraction" in rows else rows.iloc[0:0]
    if not len(dropped):
        return None
    return int(round(dropped["n"].iloc[0] / dropped["fraction"].iloc[0]))


def model_entry(model: str, rows: pd.DataFrame, base: dict, report_uri: str | None = None,
                keep: float = KEEP, loss_rise: float = LOSS_RISE) -> dict:
    """One model of a night: its depth, base values, every results row and its table."""
    return {"model": model, "depth": model_depth(rows), "report_uri": report_uri,
            "base": {k: _number(v) for k, v in base.items()},
            "rows": records(rows.drop(columns=["recipe"], errors="ignore")),
            "can_lose": records(layers_it_can_lose(rows, base, keep, loss_rise))}


def night_id(flow_run_id: str, when: datetime) -> str:
    """`<UTC time>-<flow run id[:8]>`: sorts by time, and names the sweep run."""
    stamp = when.astimezone(timezone.utc).strftime(NIGHT_TIME)
    return f"{stamp}-{str(flow_run_id).replace('-', '')[:8]}"


def night_record(flow_run_id: str, night: str, entries: list[dict],
                 sweep_report_uri: str | None = None, keep: float = KEEP,
                 loss_rise: float = LOSS_RISE) -> dict:
    """Every number of one night (`night` from `night_id`): the sweep run, its time, the rule's
    bar and each model's `model_entry`."""
    when = datetime.strptime(night.split("-", 1)[0], NIGHT_TIME).replace(tzinfo=timezone.utc)
    return {"night": night, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "flow_run_id": str(flow_run_id), "sweep_report_uri": sweep_report_uri,
            "keep": keep, "loss_rise": loss_rise, "models": entries}


# --- the store ---------------------------------------------------------------------------------
class Leaderboard:
    """The `leaderboard/` directory of an artifact store (local path or s3://)."""

    def __init__(self, store_root: str, storage_options: dict | None = None):
        url = f"{str(store_root).rstrip('/')}/{LEADERBOARD_DIR}"
        if storage_options is None:  # S3 endpoint and bounded retries from the environment
            storage_options = storage_options_from_env(url)
        self.fs, self.base = fsspec.core.url_to_fs(url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.url = url if not self.is_local else self.base

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def uri(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def put(self, rel: str, data: bytes) -> None:
        """Write one file whole: temp file + rename locally, one PUT on S3."""
        target = self.path(rel)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        folder = Path(target).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{Path(target).name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # a page to serve: readable by a web server, like any file
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def night_names(self) -> list[str]:
        """Nights whose JSON is complete, oldest first."""
        if not self.is_local:  # another process's writes: s3fs caches listings
            self.fs.invalidate_cache(self.path(NIGHTS_DIR))
        found = self.fs.glob(self.path(NIGHTS_DIR, "*", NIGHT_FILE))
        return sorted(p.rstrip("/").split("/")[-2] for p in found)

    def nights(self) -> list[dict]:
        """Every complete night's record, oldest first."""
        out = []
        for name in self.night_names():
            with self.fs.open(self.path(NIGHTS_DIR, name, NIGHT_FILE), "rb") as f:
                out.append(json.loads(f.read()))
        return out

    def night_for(self, flow_run_id: str, when: datetime) -> str:
        """The night of this sweep run: the one it already wrote (a retried run rewrites its
        night, not a second one), else a new one named by `when`."""
        short = night_id(flow_run_id, when).rsplit("-", 1)[1]
        mine = [n for n in self.night_names() if n.endswith(f"-{short}")]
        return mine[0] if mine else night_id(flow_run_id, when)

    def write_night(self, record: dict, figures: dict[str, bytes]) -> str:
        """Write one night: its figures (`figures/<name>`), then its JSON (the commit point).
        Returns the JSON's URI."""
        night = record["night"]
        for name, data in figures.items():
            self.put(f"{NIGHTS_DIR}/{night}/{FIGURES}/{name}", data)
        record = {**record, "figures": {name: f"{FIGURES}/{name}" for name in figures}}
        self.put(f"{NIGHTS_DIR}/{night}/{NIGHT_FILE}",
                 json.dumps(record, indent=2, allow_nan=False).encode())
        return self.uri(NIGHTS_DIR, night, NIGHT_FILE)

    def rebuild_index(self, render, attempts: int = 20) -> tuple[list[dict], str]:
        """Write `index.html` (and its trend figure) from every night, until the listing read
        after the write is the one it was built from (module doc). `render(nights)` returns
        (html text, trend PNG bytes, the figure's name under `figures/` that the html names).
        Returns (nights, the index's URI)."""
        for _ in range(attempts):
            nights = self.nights()
            html, trend_png, trend_name = render(nights)
            self.put(f"{FIGURES}/{trend_name}", trend_png)
            self.put(INDEX, html.encode())
            if self.night_names() == [n["night"] for n in nights]:
                return nights, self.uri(INDEX)
        raise RuntimeError(f"{self.uri(INDEX)}: nights kept appearing while it was rebuilt "
                           f"{attempts} times; rerun to rebuild it")


def nights_hash(nights: list[dict]) -> str:
    """Names the trend figure after the nights it shows (module doc)."""
    blob = json.dumps([[n["night"], n.get("time"), n.get("models")] for n in nights],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
