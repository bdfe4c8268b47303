"""Block criteria (layerprune.method.criteria, prune.choose_layers): each choice against a brute-force
computation on a tiny model that shares none of the library's code path (no hooks, no
removed_layers, no batching), the random baseline's guarantees, and `layerprune prune` with the
new strategies and --layers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerprune.cli import main
from layerprune.errors import LayerPruneError
from layerprune.method import calibration, criteria, hidden_states, prune
from layerprune.method import distances as dist
from layerprune.method.batching import batches, pad_token_id
from layerprune.models.loading import base_model, decoder_layers, layer_list_owner, load_model
from tests.conftest import TEXTS


@pytest.fixture(scope="module")
def calibration_ids(tokenizer) -> list[list[int]]:
    return calibration.tokenize(TEXTS, tokenizer, seq_len=16)


def _direct_states(model, row: list[int]) -> list[torch.Tensor]:
    """x^(0..L) of one unpadded sample, every position, from transformers' own
    output_hidden_states (inputs of layers 0..L-1) and, for the last layer's output, the base
    model run again with its final norm replaced by the identity (HF's last hidden state is
    after the norm)."""
    body = base_model(model)
    norm_name = "ln_f" if hasattr(body, "ln_f") else "norm"  # GPT-2; Llama, Qwen2, Gemma 3
    with torch.no_grad():
        inputs = body(torch.tensor([row]), output_hidden_states=True).hidden_states
        n_layers = len(decoder_layers(model))
        unnormed = copy.deepcopy(body)
        setattr(unnormed, norm_name, nn.Identity())
        last = unnormed(torch.tensor([row])).last_hidden_state
    return [h[0] for h in inputs[:n_layers]] + [last[0]]


def _direct_influence(model, ids) -> tuple[list[float], list[float]]:
    """(BI per layer averaged over every token, the same averaged per sample first)."""
    n_layers = len(decoder_layers(model))
    total, count, per_sample = torch.zeros(n_layers, dtype=torch.float64), 0, []
    for row in ids:
        x = [h.double() for h in _direct_states(model, row)]
        cos = torch.stack([F.cosine_similarity(x[i], x[i + 1], dim=-1) for i in range(n_layers)])
        total += cos.sum(1)
        count += len(row)
        per_sample.append(1 - cos.mean(1))
    return (1 - total / count).tolist(), torch.stack(per_sample).mean(0).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_block_influence_equals_direct_cosines_over_real_tokens(family, tiny_models,
                                                                calibration_ids):
    loaded = load_model(tiny_models[family])
    pad = pad_token_id(loaded.tokenizer)
    # The batches really pad: rows of different lengths share a batch.
    assert any(not bool(b.attention_mask.all()) for b in batches(calibration_ids, 4, pad))
    ours = criteria.block_influence(loaded.model, calibration_ids, batch_size=4, pad_id=pad)
    one_at_a_time = criteria.block_influence(loaded.model, calibration_ids, 1, pad)
    direct, sample_weighted = _direct_influence(loaded.model, calibration_ids)
    assert len(ours) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(direct), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(one_at_a_time), torch.tensor(direct), atol=1e-6,
                               rtol=0)
    # the check discriminates: weighting samples instead of tokens gives other numbers
    assert max(abs(a - b) for a, b in zip(direct, sample_weighted)) > 1e-4


def _without(model, drop: list[int]):
    """An independent pruned copy: deep-copied, its layer list rebuilt, the layer count set
    (Llama's forward runs layers[:num_hidden_layers])."""
    pruned = copy.deepcopy(model)
    owner, attr = layer_list_owner(pruned)
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList([m for i, m in enumerate(layers) if i not in drop]))
    pruned.config.num_hidden_layers = len(layers) - len(drop)
    return pruned


def _direct_loss(model, ids) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(torch.tensor([row]), use_cache=False).logits[0]
            total += F.cross_entropy(logits[:-1], torch.tensor(row[1:], dtype=torch.long),
                                     reduction="sum").item()
            count += len(row) - 1
    return total / count


