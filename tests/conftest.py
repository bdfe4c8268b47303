"""Shared fixtures: tiny random models of four families (hidden 32, 4 layers), real assets.

The tiny models use SmolLM2's real tokenizer so that text goes through the same path as for
the real model; their weights are random, which is all the equality tests need.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from layerprune.models import assets

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REAL_MODEL = "bundled:SmolLM2-135M-Instruct"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "A short one.",
    "Layer pruning removes whole blocks of a transformer, then heals the damage with QLoRA.",
    "Numbers: 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144.",
    "Hello",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
]


def _configs(vocab: int) -> dict:
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return {
        "llama": LlamaConfig(**common),
        # layers 2 and 3 (>= max_window_layers) use a 4-token sliding window, 0 and 1 full
        "qwen2": Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                             max_window_layers=2),
        "gemma3": Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention", "full_attention"]),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=512),
    }


@pytest.fixture(scope="session")
def tokenizer():
    from layerprune.models.loading import load_tokenizer

    return load_tokenizer(REAL_MODEL)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, str]:
    """{family: directory of a saved tiny random model with SmolLM2's tokenizer}."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, config in _configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(params=["llama", "qwen2", "gemma3", "gpt2"])
def tiny_model(request, tiny_models) -> str:
    return tiny_models[request.param]


@pytest.fixture
def texts_jsonl(tmp_path) -> str:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


@pytest.fixture
def weights_must_not_load(monkeypatch):
    """For bad-input tests: a tripwire, not a mock. Reaching from_pretrained fails the test,
    so a check that runs only after the weights started to load is caught."""
    from transformers import AutoModelForCausalLM

    def tripwire(*args, **kwargs):
        raise AssertionError("the weights started to load despite bad input")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", tripwire)


@pytest.fixture(scope="session")
def real_assets() -> None:
    assets.fetch(verbose=False)


@pytest.fixture(scope="session")
def pruned(tiny_models, tmp_path_factory):
    """The tiny Llama without layer 1, written by `layerprune prune` (prune.json names the
    source): a pruned checkpoint to heal. Read-only: copy it to change it."""
    from layerprune.cli import main

    out = tmp_path_factory.mktemp("pruned") / "ckpt"
    assert main(["prune", "--model", tiny_models["llama"], "--n", "1", "--start", "1",
                 "--out", str(out)]) == 0
    return out
