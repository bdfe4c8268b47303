"""Layer removal: block choice, config bookkeeping, checkpoints that reload and generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerPruneError
from layerprune.method import layer_config, prune
from layerprune.models.loading import decoder_layers, load_model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_similarity_picks_row_minimum_and_heuristic_keeps_last():
    # distance[n-1][l]; for n=2 the minimum is at l=1
    distance = [[0.5, 0.1, 0.2, 0.3], [0.4, 0.05, 0.6], [0.3, 0.2], [0.9]]
    assert prune.choose_layers("similarity", 2, 4, distance=distance) == [1, 2]
    assert prune.choose_layers("heuristic", 2, 4) == [1, 2]  # L-1-n .. L-2
    assert prune.choose_layers("heuristic", 1, 30) == [28]
    assert prune.choose_layers("heuristic", 6, 30) == [23, 24, 25, 26, 27, 28]
    with pytest.raises(LayerPruneError, match="strategy must be one of"):
        prune.choose_layers("shortest", 2, 4, distance=distance)


@pytest.mark.parametrize("n", [0, -1, 4, 5])
@pytest.mark.parametrize("strategy", ["heuristic", "random", "block-influence"])
def test_block_size_out_of_range(n, strategy):
    with pytest.raises(LayerPruneError, match=r"n must be in 1\.\.3"):
        prune.choose_layers(strategy, n, 4, influence=[0.1, 0.2, 0.3, 0.4])


def test_removed_layers_updates_config_and_restores(tiny_models):
    loaded = load_model(tiny_models["qwen2"])
    model, cfg = loaded.model, loaded.model.config
    before_types, ids = list(cfg.layer_types), [1, 2, 3, 4, 5, 6, 7, 8]
    original, layers = _logits(model, ids), list(decoder_layers(model))
    with prune.removed_layers(model, [1, 2]):
        assert cfg.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
        # the kept modules are old layers 0 and 3 (config bookkeeping alone could be right
        # while the wrong modules were deleted)
        assert list(decoder_layers(model)) == [layers[0], layers[3]]
        assert cfg.layer_types == [before_types[0], before_types[3]]
        assert cfg.max_window_layers == 1  # only old layer 0 was below the threshold of 2
        idx = [m.layer_idx for layer in decoder_layers(model) for m in layer.modules()
               if isinstance(getattr(m, "layer_idx", None), int)]
        assert set(idx) == {0, 1}
    assert cfg.num_hidden_layers == 4 and cfg.layer_types == before_types
    assert list(decoder_layers(model)) == layers
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
    # nothing else beside the output (a temporary directory of any name would show here)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_config_updates_remaps_every_kind_of_layer_field():
    # 5 layers, drop 1 and 2: kept old layers 0, 3, 4 become 0, 1, 2
    values = {"num_hidden_layers": 5, "layer_types": ["a", "b", "c", "d", "e"],
              "no_rope_layers": (1, 0, 1, 0, 1),  # a tuple stays a tuple
              "max_window_layers": 3, "first_k_dense_replace": 1,  # thresholds from the bottom
              "moe_layers": [1, 3, 4], "cross_attention_layers": [2],  # index lists
              "sliding_window_pattern": 2, "num_nextn_predict_layers": 1, "hidden_size": 32,
              "eos_token_id": [1, 2, 3, 4, 5]}  # as long as the stack, but no layer field
    assert layer_config.config_updates(values, [1, 2], 5) == {
        "layer_types": ["a", "d", "e"], "no_rope_layers": (1, 0, 1), "max_window_layers": 1,
        "first_k_dense_replace": 1, "moe_layers": [1, 2], "cross_attention_layers": [],
        "num_hidden_layers": 3}


def test_config_updates_makes_a_sparse_step_explicit():
    # step 3: layers 2 and 5 are MoE, but 5 is listed dense; drop 0 -> old 2 is the only MoE one
    values = {"num_hidden_layers": 6, "num_experts": 4, "decoder_sparse_step": 3,
              "mlp_only_layers": [5]}
    assert layer_config.config_updates(values, [0], 6) == {
        "decoder_sparse_step": 1, "mlp_only_layers": [0, 2, 3, 4], "num_hidden_layers": 5}
    values["num_experts"] = 0  # no experts: every layer is dense whatever the step says
    assert layer_config.config_updates(values, [0], 6) == {"mlp_only_layers": [4],
                                                    "num_hidden_layers": 5}


def test_config_updates_refuses_fields_it_cannot_remap():
    from transformers import Gemma3nTextConfig, JambaConfig

    with pytest.raises(LayerPruneError, match="hidden_size_per_layer_input"):
        layer_config.config_updates(layer_config.config_values(Gemma3nTextConfig()), [1], 35)
    with pytest.raises(LayerPruneError, match="expert_layer_period"):
        layer_config.config_updates(layer_config.config_values(JambaConfig()), [1], 32)
    with pytest.raises(LayerPruneError, match="num_kv_shared_layers"):
        layer_config.config_updates({"num_kv_shared_layers": 2, "num_hidden_layers": 4}, [1], 4)
    with pytest.raises(LayerPruneError, match="layer_types has 3 entries"):
        layer_config.config_updates({"layer_types": ["a", "b", "c"]}, [1], 4)
    with pytest.raises(LayerPruneError, match="distinct indices in 0..3"):
        layer_config.config_updates({}, [1, 1], 4)


def test_config_values_reads_standard_names_through_aliases(tiny_models):
    from transformers import AutoConfig

    values = layer_config.config_values(AutoConfig.from_pretrained(tiny_models["gpt2"]))
    assert values["num_hidden_layers"] == 4 and "n_layer" not in values


def test_removed_layers_on_a_multimodal_wrapper_updates_the_text_config(tokenizer):
    from transformers import Gemma3Config

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                     image_token_index=len(tokenizer) - 1)).eval()
    original = _logits(model, [1, 2, 3, 4, 5])
    with prune.removed_layers(model, [0, 1]):
        assert model.config.text_config.num_hidden_layers == 2
        assert model.config.text_config.layer_types == ["sliding_attention", "full_attention"]
        assert model.config.vision_config.num_hidden_layers == 4
        assert len(decoder_layers(model)) == 2
        pruned = _logits(model, [1, 2, 3, 4, 5])
    assert model.config.text_config.num_hidden_layers == 4 and len(decoder_layers(model)) == 4
    torch.testing.assert_close(_logits(model, [1, 2, 3, 4, 5]), original)
    assert not torch.allclose(pruned, original)
