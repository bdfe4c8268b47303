"""Layer removal: block choice, config bookkeeping, checkpoints that reload and generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import prune
from layerprune.errors import LayerPruneError
from layerprune.models import decoder_layers, load_model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_similarity_picks_row_minimum_and_heuristic_keeps_last():
    # distance[n-1][l]; for n=2 the minimum is at l=1
    distance = [[0.5, 0.1, 0.2, 0.3], [0.4, 0.05, 0.6], [0.3, 0.2], [0.9]]
    assert prune.choose_block("similarity", 2, 4, distance) == [1, 2]
    assert prune.choose_block("heuristic", 2, 4) == [1, 2]  # L-1-n .. L-2
    assert prune.choose_block("heuristic", 1, 30) == [28]
    assert prune.choose_block("heuristic", 6, 30) == [23, 24, 25, 26, 27, 28]
    with pytest.raises(LayerPruneError, match="strategy must be one of"):
        prune.choose_block("random", 2, 4, distance)


@pytest.mark.parametrize("n", [0, -1, 4, 5])
def test_block_size_out_of_range(n):
    with pytest.raises(LayerPruneError, match=r"n must be in 1\.\.3"):
        prune.choose_block("heuristic", n, 4)


def test_removed_layers_updates_config_and_restores(tiny_models):
    loaded = load_model(tiny_models["qwen2"])
    model, cfg = loaded.model, loaded.model.config
    before_types, ids = list(cfg.layer_types), [1, 2, 3, 4, 5, 6, 7, 8]
    original = _logits(model, ids)
    with prune.removed_layers(model, [1, 2]):
        assert cfg.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
        assert cfg.layer_types == [before_types[0], before_types[3]]
        assert cfg.max_window_layers == 1  # only old layer 0 was below the threshold of 2
        idx = [m.layer_idx for layer in decoder_layers(model) for m in layer.modules()
               if isinstance(getattr(m, "layer_idx", None), int)]
        assert set(idx) == {0, 1}
    assert cfg.num_hidden_layers == 4 and cfg.layer_types == before_types
    torch.testing.assert_close(_logits(model, ids), original)


def test_checkpoint_reloads_with_equal_logits_and_generates(tiny_model, tmp_path):
    loaded = load_model(tiny_model)
    ids = loaded.tokenizer("The capital of France is")["input_ids"]
    record = prune.save_pruned(loaded, [1, 2], tmp_path / "pruned", {"strategy": "manual"})
    assert record["removed_layers"] == [1, 2] and record["num_layers_after"] == 2
    with prune.removed_layers(loaded.model, [1, 2]):
        expected = _logits(loaded.model, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    out = reloaded.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(ids) + 5
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "removed layers: [1, 2]" in card
    assert json.loads((tmp_path / "pruned" / "prune.json").read_text())["source"] == tiny_model
    assert (tmp_path / "pruned" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".pruned.*")), "temporary directory left behind"
