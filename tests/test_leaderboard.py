"""The nightly leaderboard: the "layers it can lose" rule on tables whose answer is known, two
nights written at once (local and S3 on a loopback moto server), and the page opened in a real
headless Chromium: what a person sees (the table, every figure, the trend over both nights).

Chromium is Debian's `chromium` (`make browser` installs it as root); without it these browser
tests skip, except under CI=true where they fail: a CI that silently skipped the only look at
the page would prove nothing.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from e2e_services import start_moto

from layerprune.errors import LayerPruneError
from layerprune.report.figures import metric_curves
from layerprune.report.leaderboard.figures import can_lose_figure
from layerprune.report.leaderboard.nights import (
    INDEX,
    LOSE_FIGURE,
    LOSS_FIGURE,
    Leaderboard,
    layers_it_can_lose,
    model_entry,
    night_id,
    night_record,
    nights_hash,
    records,
)
from layerprune.report.leaderboard.page import latest_table, publish_night
from layerprune.store.remote import storage_options_from_env

BASE = {"loss": 3.0, "bits_per_byte": 1.1, "mmlu": 0.4, "mmlu_stderr": 0.02,
        "mmlu_baseline": 0.25, "boolq": 0.6, "boolq_stderr": 0.06, "boolq_baseline": 0.5}


def _row(variant, fraction, loss, mmlu=None, boolq=None, heal=None, speedup=None, depth=10):
    strategy = variant.split(",")[0]
    return {"variant": variant, "strategy": strategy, "n": round(fraction * depth),
            "fraction": fraction, "heal_method": heal, "loss": loss, "mmlu": mmlu,
            "mmlu_baseline": 0.25, "boolq": boolq, "boolq_baseline": 0.5,
            "decode_speedup": speedup}


def _known_table() -> pd.DataFrame:
    """Bars, with the base above: loss <= 3.3, mmlu >= 0.36, boolq >= 0.54. In floating point
    1.1 x 3.0 and 0.9 x 0.4 land just above 3.3 and 0.36: a score exactly at the bar passes."""
    return pd.DataFrame([
        _row("heuristic", 0.2, 2.9, 0.37, None, speedup=1.25),   # lower loss passes
        _row("heuristic", 0.3, 3.4, 0.36, 0.545, speedup=1.35),  # mmlu exactly at the bar
        _row("similarity", 0.1, 3.2, 0.37, 0.58, speedup=1.1),
        _row("similarity", 0.2, 3.5, 0.39, 0.50, speedup=1.2),   # loss fails, ...
        _row("similarity", 0.3, 3.25, 0.35, 0.55, speedup=1.3),  # ... passes again: not monotone
        _row("similarity", 0.4, 5.0, 0.30, 0.40, speedup=1.5),
        _row("random", 0.4, 3.1, 0.39, 0.59),                     # would pass: not a variant
        _row("similarity, lora", 0.3, 3.1, 0.33, 0.56, heal="lora", speedup=1.3),
        _row("similarity, lora", 0.4, 3.3, 0.34, 0.53, heal="lora", speedup=1.5),  # loss = bar
    ])


def _answer(table: pd.DataFrame, metric: str, healed: bool) -> dict:
    """The row for (metric, state), as the night's JSON holds it (missing values as None)."""
    return next(r for r in records(table) if r["metric"] == metric and r["healed"] == healed)


def test_layers_it_can_lose_is_the_largest_fraction_that_passes():
    table = layers_it_can_lose(_known_table(), BASE)
    assert list(zip(table["metric"], table["healed"])) == [
        ("loss", False), ("loss", True), ("mmlu", False), ("mmlu", True), ("boolq", False),
        ("boolq", True)]  # bits_per_byte has no chance score: not a benchmark
    loss = _answer(table, "loss", False)  # 0.2 fails, 0.3 passes: the answer is 0.3
    assert (loss["fraction"], loss["n"], loss["variant"], loss["decode_speedup"]) == \
        (0.3, 3, "similarity", 1.3)
    assert loss["threshold"] == pytest.approx(3.3) and loss["candidates"] == 6  # random left out
    healed = _answer(table, "loss", True)  # exactly at the bar passes
    assert (healed["fraction"], healed["variant"], healed["decode_speedup"]) == \
        (0.4, "similarity, lora", 1.5)
    mmlu = _answer(table, "mmlu", False)  # exactly at the bar passes
    assert (mmlu["fraction"], mmlu["variant"], mmlu["value"]) == (0.3, "heuristic", 0.36)
    assert mmlu["near_chance"] is False and mmlu["chance_passes"] is False
    assert _answer(table, "mmlu", True)["fraction"] == 0.0  # measured, none passes
    assert _answer(table, "mmlu", True)["variant"] is None
    boolq = _answer(table, "boolq", False)  # two pass at 0.3: the better score wins
    assert (boolq["fraction"], boolq["variant"], boolq["value"]) == (0.3, "similarity", 0.55)
    assert boolq["near_chance"] is True  # 0.6 - 0.5 <= 2 x 0.06: the base is near chance
    assert boolq["chance_passes"] is False  # 0.9 x 0.6 = 0.54 is still above chance (0.5)
    assert _answer(table, "boolq", True)["fraction"] == 0.3


