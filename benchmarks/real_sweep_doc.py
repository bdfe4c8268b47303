"""Write docs/real-sweep.md from a finished `benchmarks/real_sweep.sh` run: the settings, each
model's run time, the leaderboard's "layers it can lose" table and every variant's numbers, as
stored by the sweep (the night's leaderboard.json), beside the page's screenshot.

    .venv/bin/python benchmarks/real_sweep_doc.py WORK/times.json WORK/params.json [--out FILE]

(real_sweep.sh runs it at its end.) Nothing here is typed by hand: every number is read from
the store.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import fsspec
import pandas as pd

from layerprune.store.remote import storage_options_from_env
from tasks.report import base_line, with_error_bars

VARIANT_COLUMNS = ["variant", "n", "fraction", "removed_layers", "loss", "boolq", "trivia_qa",
                   "nq_open", "mmlu", "decode_speedup", "prefill_speedup", "bytes_saved_pct"]


def _blank(value) -> str:
    """A cell: the value, or nothing where it does not apply."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else f"{value}"


def _read_json(uri: str) -> dict:
    with fsspec.open(uri, "r", **storage_options_from_env(uri)) as f:
        return json.load(f)


def can_lose_table(night: dict) -> str:
    rows = []
    for m in night["models"]:
        for r in m["can_lose"]:
            if r["healed"] and r["candidates"] == 0:
                continue  # healing was off: say nothing rather than "not measured" per row
            note = "near chance" if r.get("near_chance") or r.get("chance_passes") else ""
            rows.append({"model": m["model"], "depth": m["depth"], "metric": r["metric"],
                         "healed": "yes" if r["healed"] else "no",
                         "base": r["base"], "bar": round(r["threshold"], 4),
                         "largest fraction kept": r["fraction"], "n": r["n"],
                         "variant": r["variant"] or "", "value": _blank(r["value"]),
                         "decode speedup": _blank(r["decode_speedup"]), "note": note})
    return pd.DataFrame(rows).to_markdown(index=False)


def variants_table(model: dict) -> str:
    table = with_error_bars(pd.DataFrame(model["rows"]).sort_values(["n", "variant"]))
    speed = ", ".join(f"{k} {model['base'][k]}" for k in ("decode_tokens_per_s",
                                                          "prefill_tokens_per_s")
                      if k in model["base"])
    return (f"Base model: {base_line(model['base'], markdown=False)}; {speed}.\n\n"
            + table[[c for c in VARIANT_COLUMNS if c in table]].to_markdown(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("times", help="times.json written by real_sweep.sh")
    parser.add_argument("params", help="params.json written by real_sweep.sh")
    parser.add_argument("--out", default="docs/real-sweep.md")
    parser.add_argument("--screenshot", default="leaderboard.png",
                        help="the page's screenshot, relative to --out's folder")
    args = parser.parse_args(argv)
    times = json.loads(Path(args.times).read_text())
    params = json.loads(Path(args.params).read_text())["params"]
    summary = times["summary"]
    night = _read_json(summary["leaderboard_night_uri"])  # the night's leaderboard.json
    runs = "\n".join(f"| {c['model']} | {c['state']} | {c['seconds']:.0f} |"
                     for c in times["children"])
    settings = {k: params[k] for k in ("fractions", "strategies", "device", "dtype",
                                       "calibration", "loss", "benchmarks", "heal", "speed")
                if k in params}
    text = "\n\n".join([
        "# A real sweep: three models, three families",
        "Made by `make real-sweep` (`benchmarks/real_sweep.sh`: a Prefect server, workers and "
        "the `sweep/nightly` deployment on this 2-core CPU machine, small settings) and "
        "written from the store by `benchmarks/real_sweep_doc.py`; every number below is read "
        f"from the night's `leaderboard.json` ({night['night']}, sweep flow run "
        f"`{night['flow_run_id']}`).",
        "Settings: `" + json.dumps(settings) + "`",
        "| model | state | run seconds |\n| --- | --- | --- |\n" + runs,
        f"![The leaderboard page]({args.screenshot})",
        f"## Layers each model can lose (keeps ≥ {night['keep']:.0%} of the base score, or "
        f"loss ≤ +{night['loss_rise']:.0%})",
        can_lose_table(night),
        *[part for m in night["models"]
          for part in (f"## {m['model']} ({m['depth']} layers)", variants_table(m))],
    ]) + "\n"
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
