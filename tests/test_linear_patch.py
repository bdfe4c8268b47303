"""The training-free linear patch (layerprune.heal.linear_patch) against independent computations.

The fitted map is checked against torch.linalg.lstsq on every (m, target - y) row collected by
a separate path (one unpadded sequence at a time, output_hidden_states and a hook on the MLP
module rather than its projection); the fold against y + m @ T read from the unpatched model;
the saved checkpoint against the in-memory patched model, exactly. Tiny random models (conftest:
hidden 32, 4 layers) make each case take well under a second.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import REAL_MODEL, TEXTS
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerPruneError
from layerprune.heal.linear_fit import fit_linear_patch, fold_patches
from layerprune.heal.linear_patch import patch_checkpoint
from layerprune.method.batching import pad_token_id
from layerprune.method.calibration import tokenize
from layerprune.method.data import read_records
from layerprune.method.prune import remove_layers
from layerprune.method.surgery import write_pruned
from layerprune.models.loading import base_model, decoder_layers, load_model

SEQ_LEN = 64


def calibration_ids(tokenizer) -> list[list[int]]:
    """~300 token rows (10x the hidden size, so the fit is well posed), of unequal lengths so
    that batches hold padding the fit must skip."""
    pairs = [f"{a} {b}" for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1])]
    return [tokenizer(t)["input_ids"] for t in TEXTS + pairs]


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def mlp_of(layer):
    return layer.mlp


@torch.no_grad()
def brute_force_rows(source, partial, k_partial: int, b: int, ids) -> tuple:
    """(M, R) float64: for every token of every sequence (run alone, no padding), M = the output
    of the MLP of layer `k_partial` in `partial`, R = x^(b+1) of `source` minus that layer's
    output minus M. x^(b+1) is hidden_states[b+1], or the final norm's input when b = L-1."""
    ms, rs = [], []
    L = len(decoder_layers(source))
    for row in ids:
        x = torch.tensor([row])
        got = {}
        handle = mlp_of(decoder_layers(partial)[k_partial]).register_forward_hook(
            lambda mod, args, out: got.__setitem__("m", out[0]))
        states = partial(x, output_hidden_states=True).hidden_states
        handle.remove()
        out_k = states[k_partial + 1][0]
        if b + 1 < L:
            target = source(x, output_hidden_states=True).hidden_states[b + 1][0]
        else:
            body = base_model(source)
            norm = body.norm if hasattr(body, "norm") else body.ln_f
            handle = norm.register_forward_pre_hook(
                lambda mod, args: got.__setitem__("t", args[0][0]))
            source(x)
            handle.remove()
            target = got["t"]
        ms.append(got["m"].double())
        rs.append((target - out_k + got["m"]).double())
    return torch.cat(ms), torch.cat(rs)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fit_equals_direct_least_squares_and_leaves_the_source_as_it_was(family, tiny_models,
                                                                         tokenizer):
    source = load(tiny_models[family])
    ids = calibration_ids(tokenizer)
    probe = torch.tensor([ids[3]])
    with torch.no_grad():
        logits_before = source(probe).logits
    state_before = {k: v.clone() for k, v in source.state_dict().items()}

    (patch,) = fit_linear_patch(source, [1, 2], ids, batch_size=3, pad_id=pad_token_id(tokenizer))

    M, R = brute_force_rows(source, source, 0, 2, ids)
    T = torch.linalg.lstsq(M, R).solution
    assert patch["layer"] == 0 and patch["removed"] == [1, 2]
    assert patch["rows"] == M.shape[0] == sum(map(len, ids))
    assert patch["T"].dtype == torch.float32 and relative(patch["T"], T) < 1e-5
    before = float((R - M).norm() / R.norm())
    after = float((R - M @ T).norm() / R.norm())
    assert patch["residual_before"] == pytest.approx(before, rel=1e-6)
    assert patch["residual_after"] == pytest.approx(after, rel=1e-5)
    assert patch["residual_after"] < patch["residual_before"] - 0.01
    # the source is unchanged: same weights, same layers, no hook left behind
    assert len(decoder_layers(source)) == 4 and source.config.num_hidden_layers == 4
    assert all(torch.equal(v, state_before[k]) for k, v in source.state_dict().items())
    with torch.no_grad():
        assert torch.equal(source(probe).logits, logits_before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_layer_outputs_m_times_T_plus_y(family, tiny_models, tokenizer, tmp_path):
    write_pruned(tiny_models[family], [2], tmp_path / "pruned")
    plain, patched = load(tmp_path / "pruned"), load(tmp_path / "pruned")
    torch.manual_seed(1)
    for model in (plain, patched):  # a nonzero bias (GPT-2's init is zero) must be mapped too
        proj = mlp_of(decoder_layers(model)[1]).c_proj if family == "gpt2" else None
        if proj is not None:
            proj.bias.data = torch.linspace(-1, 1, proj.bias.numel())
    T = torch.eye(32) + 0.3 * torch.randn(32, 32)
    fold_patches(patched, [2], [{"layer": 1, "removed": [2], "T": T}])

    def layer1(model, x):
        got = {}
        hooks = [mlp_of(decoder_layers(model)[1]).register_forward_hook(
                     lambda mod, a, out: got.__setitem__("m", out)),
                 decoder_layers(model)[1].register_forward_hook(
                     lambda mod, a, out: got.__setitem__("out", out))]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return got

    x = torch.tensor([calibration_ids(tokenizer)[3]])
    want, got = layer1(plain, x), layer1(patched, x)
    expected = want["out"] - want["m"] + want["m"] @ T
    assert relative(got["out"], expected) < 1e-5
    assert relative(want["out"], expected) > 0.05  # T is far from I: the check has teeth


def test_later_runs_are_fitted_on_the_model_with_earlier_runs_patched(tiny_models, tokenizer):
    source = load(tiny_models["llama"])
    ids = calibration_ids(tokenizer)
    probe = torch.tensor([ids[3]])
    with torch.no_grad():
        logits_before = source(probe).logits
    first, second = fit_linear_patch(source, [3, 1], ids, batch_size=4,
                                     pad_id=pad_token_id(tokenizer))
    with torch.no_grad():  # no layer left out, no patch hook left behind
        assert torch.equal(source(probe).logits, logits_before)
    assert (first["layer"], first["removed"], second["layer"], second["removed"]) == \
        (0, [1], 2, [3])
    M, R = brute_force_rows(source, source, 0, 1, ids)
    assert relative(first["T"], torch.linalg.lstsq(M, R).solution) < 1e-5
    partial = copy.deepcopy(source)  # without layer 1, its patch folded into layer 0
    remove_layers(partial, [1])
    fold_patches(partial, [1], [first])
    M, R = brute_force_rows(source, partial, 1, 3, ids)  # source layer 2 is partial's layer 1
    # the first patch is applied by a hook in the fit, folded here: rounding apart, the same
    assert relative(second["T"], torch.linalg.lstsq(M, R).solution) < 1e-4
    M0, R0 = brute_force_rows(source, source, 2, 3, ids)  # what fitting on the source would give
    assert relative(second["T"], torch.linalg.lstsq(M0, R0).solution) > 1e-2


@pytest.mark.parametrize("family,runs", [("llama", [[1, 2]]), ("qwen2", [[1, 2]]),
                                         ("gpt2", [[1, 2]]), ("llama", [[1], [3]]),
                                         ("gpt2", [[2, 3]])])
def test_saved_checkpoint_reproduces_the_patched_forward_exactly(family, runs, tiny_models,
                                                                 texts_jsonl, tmp_path):
    drop = [i for run in runs for i in run]
    write_pruned(tiny_models[family], drop, tmp_path / "pruned")
    out = tmp_path / "patched"
    record = patch_checkpoint(str(tmp_path / "pruned"), texts_jsonl, str(out), samples=7,
                              seq_len=SEQ_LEN, batch_size=3)

    source = load_model(tiny_models[family], "float32")
    ids = tokenize(read_records(texts_jsonl, limit=7), source.tokenizer, SEQ_LEN)
    patches = fit_linear_patch(source.model, drop, ids, 3, pad_token_id(source.tokenizer))
    in_memory = load(tmp_path / "pruned")
    fold_patches(in_memory, drop, patches)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    x = torch.tensor([ids[3]])
    with torch.no_grad():
        logits = reloaded(x).logits
        assert torch.equal(logits, in_memory(x).logits)
        assert not torch.allclose(logits, load(tmp_path / "pruned")(x).logits, atol=1e-4)
    assert len(decoder_layers(reloaded)) == 4 - len(drop)

    saved = json.loads((out / "linear_patch.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [r["removed"] for r in saved["runs"]] == runs
    assert [r["layer"] for r in saved["runs"]] == [run[0] - 1 for run in runs]
    assert saved["samples"] == 7 and saved["seq_len"] == SEQ_LEN
    assert saved["source"] == tiny_models[family]
    assert all(r["residual_after"] < r["residual_before"] for r in saved["runs"])
    assert json.loads((out / "prune.json").read_text()) == \
        json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert "## Linear patch" in (out / "README.md").read_text()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def refused(tmp_path, model_dir, data, **kw) -> str:
    out = tmp_path / "out" / "patched"
    with pytest.raises(LayerPruneError) as e:
        patch_checkpoint(str(model_dir), data, str(out), **{"samples": 7, "seq_len": SEQ_LEN,
                                                             **kw})
    assert not (tmp_path / "out").exists()  # nothing written, not even a parent or a temp dir
    return str(e.value)


def test_refuses_a_block_at_layer_0_and_a_norm_after_the_mlp(tiny_models, texts_jsonl,
                                                             tmp_path):
    write_pruned(tiny_models["llama"], [0, 1], tmp_path / "first")
    message = refused(tmp_path, tmp_path / "first", texts_jsonl)
    assert message.startswith("method linear: removed layers start at layer 0")

    write_pruned(tiny_models["gemma3"], [1, 2], tmp_path / "gemma")
    message = refused(tmp_path, tmp_path / "gemma", texts_jsonl)
    assert "Gemma3" in message and "post_feedforward_layernorm" in message
    with pytest.raises(LayerPruneError, match="post_feedforward_layernorm"):
        fit_linear_patch(load(tiny_models["gemma3"]), [1, 2], [[1, 2, 3, 4]] * 4)


def test_refuses_bad_input_with_one_clear_error_and_writes_nothing(tiny_models, texts_jsonl,
                                                                   tmp_path):
    write_pruned(tiny_models["llama"], [1, 2], tmp_path / "pruned")
    write_pruned(tiny_models["llama"], [2], tmp_path / "three")
    pruned = tmp_path / "pruned"
    assert "samples" in refused(tmp_path, pruned, texts_jsonl, samples=0)
    assert "seq_len" in refused(tmp_path, pruned, texts_jsonl, seq_len=1)
    assert "seq_len must be <= 512" in refused(tmp_path, pruned, texts_jsonl, seq_len=513)
    assert "batch_size" in refused(tmp_path, pruned, texts_jsonl, batch_size=0)
    assert "has only 7 records" in refused(tmp_path, pruned, texts_jsonl, samples=8)
    assert "does not exist" in refused(tmp_path, pruned, str(tmp_path / "none.jsonl"))
    assert "3 decoder layers, but prune.json says" in refused(tmp_path, pruned, texts_jsonl,
                                                     teacher=str(tmp_path / "three"))
    record = json.loads((pruned / "prune.json").read_text())
    (pruned / "prune.json").write_text(json.dumps({**record, "removed_layers": []}))
    assert "'removed_layers'" in refused(tmp_path, pruned, texts_jsonl)
    (pruned / "prune.json").unlink()
    assert "has no prune.json" in refused(tmp_path, pruned, texts_jsonl)


@pytest.mark.real
def test_real_smollm2_patch_lowers_held_out_loss(real_assets, tmp_path):
    from layerprune.method.loss import next_token_loss

    drop = list(range(12, 18))
    write_pruned(REAL_MODEL, drop, tmp_path / "pruned")
    record = patch_checkpoint(str(tmp_path / "pruned"), "bundled:wiki-calibration",
                              str(tmp_path / "patched"), samples=64, seq_len=128)
    base = load_model(REAL_MODEL, "float32")
    ids = tokenize(read_records("bundled:wiki-heldout", limit=16), base.tokenizer, 128)

    def loss(model) -> float:
        return next_token_loss(model, base.tokenizer, ids, show_bar=False)["loss"]

    base_loss = loss(base.model)
    pruned_loss = loss(load(tmp_path / "pruned"))
    patched_loss = loss(load(tmp_path / "patched"))
    print(f"base {base_loss:.3f} pruned {pruned_loss:.3f} patched {patched_loss:.3f}, "
          f"fit {record['fit_seconds']:.1f} s")
    assert record["runs"][0]["layer"] == 11 and record["runs"][0]["rows"] > 64 * 100
    assert patched_loss < pruned_loss - 0.15
    assert patched_loss > base_loss


def test_fewer_rows_than_hidden_size_gives_the_minimum_norm_solution(tiny_models, tokenizer):
    """20 token rows for a 32-wide map: X^T X is singular, Cholesky must not be trusted; the
    answer is the minimum-norm least-squares solution, pinv(M) R."""
    source = load(tiny_models["llama"])
    ids = [tokenizer(TEXTS[1])["input_ids"], tokenizer(TEXTS[0])["input_ids"][:8]]
    (patch,) = fit_linear_patch(source, [2], ids, pad_id=pad_token_id(tokenizer))
    M, R = brute_force_rows(source, source, 1, 2, ids)
    assert M.shape[0] < 32 and patch["rows"] == M.shape[0]
    assert relative(patch["T"], torch.linalg.pinv(M) @ R) < 1e-4
    assert patch["residual_after"] < 1e-3  # fewer rows than unknowns: fitted exactly


@pytest.mark.parametrize("method", ["linear", "linear+distill"])
def test_heal_checks_the_teacher_and_the_patch_request_once(method, tiny_models, texts_jsonl,
                                                            tmp_path, monkeypatch):
    """One heal checks its teacher once, in one function (heal.validation.check_teacher), and
    the linear patch's request once. Catches the teacher rules written twice (the linear patch
    had its own copy beside the distillation's), and `patch_checkpoint` checking again what
    heal's validation already checked (each teacher check reads its config and tokenizer)."""
    from layerprune.heal import linear_patch, run, validation
    from layerprune.heal.config import HealConfig

    calls = {"check_teacher": 0, "check_patch_request": 0}
    for name in calls:
        real = getattr(validation, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(validation, name, counted)
        if name == "check_patch_request":
            monkeypatch.setattr(linear_patch, name, counted)
    write_pruned(tiny_models["llama"], [1, 2], tmp_path / "pruned")
    cfg = HealConfig(steps=1, batch_size=2, seq_len=SEQ_LEN, linear_samples=7, quant=False,
                     save_every=None, gradient_checkpointing=False)
    run.heal(str(tmp_path / "pruned"), texts_jsonl, str(tmp_path / "out"), cfg, method=method)
    assert calls == {"check_teacher": 1, "check_patch_request": 1}
    assert (tmp_path / "out" / "merged" / "linear_patch.json").is_file() or method != "linear"