def test_near_chance_is_flagged_and_missing_speed_or_stderr_is_none():
    rows = _known_table().drop(columns=["decode_speedup"])  # speed not measured this night
    base = {**BASE, "mmlu": 0.27}  # 90% of it (0.243) is below chance: a guess passes
    del base["boolq_stderr"]
    table = layers_it_can_lose(rows, base)
    mmlu = _answer(table, "mmlu", False)
    assert mmlu["chance_passes"] is True and mmlu["near_chance"] is True  # 0.02 <= 2 x 0.02
    assert mmlu["fraction"] == 0.4  # ... so the 0.30 of the 40% variant "keeps 90%"
    assert _answer(table, "boolq", False)["near_chance"] is None  # unknown, not False
    assert table["decode_speedup"].isna().all()
    assert _answer(table, "loss", False)["decode_speedup"] is None


def test_healed_only_and_unmeasured_states_say_not_measured():
    rows = _known_table()
    table = layers_it_can_lose(rows[rows["heal_method"].notna()], BASE)
    unhealed = _answer(table, "loss", False)
    assert unhealed["fraction"] is None and unhealed["candidates"] == 0  # not "0 layers"
    assert _answer(table, "loss", True)["fraction"] == 0.4
    no_heal = layers_it_can_lose(rows[rows["heal_method"].isna()].drop(columns="heal_method"),
                                 BASE)
    assert _answer(no_heal, "loss", True)["fraction"] is None
    assert _answer(no_heal, "loss", False)["fraction"] == 0.3


@pytest.mark.parametrize("kwargs, names", [
    ({"keep": 1.5}, "keep"), ({"keep": 0}, "keep"), ({"loss_rise": -0.1}, "loss_rise")])
def test_bad_bars_name_the_parameter(kwargs, names):
    with pytest.raises(LayerPruneError, match=names):
        layers_it_can_lose(_known_table(), BASE, **kwargs)


def test_rows_without_the_needed_columns_are_refused():
    with pytest.raises(LayerPruneError, match=r"rows: missing column\(s\) \['fraction'\]"):
        layers_it_can_lose(_known_table().drop(columns="fraction"), BASE)
    with pytest.raises(LayerPruneError, match="base: no 'loss'"):
        layers_it_can_lose(_known_table(), {"mmlu": 0.5})


# --- synthetic nights, written by the real writers ---------------------------------------------
MODELS = {  # name: (depth, base loss, base mmlu, its stderr, base boolq, its stderr, speed?)
    "SmolLM2-135M-Instruct": (30, 3.1, 0.27, 0.02, 0.58, 0.03, True),
    "Qwen2.5-Coder-1.5B-Instruct": (28, 2.4, 0.55, 0.02, 0.72, 0.02, True),
    'gemma-3-1b <script>alert("x")</script> & co': (26, 2.8, 0.40, 0.02, 0.66, 0.03, False),
}


