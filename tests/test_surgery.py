"""Checkpoint surgery (tensors on disk to tensors on disk) equals saving the in-memory pruned model:
same tensor names, dtypes and values, same config; sharded, bfloat16, multimodal and MoE sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerPruneError
from layerprune.method import prune, surgery
from layerprune.models import checkpoint_files
from layerprune.models.loading import load_model
from tests.conftest import REAL_MODEL

IDS = [[1, 2, 3, 4, 5, 6, 7, 8]]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in checkpoint_files.shard_files(directory):
        with safe_open(str(directory / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _assert_same_checkpoint(surgery_dir: Path, saved_dir: Path) -> None:
    """Tensor by tensor (names, dtypes, values), config and prune record."""
    ours, theirs = _tensors(surgery_dir), _tensors(saved_dir)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert json.loads((surgery_dir / "config.json").read_text()) == \
        json.loads((saved_dir / "config.json").read_text())
    for name in ("prune.json", "README.md"):
        assert (surgery_dir / name).read_text() == (saved_dir / name).read_text()


def _both_ways(src: str, drop: list[int], tmp_path: Path, dtype: str = "float32"):
    """(surgery output, save_pruned output, logits of the in-memory pruned model)."""
    cut = surgery.prune_checkpoint(src, drop, tmp_path / "surgery", {"strategy": "manual"})
    loaded = load_model(src, dtype)
    saved = prune.save_pruned(loaded, drop, tmp_path / "saved", {"strategy": "manual"})
    assert cut == saved
    with prune.removed_layers(loaded.model, drop):
        expected = _logits(loaded.model)
    return tmp_path / "surgery", tmp_path / "saved", expected


def _save(model, tokenizer, path: Path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("drop", [[1, 2], [0, 3]])
def test_surgery_equals_in_memory_save(tiny_model, drop, tmp_path):
    # [0, 3] also renumbers layers 1 and 2 down and drops the last layer
    ours, saved, expected = _both_ways(tiny_model, drop, tmp_path)
    _assert_same_checkpoint(ours, saved)
    reloaded = AutoModelForCausalLM.from_pretrained(ours).eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)
    source_tokenizer = (Path(tiny_model) / "tokenizer.json").read_bytes()
    assert (ours / "tokenizer.json").read_bytes() == source_tokenizer


def test_sharded_checkpoint_keeps_shards_and_a_correct_index(tiny_models, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    # A layer is about 37 kB of floats: 50 kB shards give each layer its own file.
    src = _save(model, tokenizer, tmp_path / "src", max_shard_size="50kB")
    assert len(checkpoint_files.shard_files(Path(src))) >= 6
    ours, saved, expected = _both_ways(src, [1, 2], tmp_path)
    _assert_same_checkpoint(ours, saved)
    index = json.loads((ours / checkpoint_files.INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert files == set(checkpoint_files.shard_files(ours)) and all((ours / f).is_file() for f in files)
    assert sorted(index["weight_map"]) == sorted(_tensors(ours))
    for name, file in index["weight_map"].items():
        with safe_open(str(ours / file), "pt") as f:
            assert name in f.keys()
    tensors = _tensors(ours)
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        "total_parameters": sum(t.numel() for t in tensors.values())}
    assert not list(ours.glob("model.safetensors"))
    # shards that held only removed layers are gone, the rest renumbered
    assert len(files) < len(checkpoint_files.shard_files(Path(src)))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(ours).eval()
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)


def test_bfloat16_stays_bfloat16_unless_another_dtype_is_asked(tiny_models, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.bfloat16)
    src = _save(model, tokenizer, tmp_path / "src")
    ours, saved, _ = _both_ways(src, [2], tmp_path, dtype="bfloat16")
    _assert_same_checkpoint(ours, saved)
    assert {t.dtype for t in _tensors(ours).values()} == {torch.bfloat16}
    assert json.loads((ours / "config.json").read_text())["dtype"] == "bfloat16"
    # write_pruned: surgery keeps the dtype on disk; asking for float32 loads and converts
    surgery.write_pruned(src, [2], tmp_path / "auto", dtype="auto")
    assert {t.dtype for t in _tensors(tmp_path / "auto").values()} == {torch.bfloat16}
    surgery.write_pruned(src, [2], tmp_path / "fp32", dtype="float32")
    assert {t.dtype for t in _tensors(tmp_path / "fp32").values()} == {torch.float32}
    assert surgery.applies(src, "bfloat16") and not surgery.applies(src, "float32")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert not surgery.applies(str(gguf)) and not surgery.applies("org/hub-model")


@pytest.fixture(scope="module")
def tiny_gemma3_with_vision(tmp_path_factory, tokenizer) -> str:
    """Gemma3ForConditionalGeneration: text stack in model.language_model, settings in
    config.text_config, a 4-layer vision tower whose layers must stay untouched."""
    from transformers import Gemma3Config

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=len(tokenizer) - 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    return _save(model, tokenizer, tmp_path_factory.mktemp("gemma3-vision"))


def test_multimodal_wrapper_prunes_saves_and_reloads(tiny_gemma3_with_vision, tmp_path):
    ours, saved, expected = _both_ways(tiny_gemma3_with_vision, [1, 2], tmp_path)
    _assert_same_checkpoint(ours, saved)
    config = json.loads((ours / "config.json").read_text())
    assert "num_hidden_layers" not in config  # the wrapper's settings stay where they were
    assert config["text_config"]["num_hidden_layers"] == 2
    assert config["text_config"]["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["vision_config"]["num_hidden_layers"] == 4
    source = _tensors(Path(tiny_gemma3_with_vision))
    vision = {k: v for k, v in source.items() if k.startswith("vision_tower")}
    assert len([k for k in vision if ".layers.3." in k]) > 0
    assert all(torch.equal(_tensors(ours)[k], v) for k, v in vision.items())
    for directory in (ours, saved):
        reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
        torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_sparse_step_becomes_an_explicit_dense_list(family, tokenizer, tmp_path):
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    cls = {"qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}[family]
    # step 2 makes layers 1 and 3 sparse; mlp_only_layers=[3] makes 3 dense again. Dropping
    # layer 0 shifts the period: a config left at step 2 would rebuild new layer 1 (old 2,
    # dense) as sparse and lose its weights.
    config = cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                 moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                 num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, decoder_sparse_step=2, mlp_only_layers=[3])
    torch.manual_seed(0)
    src = _save(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "src")
    ours, saved, expected = _both_ways(src, [0], tmp_path)
    _assert_same_checkpoint(ours, saved)
    pruned = json.loads((ours / "config.json").read_text())
    assert pruned["decoder_sparse_step"] == 1 and pruned["mlp_only_layers"] == [1, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(ours).eval()
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)


def test_unremappable_field_is_refused_before_anything_is_written(tiny_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in Path(tiny_models["llama"]).iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "adapter_layer_ids": [0, 3]}))
    with pytest.raises(LayerPruneError, match="adapter_layer_ids"):
        surgery.write_pruned(str(src), [1], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_error_while_copying_leaves_nothing_behind(tiny_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in Path(tiny_models["gpt2"]).iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    weights = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # header intact
    with pytest.raises(LayerPruneError, match="truncated"):
        surgery.prune_checkpoint(str(src), [1], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_layer_prefix_finds_the_decoder_stack_among_other_indexed_tensors():
    names = [f"vision_tower.vision_model.encoder.layers.{i}.fc.weight" for i in range(4)]
    names += [f"language_model.model.layers.{i}.mlp.weight" for i in range(4)]
    assert surgery.layer_prefix(names, 4) == "language_model.model.layers"
    assert surgery.layer_prefix([f"h.{i}.attn.weight" for i in range(3)], 3) == "h"  # GPT-2 hub
    with pytest.raises(LayerPruneError, match="config has 5 layers"):
        surgery.layer_prefix([f"model.layers.{i}.w" for i in range(4)], 5)
    with pytest.raises(LayerPruneError, match="decoder layers"):
        surgery.layer_prefix(["encoder.blocks.0.w"], 1)


@pytest.mark.real
def test_real_model_surgery_equals_in_memory_save(real_assets, tmp_path):
    ours, saved, expected = _both_ways(REAL_MODEL, list(range(20, 26)), tmp_path)
    _assert_same_checkpoint(ours, saved)
    reloaded = AutoModelForCausalLM.from_pretrained(ours).eval()
    torch.testing.assert_close(_logits(reloaded), expected, atol=0, rtol=0)


def _six_layer_model(family: str, tokenizer, path: Path) -> str:
    """Six layers, so that a non-contiguous drop leaves kept layers of every kind: qwen2 full
    below max_window_layers=3 and sliding above; gemma3 a sliding/sliding/full pattern."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                                           max_window_layers=3),
              "gemma3": lambda: Gemma3TextConfig(
                  **common, head_dim=8, sliding_window=4,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2),
              }[family]()
    torch.manual_seed(0)
    return _save(AutoModelForCausalLM.from_config(config), tokenizer, path)


