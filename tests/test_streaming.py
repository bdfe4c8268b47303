"""Layer-streamed extraction: the same states as the in-memory pass, one layer held at a time,
chosen when the model does not fit the memory budget, refused early when even that cannot fit;
non-finite (float16-overflowed) states stop both paths with the layer's name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerprune import cli
from layerprune.errors import LayerPruneError
from layerprune.method.batching import pad_token_id
from layerprune.method.calibration import sample_texts, tokenize
from layerprune.method.hidden_states import last_token_states
from layerprune.method.streaming import last_token_states_streamed
from layerprune.models.loading import base_model, decoder_layers, load_model
from tests.conftest import REAL_MODEL, TEXTS


def _both(ref: str, ids, batch_size: int = 3, side: str = "right", dtype: str = "float32",
          **streamed):
    loaded = load_model(ref, dtype, "cpu")
    pad = pad_token_id(loaded.tokenizer)
    in_memory = last_token_states(loaded.model, ids, batch_size, side, pad, show_bar=False)
    return in_memory, last_token_states_streamed(ref, ids, batch_size, side, pad, dtype=dtype,
                                                 device="cpu", show_bar=False, **streamed)


@pytest.mark.parametrize("side", ["right", "left"])
def test_streamed_equals_in_memory(tiny_model, tokenizer, side):
    ids = tokenize(TEXTS, tokenizer, seq_len=16)
    in_memory, streamed = _both(tiny_model, ids, batch_size=3, side=side)
    assert streamed.shape == in_memory.shape == (5, len(ids), 32)
    torch.testing.assert_close(streamed, in_memory, atol=1e-5, rtol=0)


def test_sharded_checkpoint(tiny_models, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    model.config.pad_token_id = 49000  # an embedding padding_idx beyond the rows the texts use
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2  # layers spread over several shards
    ids = tokenize(TEXTS, tokenizer, seq_len=16)
    in_memory, streamed = _both(str(tmp_path), ids)
    torch.testing.assert_close(streamed, in_memory, atol=1e-5, rtol=0)


def test_one_layer_materialized_at_a_time(tiny_models, tokenizer):
    """The weights live at each layer step are that layer's plus the small non-layer ones (final
    norm, GPT-2's position table): never two layers, never the embedding table."""
    ref = tiny_models["gpt2"]
    model = load_model(ref).model
    body, layers = base_model(model), decoder_layers(model)

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    small = nbytes(body) - nbytes(layers) - nbytes(body.get_input_embeddings())
    assert small > 0  # ln_f and the position table
    steps = []
    ids = tokenize(TEXTS, tokenizer, seq_len=16)
    last_token_states_streamed(ref, ids, 3, on_layer=steps.append, show_bar=False)
    assert [s.layer for s in steps] == [0, 1, 2, 3]
    assert [s.weight_bytes for s in steps] == [nbytes(layer) + small for layer in layers]
    assert len({s.activation_bytes for s in steps}) == 1  # the running activations, reused


def _distances(model, data, out, *extra) -> tuple[int, dict]:
    code = cli.main(["distances", "--model", model, "--data", data, "--samples", "7",
                     "--seq-len", "16", "--device", "cpu", "--dtype", "float32",
                     "--out", str(out), *extra])
    return code, (json.loads((out / "distances.json").read_text()) if code == 0 else {})


def test_budget_below_the_model_streams_with_the_same_result(tiny_models, texts_jsonl,
                                                               tmp_path, capsys):
    # Tiny llama: 12.6 MB of weights (two 49152 x 32 fp32 tables: embedding and LM head),
    # under 1 MB to stream 7 samples of <= 16 tokens (layers of 37 KB + activations).
    ref = tiny_models["llama"]
    code, streamed = _distances(ref, texts_jsonl, tmp_path / "s", "--max-memory", "4MB")
    assert code == 0 and json.loads(capsys.readouterr().out)["extraction"] == "streamed"
    code, in_memory = _distances(ref, texts_jsonl, tmp_path / "m", "--max-memory", "100MB")
    assert code == 0 and json.loads(capsys.readouterr().out)["extraction"] == "in-memory"
    for a, b in zip(streamed["distance"], in_memory["distance"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_budget_too_small_for_one_layer_fails_before_reading_weights(tiny_models, texts_jsonl,
                                                                     tmp_path, capsys):
    # No weight files at all: an error about them would mean the weights were reached first.
    ref = tmp_path / "no-weights"
    shutil.copytree(tiny_models["llama"], ref, ignore=shutil.ignore_patterns("*.safetensors"))
    code, _ = _distances(str(ref), texts_jsonl, tmp_path / "d", "--max-memory", "20KB")
    err = capsys.readouterr().err
    assert code == 2 and "--max-memory" in err and "streamed extraction" in err, err
    assert not (tmp_path / "d").exists()
    with pytest.raises(LayerPruneError, match="largest layer"):
        last_token_states_streamed(str(ref), [[1, 2, 3]], max_memory="20KB", show_bar=False)


def test_float16_overflow_names_the_layer(tiny_models, tokenizer, tmp_path):
    """Layer 1's MLP input scaled by 6e4 (still a float16 number): its MLP output reaches ~1e7,
    finite in float32, inf in float16. Both paths stop and name layer 1."""
    shutil.copytree(tiny_models["llama"], tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"].fill_(6e4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = tokenize(TEXTS, tokenizer, seq_len=16)
    in_memory, streamed = _both(str(tmp_path), ids, dtype="float32")
    assert torch.isfinite(in_memory).all() and torch.isfinite(streamed).all()
    for run in (lambda: _both(str(tmp_path), ids, dtype="float16")[0],
                lambda: last_token_states_streamed(str(tmp_path), ids, 3, dtype="float16",
                                                   show_bar=False)):
        with pytest.raises(LayerPruneError, match=r"output of layer 1 \(input of layer 2\)"):
            run()


@pytest.mark.real
@pytest.mark.parametrize("ref", [REAL_MODEL, REAL_MODEL + "-gguf"])
def test_real_smollm2(real_assets, ref):
    """SmolLM2-135M from its safetensors conversion and from the GGUF file as shipped
    (dequantized tensor by tensor): the in-memory states to 1e-5."""
    loaded = load_model(REAL_MODEL)
    ids = tokenize(sample_texts("bundled:wiki-calibration", 8, None, "text"), loaded.tokenizer,
                   seq_len=32)
    del loaded
    in_memory, streamed = _both(ref, ids, batch_size=4)
    assert streamed.shape == (31, 8, 576)
    torch.testing.assert_close(streamed, in_memory, atol=1e-5, rtol=0)