def _model_results(depth, loss0, mmlu0, mmlu_se, boolq0, boolq_se, speed,
                   improve) -> tuple[pd.DataFrame, dict]:
    """A results.parquet-like table: similarity and heuristic variants at 10-40%, the random
    baseline, LoRA-healed similarity variants; quality falls with the fraction, not smoothly.
    `improve` (0..1) makes every variant that much less hurt (a later, better night)."""
    rows = []
    for fraction, bump in ((0.1, 0.0), (0.2, 0.08), (0.3, 0.02), (0.4, 0.3)):
        n = round(fraction * depth)
        for variant, worse in (("similarity", 1.0), ("heuristic", 1.6), ("random", 2.5)):
            hurt = worse * (fraction * 0.45 + bump) * (1 - improve)
            row = {"variant": variant, "strategy": variant, "n": n,
                   "fraction": round(n / depth, 4), "heal_method": None,
                   "loss": round(loss0 * (1 + hurt), 4),
                   "mmlu": round(mmlu0 - (mmlu0 - 0.25) * hurt, 4), "mmlu_baseline": 0.25,
                   "boolq": round(boolq0 - (boolq0 - 0.5) * hurt, 4), "boolq_baseline": 0.5}
            if speed:
                row["decode_speedup"] = round(1 / (1 - 0.85 * n / depth), 3)
            rows.append(row)
            if variant == "similarity" and fraction >= 0.2:
                rows.append({**row, "variant": "similarity, lora", "heal_method": "lora",
                             "loss": round(loss0 * (1 + hurt * 0.4), 4),
                             "mmlu": round(mmlu0 - (mmlu0 - 0.25) * hurt * 0.7, 4)})
    base = {"loss": loss0, "mmlu": mmlu0, "mmlu_stderr": mmlu_se, "mmlu_baseline": 0.25,
            "boolq": boolq0, "boolq_stderr": boolq_se, "boolq_baseline": 0.5}
    return pd.DataFrame(rows), base


def _publish_night(root, flow_run_id: str, when: str, tmp: Path, improve: float = 0.0,
                   storage_options=None) -> dict:
    """One night as the sweep's task writes it: entries, record, figures, publish_night."""
    entries, curve = [], []
    for name, spec in MODELS.items():
        rows, base = _model_results(*spec, improve)
        entries.append(model_entry(name, rows, base, f"{root}/report/{spec[0]}"))
        curve += [{"fraction": 0.0, "variant": name, "loss": spec[1]}] + [
            {"fraction": r.fraction, "variant": name, "loss": r.loss}
            for r in rows[rows["variant"] == "similarity"].itertuples()]
    night = night_id(flow_run_id, datetime.fromisoformat(when))
    record = night_record(flow_run_id, night, entries, f"{root}/sweep/abc")
    loss_png = tmp / f"{night}-loss.png"  # drawn as the sweep report draws it
    metric_curves(curve, loss_png, ["loss"], title="next-token loss against fraction dropped")
    figures = {LOSS_FIGURE: loss_png.read_bytes(), LOSE_FIGURE: can_lose_figure(record)}
    return {"record": record, **publish_night(str(root), record, figures, storage_options)}


# --- two nights at once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    svc, endpoint = start_moto(env, tmp_path_factory.mktemp("moto"))
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
        Bucket="board")
    yield endpoint
    svc.stop()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_nights_written_at_once_both_reach_the_index(where, tmp_path, monkeypatch,
                                                         request):
    """The worst interleaving, forced: the first writer lists the nights (only its own), then
    the second writes its night and the whole index; the first then writes its stale index.
    Only listing again after writing (and rebuilding) keeps the second night on the page."""
    if where == "s3":
        endpoint = request.getfixturevalue("s3")
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}.items():
            monkeypatch.setenv(k, v)
        root = f"s3://board/{tmp_path.name}"
    else:
        root = str(tmp_path / "store")
    first_listed, second_done = threading.Event(), threading.Event()
    real_nights = Leaderboard.nights

    def nights(self):
        found = real_nights(self)
        if threading.current_thread().name == "first" and not first_listed.is_set():
            first_listed.set()
            assert second_done.wait(60)  # the second writer publishes meanwhile
        return found

    monkeypatch.setattr(Leaderboard, "nights", nights)
    results = {}

    def write(name, run_id, when):
        # The second writer has an S3 client of its own, as another process would: the
        # first one's cached listings must not hide the second's night.
        options = None if name == "first" or where == "local" else \
            {**storage_options_from_env(root), "skip_instance_cache": True}
        results[name] = _publish_night(root, run_id, when, tmp_path, storage_options=options)

    first = threading.Thread(target=write, name="first",
                             args=("first", "aaaaaaaa-1111", "2025-06-01T02:00:00+00:00"))
    first.start()
    assert first_listed.wait(60)
    second = threading.Thread(target=write, name="second",
                              args=("second", "bbbbbbbb-2222", "2025-06-01T02:00:05+00:00"))
    second.start()
    second.join(60)
    second_done.set()
    first.join(60)
    assert set(results) == {"first", "second"}
    board = Leaderboard(root)
    names = [n["night"] for n in board.nights()]
    assert names == ["20250601T020000Z-aaaaaaaa", "20250601T020005Z-bbbbbbbb"]
    with board.fs.open(board.path(INDEX), "r") as f:
        page = f.read()
    assert all(f"nights/{n}/leaderboard.json" in page for n in names)
    assert f"figures/trend-{nights_hash(board.nights())}.png" in page
    assert results["first"]["leaderboard_uri"] == results["second"]["leaderboard_uri"]