@pytest.mark.parametrize("family, expected", [
    ("llama", {}),
    # kept old 0, 2, 5: full, full, sliding; two of them below the old threshold 3
    ("qwen2", {"layer_types": ["full_attention", "full_attention", "sliding_attention"],
               "max_window_layers": 2}),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]}),
])
def test_non_contiguous_surgery_equals_in_memory_save(family, expected, tokenizer, tmp_path):
    src = _six_layer_model(family, tokenizer, tmp_path / "src")
    drop, keep = [1, 3, 4], [0, 2, 5]
    ours, saved, expected_logits = _both_ways(src, drop, tmp_path)
    _assert_same_checkpoint(ours, saved)
    config = json.loads((ours / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert {k: config[k] for k in expected} == expected
    # each new layer j holds old layer keep[j]'s tensors, by name (independent of surgery's
    # renumbering), and nothing of the dropped ones
    source, pruned = _tensors(Path(src)), _tensors(ours)
    for name, tensor in source.items():
        if name.startswith("model.layers."):
            old, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(old) in keep:
                assert torch.equal(pruned[f"model.layers.{keep.index(int(old))}.{rest}"], tensor)
        else:
            assert torch.equal(pruned[name], tensor)
    dropped = [n for n in source if n.startswith(tuple(f"model.layers.{i}." for i in drop))]
    assert dropped and len(pruned) == len(source) - len(dropped)
    reloaded = AutoModelForCausalLM.from_pretrained(ours).eval()
    torch.testing.assert_close(_logits(reloaded), expected_logits, atol=0, rtol=0)
    assert "with layers 1,3-4 removed" in (ours / "README.md").read_text()