@pytest.fixture(scope="module")
def interacting_llama(tokenizer):
    """A tiny Llama whose layers matter more (weights of std 0.3, not 0.02) and interact: its
    greedy order (3, 2, 1) is not the ranking of layers removed one at a time (3, 1, 2)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(2)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)).eval()


@pytest.mark.parametrize("family", ["interacting-llama", "gpt2"])
def test_greedy_loss_order_equals_brute_force_search(family, interacting_llama, tiny_models,
                                                     tokenizer, calibration_ids):
    model = (interacting_llama if family == "interacting-llama"
             else load_model(tiny_models[family]).model)
    found = criteria.greedy_loss_order(model, tokenizer, calibration_ids, 3, batch_size=4)
    order, losses = [], []
    for _ in range(3):
        scored = sorted((_direct_loss(_without(model, order + [layer]), calibration_ids),
                         layer) for layer in range(4) if layer not in order)
        # the search is well posed: the best candidate wins by more than float32 rounding of
        # a loss near 10.8 (1e-6)
        assert scored[1][0] - scored[0][0] > 1e-5, scored
        order.append(scored[0][1])
        losses.append(scored[0][0])
    assert found["order"] == order
    assert found["losses"] == pytest.approx(losses, abs=1e-5)
    assert found["base_loss"] == pytest.approx(_direct_loss(model, calibration_ids), abs=1e-5)
    assert found["forward_passes"] == 1 + 4 + 3 + 2
    # the model is whole again afterwards
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == 4
    for n in (1, 2, 3):
        assert prune.choose_layers("greedy-loss", n, 4, greedy_order=found["order"]) == \
            sorted(order[:n])
    if family == "interacting-llama":  # a one-shot ranking would not pass this test
        alone = sorted(range(4), key=lambda layer: _direct_loss(_without(model, [layer]),
                                                                calibration_ids))
        assert alone[:3] != order


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_similarity_choice_equals_argmin_of_direct_arccos_distances(family, tiny_models,
                                                                    calibration_ids):
    loaded = load_model(tiny_models[family])
    states = hidden_states.last_token_states(loaded.model, calibration_ids, 4, "right",
                                             pad_token_id(loaded.tokenizer), show_bar=False)
    distance = dist.triangle(dist.pairwise_mean_distance(states))
    last = torch.stack([torch.stack([h[-1].double() for h in _direct_states(loaded.model, row)])
                        for row in calibration_ids])  # (samples, L+1, d) at the last token
    for n in (1, 2, 3):
        direct = [sum(math.acos(max(-1.0, min(1.0, F.cosine_similarity(s[l], s[l + n],
                                                                       dim=0).item()))) / math.pi
                      for s in last) / len(last) for l in range(4 - n + 1)]
        assert distance[n - 1] == pytest.approx(direct, abs=1e-5)
        start = min(range(len(direct)), key=direct.__getitem__)
        assert sorted(direct)[1] - direct[start] > 1e-4  # a clear minimum
        assert prune.choose_layers("similarity", n, 4, distance=distance) == \
            list(range(start, start + n))


def test_block_influence_choice_is_the_n_smallest_scores_sorted():
    influence = [0.5, 0.1, 0.3, 0.1, 0.9]
    assert prune.choose_layers("block-influence", 1, 5, influence=influence) == [1]
    assert prune.choose_layers("block-influence", 2, 5, influence=influence) == [1, 3]
    assert prune.choose_layers("block-influence", 3, 5, influence=influence) == [1, 2, 3]
    assert prune.choose_layers("block-influence", 4, 5, influence=influence) == [0, 1, 2, 3]


def test_random_blocks_are_seeded_contiguous_distinct_and_cover_every_start():
    blocks = prune.random_blocks(30, 6, 3, seed=0)
    assert blocks == prune.random_blocks(30, 6, 3, seed=0)  # deterministic
    assert blocks != prune.random_blocks(30, 6, 3, seed=1)  # the seed matters
    assert len({b[0] for b in blocks}) == 3  # distinct
    for block in blocks:
        assert block == list(range(block[0], block[0] + 6)) and 0 <= block[0] <= 24
    # more blocks extend the same list; 25 draws are the 25 possible starts, each once
    every = prune.random_blocks(30, 6, 25, seed=0)
    assert every[:3] == blocks and sorted(b[0] for b in every) == list(range(25))
    assert every != sorted(every)  # shuffled, not counted up
    # past the number of positions the draw starts over: all still valid blocks
    assert sorted(b[0] for b in prune.random_blocks(4, 3, 4)) == [0, 0, 1, 1]
    # choose_layers' seed s is the s-th block, so seeds 0..k-1 are the k distinct blocks
    assert [prune.choose_layers("random", 6, 30, seed=s) for s in range(3)] == blocks
    for bad in (-1, 10_000, 1.5, True):
        with pytest.raises(LayerPruneError, match="seed must be an integer in 0..9999"):
            prune.choose_layers("random", 6, 30, seed=bad)


@pytest.mark.parametrize("strategy, inputs, phrase", [
    ("block-influence", {}, "needs influence scores, one finite number per layer (4), got none"),
    ("block-influence", {"influence": [0.1] * 3}, "(4), got 3 values"),
    ("block-influence", {"influence": [0.1, float("nan"), 0.2, 0.3]}, "finite"),
    ("greedy-loss", {"greedy_order": [3]}, "at least n=2 layers, got 1 layers"),
    ("greedy-loss", {"greedy_order": [3, 3]}, "distinct layer indices in 0..3"),
    ("greedy-loss", {"greedy_order": [3, 4]}, "distinct layer indices in 0..3"),
    ("similarity", {}, "needs distances"),
    ("similarity", {"distance": [[0.1]] * 3}, "distances are for 3 layers"),
    ("bogus", {}, "strategy must be one of"),
])
def test_each_strategy_names_the_input_it_lacks(strategy, inputs, phrase):
    with pytest.raises(LayerPruneError) as err:
        prune.choose_layers(strategy, 2, 4, **inputs)
    assert phrase in str(err.value)


def test_describe_layers_compresses_runs():
    assert prune.describe_layers(list(range(12, 18))) == "12-17"
    assert prune.describe_layers([3, 7, 9]) == "3,7,9"
    assert prune.describe_layers([9, 3, 4, 5]) == "3-5,9"
    assert prune.describe_layers([0]) == "0"
    assert prune.describe_layers([1, 2, 5, 6]) == "1-2,5-6"


def test_model_card_of_a_non_contiguous_prune_names_the_layers(tiny_models, tmp_path):
    loaded = load_model(tiny_models["llama"])
    prune.save_pruned(loaded, [0, 2], tmp_path / "out", {"strategy": "block-influence"})
    card = (tmp_path / "out" / "README.md").read_text()
    assert "with layers 0,2 removed" in card and "removed layers: [0, 2]" in card
    assert json.loads((tmp_path / "out" / "prune.json").read_text())["removed_layers"] == [0, 2]


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def calibration_jsonl(tmp_path) -> str:
    path = tmp_path / "calibration.jsonl"
    lines = TEXTS + [t.upper() for t in TEXTS]  # 14 records
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)


def test_prune_by_block_influence_writes_the_least_influential_layers(tiny_models,
                                                                      calibration_jsonl,
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["prune", "--model", tiny_models["qwen2"], "--n", "2", "--strategy",
                 "block-influence", "--data", calibration_jsonl, "--samples", "8",
                 "--seq-len", "16", "--out", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    loaded = load_model(tiny_models["qwen2"])
    ids = calibration.tokenize(TEXTS + [TEXTS[0].upper()], loaded.tokenizer, 16)
    expected = criteria.block_influence(loaded.model, ids, 1, pad_token_id(loaded.tokenizer))
    assert record["strategy"] == "block-influence"
    assert record["block_influence"] == pytest.approx(expected, abs=1e-6)
    assert record["calibration"] == {"data": calibration_jsonl, "samples": 8, "seq_len": 16}
    assert record["removed_layers"] == sorted(sorted(range(4), key=expected.__getitem__)[:2])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2


def test_prune_by_greedy_loss_random_and_explicit_layers(tiny_models, calibration_jsonl,
                                                         tmp_path):
    model = tiny_models["llama"]
    assert main(["prune", "--model", model, "--n", "2", "--strategy", "greedy-loss", "--data",
                 calibration_jsonl, "--samples", "4", "--seq-len", "8", "--out",
                 str(tmp_path / "greedy")]) == 0
    record = json.loads((tmp_path / "greedy" / "prune.json").read_text())
    assert record["removed_layers"] == sorted(record["greedy_order"])
    assert len(record["greedy_losses"]) == 2 and record["forward_passes"] == 1 + 4 + 3
    assert main(["prune", "--model", model, "--n", "2", "--strategy", "random", "--seed", "1",
                 "--out", str(tmp_path / "random")]) == 0
    record = json.loads((tmp_path / "random" / "prune.json").read_text())
    assert record["seed"] == 1 and record["removed_layers"] == prune.random_blocks(4, 2, 2)[1]
    assert main(["prune", "--model", model, "--layers", "3,0", "--out",
                 str(tmp_path / "listed")]) == 0
    record = json.loads((tmp_path / "listed" / "prune.json").read_text())
    assert record["removed_layers"] == [0, 3] and record["strategy"] == "manual"
    assert "with layers 0,3 removed" in (tmp_path / "listed" / "README.md").read_text()


@pytest.mark.parametrize("extra, phrase", [
    (["--n", "2", "--strategy", "bogus"], "strategy must be one of similarity, heuristic, "
     "block-influence, greedy-loss, random, got 'bogus'"),
    (["--n", "2", "--strategy", "block-influence"],
     "strategy 'block-influence' needs calibration text: --data FILE --samples N --seq-len T"),
    (["--n", "2", "--strategy", "greedy-loss", "--data", "DATA", "--samples", "4"],
     "needs calibration text: --seq-len T missing"),
    (["--n", "2", "--strategy", "greedy-loss", "--data", "DATA", "--samples", "99",
      "--seq-len", "8"], "samples=99 but data"),
    (["--n", "2", "--strategy", "block-influence", "--data", "DATA", "--samples", "0",
      "--seq-len", "8"], "samples must be a positive integer"),
    (["--n", "2", "--strategy", "heuristic", "--data", "DATA"], "read only by strategies "
     "block-influence, greedy-loss"),
    (["--n", "2", "--strategy", "heuristic", "--seed", "1"], "read only by strategy 'random'"),
    (["--n", "2", "--strategy", "random", "--seed", "-1"], "seed must be an integer in 0..9999"),
    (["--n", "5", "--strategy", "block-influence", "--data", "DATA", "--samples", "4",
      "--seq-len", "8"], "n must be in 1..3"),
    (["--layers", "1,1"], "layers to drop must be distinct indices in 0..3, got [1, 1]"),
    (["--layers", "0,4"], "distinct indices in 0..3, got [0, 4]"),
    (["--layers", "0-3"], "cannot drop every layer"),
    (["--layers", "0,2", "--start", "0"], "give exactly one of start (--start), strategy"),
    (["--layers", "0,2", "--n", "3"], "n=3 but layers lists 2 layers"),
    (["--layers", "1;2"], "expected layer indices such as 3,7,9 or 12-17, got '1;2'"),
    (["--layers", "3-1"], "expected layer indices"),
    (["--n", "2"], "give exactly one of start (--start), strategy (--strategy) or layers"),
])
def test_bad_prune_input_is_one_line_before_loading(extra, phrase, tiny_models,
                                                    calibration_jsonl, tmp_path, capsys,
                                                    weights_must_not_load):
    out = tmp_path / "out"
    argv = ["prune", "--model", tiny_models["llama"],
            *[calibration_jsonl if a == "DATA" else a for a in extra], "--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (the --layers syntax) exit from the parser
        code = e.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("layerprune prune: error: "), lines
    assert phrase in lines[0], lines[0]
    assert not out.exists()
