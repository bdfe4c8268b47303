"""The CLI contract (`layerprune distances | prune | loss`) and its errors on bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from layerprune.cli import main
from layerprune.models.loading import load_model
from tests.conftest import TEXTS


def _distances(model, data, out, *extra):
    return main(["distances", "--model", model, "--data", data, "--samples", "6",
                 "--seq-len", "12", "--out", str(out), *extra])


def test_distances_contract_and_batch_size_invariance(tiny_models, texts_jsonl, tmp_path):
    model = tiny_models["llama"]
    assert _distances(model, texts_jsonl, tmp_path / "b1", "--batch-size", "1") == 0
    assert _distances(model, texts_jsonl, tmp_path / "b4", "--batch-size", "4",
                      "--padding-side", "left") == 0
    doc = json.loads((tmp_path / "b1" / "distances.json").read_text())
    assert set(doc) == {"num_layers", "n_samples", "distance"}
    assert doc["num_layers"] == 4 and doc["n_samples"] == 6
    assert [len(row) for row in doc["distance"]] == [4, 3, 2, 1]  # l = 0..L-n
    other = json.loads((tmp_path / "b4" / "distances.json").read_text())["distance"]
    for a, b in zip(doc["distance"], other):
        assert a == pytest.approx(b, abs=1e-5)
    assert (tmp_path / "b1" / "heatmap.png").stat().st_size > 1000


def test_distance_values_match_a_direct_computation(tiny_models, texts_jsonl, tmp_path):
    """Recompute d(x^(l), x^(l+n)) from output_hidden_states (inputs of layers 0..L-1) and the
    last layer's pre-norm output, one sample at a time, first 6 records truncated to 12 tokens."""
    model = tiny_models["gpt2"]
    assert _distances(model, texts_jsonl, tmp_path / "d") == 0
    doc = json.loads((tmp_path / "d" / "distances.json").read_text())
    loaded = load_model(model)
    last_layer_out = []
    hook = loaded.model.transformer.h[-1].register_forward_hook(
        lambda m, a, out: last_layer_out.append(out[0] if isinstance(out, tuple) else out))
    xs = []
    for text in TEXTS[:6]:
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:12]])
        with torch.no_grad():
            hs = loaded.model(ids, output_hidden_states=True).hidden_states
        xs.append(torch.stack([h[0, -1] for h in hs[:-1]] + [last_layer_out[-1][0, -1]]))
    hook.remove()
    for n in range(1, 5):
        for l in range(0, 5 - n):
            expected = sum(
                math.acos(max(-1.0, min(1.0, torch.nn.functional.cosine_similarity(
                    x[l].double(), x[l + n].double(), dim=0).item()))) / math.pi for x in xs) / 6
            assert doc["distance"][n - 1][l] == pytest.approx(expected, abs=1e-5)