def test_a_retried_sweep_rewrites_its_own_night(tmp_path):
    root = str(tmp_path / "store")
    _publish_night(root, "cccccccc-3333", "2025-06-02T02:00:00+00:00", tmp_path)
    board = Leaderboard(root)
    again = board.night_for("cccccccc-3333", datetime.fromisoformat("2025-06-02T05:00:00+00:00"))
    assert again == "20250602T020000Z-cccccccc"  # the first attempt's night, not a new one


# --- the page in a real browser ----------------------------------------------------------------
def _chromium() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, so the leaderboard page cannot be looked at: "
                    "`make browser` installs Debian's chromium (as root, with apt-get)")
    pytest.skip("chromium is not installed (`make browser` installs it as root)")


def _browse(tmp: Path, url: str, *args: str) -> str:
    """Headless Chromium on `url`, offline flags, a fresh profile; its stdout."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", f"--user-data-dir={tmp / 'chromium-profile'}",
           *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


class _Dom(html.parser.HTMLParser):
    """What a person reads in a dumped DOM: each table's cell texts, every image, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _missing_images(index: Path, sources: list[str]) -> list[str]:
    """Each img src that does not resolve, relative to the page, to a PNG file."""
    bad = []
    for src in sources:
        target = (index.parent / src).resolve()
        if not (target.is_file() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"):
            bad.append(src)
    return bad


# The page has no JavaScript; this harness page of the test's own does: it opens the page in
# an iframe and, once everything loaded, writes each image's state into its own DOM, which
# --dump-dom prints. An image the browser could not fetch or decode has naturalWidth 0.
HARNESS = """<!doctype html><html><body><iframe id="page" src="{url}" width="1300"
height="900"></iframe><script>
document.getElementById('page').addEventListener('load', function () {{
  var doc = this.contentDocument, out = [];
  if (!doc) out.push('no access to the page');
  else for (var img of doc.images)
    out.push(img.getAttribute('src') + '\\t' + (img.complete && img.naturalWidth > 0 ?
                                               'shown' : 'broken'));
  var pre = document.createElement('pre'); pre.id = 'images';
  pre.textContent = out.join('\\n'); document.body.appendChild(pre);
}});
</script></body></html>"""


def _images_as_shown(tmp: Path, index: Path) -> dict[str, str]:
    harness = tmp / f"harness-{index.parent.name}.html"
    harness.write_text(HARNESS.format(url=index.resolve().as_uri()))
    dom = _browse(tmp, harness.as_uri(), "--allow-file-access-from-files",
                  "--virtual-time-budget=10000", "--dump-dom")
    found = dom.split('<pre id="images">', 1)
    assert len(found) == 2, dom[-2000:]
    lines = found[1].split("</pre>", 1)[0].strip().splitlines()
    return dict(line.split("\t") for line in lines)


def _screenshot_problem(shot: Path) -> str | None:
    """Why a screenshot is not a page with figures on it: None when it looks like one."""
    import numpy as np
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image.resize((image.width // 4, image.height // 4))).reshape(-1, 3)
    inked = float((pixels.astype(int).sum(axis=1) < 720).mean())  # not (near) white
    colours = len(np.unique(pixels, axis=0))
    if inked < 0.03 or colours < 50:  # text alone is black and white; figures add colour
        return f"{inked:.1%} of the screenshot is not white, {colours} colours"
    return None


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """A store with two nights of three models; the second night's variants are less hurt."""
    tmp = tmp_path_factory.mktemp("board")
    root = tmp / "store"
    first = _publish_night(str(root), "1111aaaa-0000", "2025-06-01T02:00:00+00:00", tmp)
    second = _publish_night(str(root), "2222bbbb-0000", "2025-06-02T02:00:00+00:00", tmp,
                            improve=0.5)
    return {"tmp": tmp, "index": root / "leaderboard" / INDEX, "nights": [first, second]}


def test_the_page_shows_the_table_figures_and_trend_in_chromium(two_nights):
    tmp, index = two_nights["tmp"], two_nights["index"]
    latest = two_nights["nights"][-1]["record"]
    assert two_nights["nights"][-1]["leaderboard_uri"] == str(index)
    dom = _Dom(_browse(tmp, index.as_uri(), "--dump-dom"))

    # The table: a row per model and metric, with the latest night's numbers.
    header, *rows = dom.tables["can-lose"]
    assert header[:3] == ["model", "depth", "metric"]
    assert len(rows) == len(MODELS) * 3  # loss, mmlu, boolq
    expected = latest_table(latest)
    shown = {(r[0], r[2]): dict(zip(header, r)) for r in rows}
    for want in expected.to_dict(orient="records"):
        assert shown[(want["model"], want["metric"])] == {k: str(v) for k, v in want.items()}
    smol = {r["metric"]: r for r in latest["models"][0]["can_lose"] if not r["healed"]}
    cell = shown[("SmolLM2-135M-Instruct", "loss")]
    assert cell["depth"] == "30"
    assert cell["unhealed: largest fraction"] == \
        f"{smol['loss']['fraction']:.2f} (n={smol['loss']['n']})"
    assert cell["unhealed: decode speedup"] == f"{smol['loss']['decode_speedup']:.2f}×"
    assert shown[("SmolLM2-135M-Instruct", "mmlu")]["note"] == "near chance"  # 0.27 vs 0.25
    gemma = next(m for m in MODELS if m.startswith("gemma"))
    assert shown[(gemma, "loss")]["unhealed: decode speedup"] == "not measured"
    assert dom.scripts == 0  # the model name's <script> is text, not a script

    # Every figure: a PNG file where the page says, and shown by the browser.
    assert len(dom.images) == 3
    assert _missing_images(index, dom.images) == []
    assert _images_as_shown(tmp, index) == {src: "shown" for src in dom.images}

    # The trend: both nights, in the figure's name (a hash of the nights it shows) and its
    # numbers; the second night is better, so some largest fraction grew.
    board = Leaderboard(str(index.parent.parent))
    assert f"figures/trend-{nights_hash(board.nights())}.png" in dom.images
    trend_header, *trend = dom.tables["trend"]
    assert trend_header == ["model", "metric", "state", "2025-06-01 02:00 UTC",
                            "2025-06-02 02:00 UTC"]
    assert {r[0] for r in trend} == set(MODELS)
    assert any(float(r[4]) > float(r[3]) for r in trend if r[3] and r[4])

    text = index.read_text()
    assert "http://" not in text and "https://" not in text  # offline: nothing external

    shot = tmp / "leaderboard.png"
    _browse(tmp, index.as_uri(), "--hide-scrollbars", "--window-size=1300,3400",
            f"--screenshot={shot}")
    assert _screenshot_problem(shot) is None
    print(f"screenshot: {shot}")


def test_the_checks_catch_a_broken_image(two_nights):
    """The same page with one figure path wrong and one figure not a PNG: both checks see it."""
    tmp = two_nights["tmp"]
    broken = tmp / "broken"
    shutil.copytree(two_nights["index"].parent, broken)
    index = broken / INDEX
    dom = _Dom(index.read_text())
    wrong_path, not_png = dom.images[0], dom.images[1]
    index.write_text(index.read_text().replace(wrong_path, "figures/no-such-figure.png"))
    (broken / not_png).write_bytes(b"<html>an error page saved as a figure</html>")
    sources = _Dom(index.read_text()).images
    assert _missing_images(index, sources) == ["figures/no-such-figure.png", not_png]
    shown = _images_as_shown(tmp, index)
    assert shown["figures/no-such-figure.png"] == "broken" and shown[not_png] == "broken"
    assert shown[dom.images[2]] == "shown"


def test_blank_screenshots_are_caught(tmp_path):
    from PIL import Image

    Image.new("RGB", (400, 800), "white").save(tmp_path / "blank.png")
    assert _screenshot_problem(tmp_path / "blank.png") is not None
