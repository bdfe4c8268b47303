"""Hidden-state capture: the right vectors (layer inputs, pre-norm last output), whatever the
batching and padding."""

from __future__ import annotations

import pytest
import torch

from layerprune.errors import LayerPruneError
from layerprune.method.batching import (
    MAX_PADDED_RATIO,
    length_buckets,
    pad_token_id,
    resolve_batch_size,
)
from layerprune.method.calibration import tokenize
from layerprune.method.hidden_states import last_token_states
from layerprune.models.loading import base_model, load_model
from tests.conftest import TEXTS


@pytest.fixture
def loaded(tiny_model):
    return load_model(tiny_model)


def _states(loaded, ids, batch_size, side):
    return last_token_states(loaded.model, ids, batch_size, side, pad_token_id(loaded.tokenizer),
                             show_bar=False)


def test_length_buckets_bound_batch_size_and_padding():
    ids = [[0] * n for n in (10, 3, 11, 4, 30, 12, 3)]
    buckets = length_buckets(ids, batch_size=2)
    assert buckets == [[1, 6], [3], [0, 2], [5], [4]]
    for bucket in buckets:
        lengths = [len(ids[i]) for i in bucket]
        assert len(bucket) <= 2 and max(lengths) <= MAX_PADDED_RATIO * min(lengths)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_and_padded_equals_one_at_a_time(loaded, side, batch_size):
    ids = tokenize(TEXTS, loaded.tokenizer, seq_len=16)
    assert len({len(r) for r in ids}) > 2, "texts must differ in length to exercise padding"
    single = _states(loaded, ids, 1, "right")
    batched = _states(loaded, ids, batch_size, side)
    assert batched.shape == (loaded.model.config.num_hidden_layers + 1, len(ids), 32)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_states_are_layer_inputs_and_prenorm_output(loaded):
    """Against direct computations, on every tiny family: x^(l) for l < L is the input of layer
    l (HF's hidden_states[l]); x^(L) is the decoder stack's output with the final norm skipped
    (the base model run again with its final norm replaced by the identity), and that norm
    applied to it gives HF's post-norm hidden_states[L]. An extractor returning zeros, the
    post-norm state, or the wrong layer's vector fails."""
    ids = tokenize(TEXTS[1:2], loaded.tokenizer, seq_len=16)
    ours = _states(loaded, ids, 1, "right")[:, 0]
    n_layers = ours.shape[0] - 1
    body = base_model(loaded.model)
    norm_name = "ln_f" if hasattr(body, "ln_f") else "norm"  # GPT-2; Llama, Qwen2, Gemma 3
    norm = getattr(body, norm_name)
    with torch.no_grad():
        hf = torch.stack([h[0, -1] for h in body(torch.tensor(ids),
                                                 output_hidden_states=True).hidden_states])
        setattr(body, norm_name, torch.nn.Identity())
        try:
            prenorm = body(torch.tensor(ids)).last_hidden_state[0, -1]
        finally:
            setattr(body, norm_name, norm)
        renormed = norm(ours[n_layers])
    assert hf.shape[0] == n_layers + 1 == loaded.model.config.num_hidden_layers + 1
    torch.testing.assert_close(ours[:n_layers], hf[:n_layers], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[n_layers], prenorm, atol=1e-5, rtol=0)
    torch.testing.assert_close(renormed, hf[n_layers], atol=1e-5, rtol=1e-5)
    # the comparisons discriminate: the pre-norm output is far from zero, from the post-norm
    # state and from the last layer's input
    for wrong in (torch.zeros_like(prenorm), hf[n_layers], hf[n_layers - 1]):
        assert (prenorm - wrong).norm() > 0.1 * prenorm.norm()


def test_auto_batch_size_is_the_fastest_for_the_device():
    """benchmarks/extract.py: on a CPU batch 1 beats bucketed batch 8 (0.67x vs 0.87x of a bare
    forward); a GPU wants batches. Explicit sizes are kept; "auto" is the distances default."""
    from layerprune.cli import build_parser

    assert resolve_batch_size("auto", "cpu") == resolve_batch_size(None, "cpu") == 1
    assert resolve_batch_size("auto", "cuda:1") == 16
    assert resolve_batch_size(8, "cpu") == resolve_batch_size("8", "cuda") == 8
    for bad in (0, -2, "many", 2.5, True):
        with pytest.raises(LayerPruneError, match="batch_size"):
            resolve_batch_size(bad, "cpu")
    args = build_parser().parse_args(["distances", "--model", "m", "--data", "d", "--samples",
                                      "1", "--seq-len", "8", "--out", "o"])
    assert args.batch_size == "auto"