def test_prune_and_loss_contract(tiny_models, texts_jsonl, tmp_path):
    model = tiny_models["llama"]
    assert _distances(model, texts_jsonl, tmp_path / "d") == 0
    assert main(["prune", "--model", model, "--n", "2", "--strategy", "similarity",
                 "--distances", str(tmp_path / "d"), "--out", str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p" / "prune.json").read_text())
    row = json.loads((tmp_path / "d" / "distances.json").read_text())["distance"][1]
    assert record["removed_layers"][0] == row.index(min(row))
    assert main(["prune", "--model", model, "--n", "1", "--start", "0",
                 "--out", str(tmp_path / "p0")]) == 0
    assert main(["loss", "--model", str(tmp_path / "p"), "--data", texts_jsonl,
                 "--seq-len", "10", "--samples", "3", "--out", str(tmp_path / "l")]) == 0
    got = json.loads((tmp_path / "l" / "loss.json").read_text())
    # By hand: each record on its own, summed token cross-entropies over all predicted tokens.
    loaded = load_model(str(tmp_path / "p"))
    total, count = 0.0, 0
    for text in TEXTS[:3]:
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:10]])
        with torch.no_grad():
            logits = loaded.model(ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def _fails(argv, capsys, *phrases):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.parametrize("n", ["0", "4", "-2"])
def test_bad_block_size(n, tiny_models, tmp_path, capsys):
    _fails(["prune", "--model", tiny_models["llama"], "--n", n, "--strategy", "heuristic",
            "--out", str(tmp_path / "o")], capsys, "n must be in 1..3")
    assert not (tmp_path / "o").exists()


def test_bad_inputs_fail_before_work_and_write_nothing(tiny_models, texts_jsonl, tmp_path,
                                                       capsys):
    model, out = tiny_models["llama"], tmp_path / "o"
    base = ["distances", "--model", model, "--seq-len", "8", "--out", str(out)]
    _fails(base + ["--data", texts_jsonl, "--samples", "0"], capsys, "samples must be")
    _fails(base + ["--data", str(tmp_path / "missing.jsonl"), "--samples", "2"], capsys,
           "does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    _fails(base + ["--data", str(tmp_path / "empty.jsonl"), "--samples", "2"], capsys, "empty")
    (tmp_path / "blank.jsonl").write_text('{"text": "fine"}\n{"text": "  "}\n')
    _fails(base + ["--data", str(tmp_path / "blank.jsonl"), "--samples", "2"], capsys,
           "line 2", "has no text")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    _fails(base + ["--data", str(tmp_path / "nofield.jsonl"), "--samples", "1"], capsys,
           "no 'text' field")
    _fails(base + ["--data", texts_jsonl, "--samples", "100"], capsys, "only 7 records")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    _fails(["distances", "--model", str(not_a_model), "--data", texts_jsonl, "--samples", "2",
            "--seq-len", "8", "--out", str(out)], capsys, "is not a model")
    assert not out.exists()


def test_unknown_architecture(tmp_path, texts_jsonl, capsys):
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, is_decoder=True)
    BertLMHeadModel(cfg).save_pretrained(tmp_path / "bert")
    _fails(["prune", "--model", str(tmp_path / "bert"), "--n", "1", "--start", "0",
            "--out", str(tmp_path / "o")], capsys, "unknown architecture", "model.layers")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [
    ["distances", "--data", "TEXTS", "--samples", "2", "--seq-len", "8"],
    ["prune", "--n", "1", "--start", "0"],
    ["loss", "--data", "TEXTS", "--seq-len", "8"],
    ["eval", "--tasks", "loss", "--data", "TEXTS", "--seq-len", "8"],
])
def test_an_out_that_is_a_file_fails_before_the_model_loads(command, tiny_models, texts_jsonl,
                                                            tmp_path, capsys):
    """The weights are truncated, so loading them would fail with another error: the one line
    must be about --out, and the file must be left as it was."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out in (taken, taken / "below"):
        args = [texts_jsonl if a == "TEXTS" else a for a in command]
        _fails([args[0], "--model", str(model), *args[1:], "--out", str(out)], capsys,
               "out: ", "is a file")
    assert taken.read_text() == "keep me"


def _choices(argv: list[str], capsys) -> list[str]:
    """The choices argparse offers for the bad value at the end of `argv` (from its error)."""
    from layerprune.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    listed = re.search(r"\(choose from ([^)]*)\)", capsys.readouterr().err).group(1)
    return [c.strip().strip("'") for c in listed.split(",")]


def test_cli_choices_are_the_librarys(capsys):
    """The parser spells out the choices that the library defines (it imports no torch-heavy
    module to build itself): a healing method or logits mode added to the library must reach
    the CLI.
    Catches a fifth healing method missing from `--method`."""
    from layerprune.heal.config import METHODS, HealConfig

    heal = ["heal", "--model", "m", "--data", "d", "--out", "o"]
    assert _choices(heal + ["--method", "bogus"], capsys) == list(METHODS)
    assert _choices(heal + ["--teacher-logits", "bogus"], capsys) == list(
        HealConfig.model_fields["teacher_logits"].annotation.__args__)
