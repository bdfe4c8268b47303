"""Healing methods behind one interface: the distillation loss, distillation on a tiny pruned model
(online and with the teacher's top-k cached, 4-bit student, resume), the linear patch through
heal(), which config fields key each method, and refusals of bad input.

The tiny random models (conftest: hidden 32, 4 layers) have small logits, so their KL values are
small (~1e-3 nats); the tests compare ratios, which are what a broken loss or cache would move.
Text: a small seeded grammar (8 nouns, 7 adjectives, 5 verbs), so the held-out passages are new
sentences of the same language and healing can generalise to them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from layerprune.cli import main
from layerprune.errors import LayerPruneError
from layerprune.heal import config
from layerprune.heal import run as heal_mod
from layerprune.heal.config import HealConfig, method_config
from layerprune.heal.distill import (
    CACHE,
    CACHE_RECORD,
    choose_teacher_logits,
    distillation_loss,
    estimate_bytes,
    kl_to_teacher,
    teacher_top_k,
    train_distilled,
)
from layerprune.heal.run import heal
from layerprune.report.figures import heal_curve

WORDS = {"adj": "red big small old new blue quiet".split(),
         "noun": "cat dog mat park house river tree bird".split(),
         "verb": "sees finds likes chases watches".split()}


def grammar(seed: int, records: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"the {rng.choice(WORDS['adj'])} {rng.choice(WORDS['noun'])} "
                     f"{rng.choice(WORDS['verb'])} the {rng.choice(WORDS['noun'])} ."
                     for _ in range(12)) for _ in range(records)]


def fast(**kw) -> HealConfig:
    """Small settings for tiny models (4-bit student, as by default); lr 1e-2 measured best."""
    base = dict(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_ratio=0.0, save_every=None,
                linear_samples=16)
    return HealConfig(**{**base, **kw})


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "grammar.txt"
    path.write_text("\n\n".join(grammar(0, 60)))
    return str(path)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(t)["input_ids"][:40] for t in grammar(1, 8)])


@torch.no_grad()
def heldout_kl(model_dir, teacher_dir, ids) -> float:
    """Mean KL(teacher || model) per position on held-out ids (full vocabulary, T = 1)."""
    return kl_to_teacher(load(model_dir)(ids).logits, 1.0, load(teacher_dir)(ids).logits
                         ).mean().item()


# ----------------------------------------------------------------------------- the loss

def test_distillation_loss_zero_for_the_teacher_itself_and_exact_otherwise():
    gen = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(2, 6, 50, generator=gen)
    teacher = student + torch.randn(2, 6, 50, generator=gen)
    labels = torch.randint(0, 50, (2, 6), generator=gen)
    labels[0, 3] = -100  # position 2 of row 0 predicts nothing: left out of both terms
    keep = labels[:, 1:] != -100
    for T in (1.0, 2.5):
        same = teacher_top_k(student.clone(), 8, T)
        assert distillation_loss(student, labels, T, 1.0, teacher_logits=student.clone()) == 0
        assert abs(distillation_loss(student, labels, T, 1.0, topk=same)) < 1e-6
        # by hand: T^2 * sum p (log p - log q), over the labelled positions
        p, q = F.softmax(teacher[:, :-1] / T, -1), F.softmax(student[:, :-1] / T, -1)
        by_hand = T**2 * (p * (p.log() - q.log())).sum(-1)[keep].mean()
        online = distillation_loss(student, labels, T, 1.0, teacher_logits=teacher)
        assert online > 1e-2 and torch.isclose(online, by_hand, rtol=1e-5), (online, by_hand)
        # top-8: the KL over 9 outcomes, the teacher's 8 ids and all others as one
        ids = p.topk(8, dim=-1).indices
        p9 = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
        q9 = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
        by_hand = T**2 * (p9 * (p9.log() - q9.log())).sum(-1)[keep].mean()
        cached = distillation_loss(student, labels, T, 1.0, topk=teacher_top_k(teacher, 8, T))
        assert cached > 1e-3 and torch.isclose(cached, by_hand, rtol=1e-4), (cached, by_hand)
        # k >= vocabulary: the cache holds every id, and the loss is the online one
        full = teacher_top_k(teacher, 64, T)
        assert full.ids.shape[-1] == 50 and torch.isinf(full.tail).all()
        assert torch.isclose(distillation_loss(student, labels, T, 1.0, topk=full), online,
                             rtol=1e-5)
    lm = F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                         ignore_index=-100)
    assert torch.isclose(distillation_loss(student, labels, 2.0, 0.0, teacher), lm, rtol=1e-6)
    kl = distillation_loss(student, labels, 2.0, 1.0, teacher)
    assert torch.isclose(distillation_loss(student, labels, 2.0, 0.3, teacher),
                         0.3 * kl + 0.7 * lm, rtol=1e-6)
    # the Trainer's count over the whole accumulated batch replaces this batch's count
    assert torch.isclose(distillation_loss(student, labels, 2.0, 1.0, teacher,
                                           num_items=2 * int(keep.sum())), kl / 2, rtol=1e-6)


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module", params=["cached", "auto"])
def distilled(request, pruned, text, tmp_path_factory):
    """30 distillation steps on the tiny pruned Llama; auto resolves to online here."""
    out = tmp_path_factory.mktemp(f"distilled-{request.param}") / "out"
    record = heal(str(pruned), text, str(out), fast(teacher_logits=request.param),
                  method="distill")
    heal_curve(out)  # what the CLI and the flow draw beside the library's loss_curve.json
    return out, record


def test_distillation_lowers_the_kl_to_the_teacher(distilled, pruned, tiny_models, heldout_ids):
    out, record = distilled
    curve = json.loads((out / "loss_curve.json").read_text())
    assert len(curve) == 30 and curve[-1]["loss"] < 0.6 * curve[0]["loss"], curve
    # measured: 6.9e-4 -> 3.1e-4 (cached, lr 1e-2); an LM-only loss or a cache shifted against
    # its blocks leaves it where it was
    before = heldout_kl(pruned, tiny_models["llama"], heldout_ids)
    after = heldout_kl(out / "merged", tiny_models["llama"], heldout_ids)
    assert after < 0.75 * before, (before, after)


def test_distill_records_and_outputs(distilled, tiny_models):
    out, record = distilled
    assert json.loads((out / "heal.json").read_text()) == record
    assert record["method"] == "distill" and record["teacher"] == tiny_models["llama"]
    assert record["tokens_seen"] == 30 * 4 * 32 and record["fit_tokens"] == 0
    assert record["peak_memory_mb"] > 100  # the process RSS, torch included
    assert record["train_seconds"] > 0 and record["wall_seconds"] >= record["train_seconds"]
    mode = record["config"]["teacher_logits"]
    assert record["teacher_logits"] == ("cached" if mode == "cached" else "online")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter", "heal.json", "loss_curve.json", "loss_curve.png", "merged"]
    card = (out / "merged" / "README.md").read_text()
    assert f"Distillation from `{tiny_models['llama']}` at temperature 1" in card
    assert load(out / "merged").config.num_hidden_layers == 3


def test_kl_weight_0_is_the_lora_loss_under_gradient_accumulation(pruned, text, tmp_path):
    """kl_weight 0 leaves only the next-token term: the adapter of `lora`, here with two
    micro-batches per step (an LM term off by the shift, or a KL term that leaks in, trains
    another adapter). A uniform scale error would not show (Adam and clipping undo it): the
    normalisation is checked on the loss itself, above."""
    cfg = fast(steps=3, batch_size=2, grad_accum=2, kl_weight=0.0, teacher_logits="cached",
               top_k=4, quant=False, dropout=0.0)
    heal(str(pruned), text, str(tmp_path / "lora"), cfg, method="lora")
    heal(str(pruned), text, str(tmp_path / "distill"), cfg, method="distill")
    lora = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    distill = load_file(tmp_path / "distill" / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().max() > 1e-3 for n, t in lora.items() if "lora_B" in n)
    for name, tensor in lora.items():
        torch.testing.assert_close(distill[name], tensor, atol=1e-5, rtol=1e-4)


def test_4bit_student_trains_only_lora_on_cpu(pruned, tiny_models, tmp_path):
    import bitsandbytes as bnb

    blocks = torch.randint(0, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    model, curve, _, choice = train_distilled(
        str(pruned), tiny_models["llama"], blocks, fast(steps=2, seq_len=16, quant=True,
                                                        teacher_logits="online"),
        tmp_path / "ckpt", None, None)
    assert choice["teacher_logits"] == "online" and len(curve) == 2
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 3 * 7
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------------------- resume

RESUMABLE = dict(steps=6, save_every=2, teacher_logits="cached", top_k=16)


@pytest.fixture(scope="module")
def uninterrupted(pruned, text, tmp_path_factory):
    """A finished cached-distill run whose checkpoints (and cache) were kept."""
    root = tmp_path_factory.mktemp("uninterrupted")
    heal(str(pruned), text, str(root / "out"), fast(**RESUMABLE), method="distill",
         checkpoint_dir=str(root / "ckpt"))
    return root


@pytest.mark.parametrize("damage", ["none", "truncate cache", "delete cache record"])
def test_distill_resumes_with_the_cache_checked(damage, uninterrupted, pruned, text, tmp_path,
                                                caplog):
    """As if killed before checkpoint-6 was written: resumed from checkpoint-4 it ends with the
    uninterrupted adapter and curve, the cache reused when whole and rebuilt when not."""
    shutil.copytree(uninterrupted / "out", tmp_path / "out")
    shutil.copytree(uninterrupted / "ckpt", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint-6")
    cache = tmp_path / "ckpt" / CACHE
    if damage == "truncate cache":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "delete cache record":  # a kill between the cache's rename and its record
        (tmp_path / "ckpt" / CACHE_RECORD).unlink()
    steps = []
    with caplog.at_level(logging.INFO, logger="layerprune.heal.run"):
        record = heal(str(pruned), text, str(tmp_path / "out"), fast(**RESUMABLE),
                      method="distill", checkpoint_dir=str(tmp_path / "ckpt"),
                      progress=lambda step, total: steps.append(step))
    assert steps == [5, 6] and record["resumed_from_step"] == 4
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert ("reusing the teacher's top-k" in messages) == (damage == "none"), messages
    assert ("cache not used" in messages) == (damage == "truncate cache"), messages
    want = load_file(uninterrupted / "out" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert (json.loads((tmp_path / "out" / "loss_curve.json").read_text())
            == json.loads((uninterrupted / "out" / "loss_curve.json").read_text()))


# ----------------------------------------------------------------------------- linear

def test_linear_and_linear_distill_through_heal(pruned, text, tmp_path, monkeypatch):
    from peft import PeftModel

    from layerprune.heal import linear_patch

    linear = heal(str(pruned), text, str(tmp_path / "linear"), fast(), method="linear")
    assert linear["method"] == "linear" and linear["tokens_seen"] == 0
    assert linear["fit_tokens"] == 16 * 32 and linear["train_seconds"] == 0
    assert sorted(p.name for p in (tmp_path / "linear").iterdir()) == [
        "heal.json", "loss_curve.json", "merged"]
    assert json.loads((tmp_path / "linear" / "loss_curve.json").read_text()) == []
    assert (tmp_path / "linear" / "merged" / "linear_patch.json").is_file()

    out, ckpt = tmp_path / "both", tmp_path / "both-ckpt"
    cfg = fast(steps=4, teacher_logits="cached", top_k=8, save_every=2)
    both = heal(str(pruned), text, str(out), cfg, method="linear+distill",
                checkpoint_dir=str(ckpt))
    assert both["method"] == "linear+distill" and both["tokens_seen"] == 4 * 4 * 32
    assert both["fit_tokens"] == linear["fit_tokens"]
    card = (out / "merged" / "README.md").read_text()
    assert "## Linear patch" in card and "no training, then:" in card
    # merged = the patched weights (linear's merged/, the same fit) + the adapter, not pruned +
    # adapter
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = load(tmp_path / "linear" / "merged")
        expected = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits
        got = load(out / "merged")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    def no_patch(*args, **kwargs):
        raise AssertionError("the patched checkpoint kept for this run was not reused")

    monkeypatch.setattr(linear_patch, "patch_checkpoint", no_patch)
    again = heal(str(pruned), text, str(out), cfg, method="linear+distill",
                 checkpoint_dir=str(ckpt))
    assert again["resumed_from_step"] == 4 and again["fit_tokens"] == both["fit_tokens"]


def test_a_late_refusal_of_the_patch_leaves_nothing(tiny_models, text, tmp_path):
    """Gemma 3 normalises its MLP output before the residual add: only the patch's probe, on
    real activations, can refuse it, after linear+distill made its checkpoint directory."""
    pruned = tmp_path / "gemma3-pruned"
    assert main(["prune", "--model", tiny_models["gemma3"], "--n", "1", "--start", "1",
                 "--out", str(pruned)]) == 0
    out = tmp_path / "out"
    with pytest.raises(LayerPruneError, match="method linear: cannot patch"):
        heal(str(pruned), text, str(out), fast(steps=2), method="linear+distill")
    assert not out.exists()


def test_cli_heal_methods(pruned, text, tmp_path):
    out = tmp_path / "linear"
    assert main(["heal", "--model", str(pruned), "--data", text, "--method", "linear",
                 "--samples", "8", "--seq-len", "16", "--out", str(out)]) == 0
    record = json.loads((out / "heal.json").read_text())
    assert record["method"] == "linear" and record["fit_tokens"] == 8 * 16
    out = tmp_path / "distill"
    assert main(["heal", "--model", str(pruned), "--data", text, "--method", "distill",
                 "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--teacher-logits",
                 "cached", "--top-k", "5", "--temperature", "2", "--kl-weight", "0.5",
                 "--no-quant", "--out", str(out)]) == 0
    record = json.loads((out / "heal.json").read_text())
    assert (record["method"], record["teacher_logits"]) == ("distill", "cached")
    assert {k: record["config"][k] for k in ("top_k", "temperature", "kl_weight")} == {
        "top_k": 5, "temperature": 2.0, "kl_weight": 0.5}


# ----------------------------------------------------------------------------- config

def test_method_config_keys_only_what_changes_each_result():
    cfg = HealConfig(teacher_logits="online")
    lora, linear = method_config(cfg, "lora"), method_config(cfg, "linear")
    assert {"steps", "lr", "rank", "seq_len", "quant"} <= set(lora)
    assert not {"temperature", "kl_weight", "top_k", "teacher_logits", "linear_samples",
                "save_every", "device_map", "gradient_checkpointing"} & set(lora)
    assert linear == {"linear_samples": 120, "seq_len": 256, "text_field": "text"}
    distill = method_config(cfg, "distill")
    assert set(distill) - set(lora) == {"temperature", "kl_weight", "teacher_logits"}
    assert "top_k" in method_config(HealConfig(teacher_logits="auto"), "distill")
    assert set(method_config(cfg, "linear+distill")) == set(distill) | set(linear)
    with pytest.raises(LayerPruneError, match="method must be one of lora, distill, linear, "
                                              "linear\\+distill, got 'foo'"):
        method_config(cfg, "foo")
    for bad in ({"temperature": 0}, {"kl_weight": 1.5}, {"teacher_logits": "disk"},
                {"top_k": 0}, {"linear_samples": 0}):
        with pytest.raises(LayerPruneError, match=f"heal config: {next(iter(bad))}"):
            config.check_config(bad)


def test_auto_teacher_logits_fit_rule(pruned, tiny_models):
    assert choose_teacher_logits("auto", need=80, free=100) == "online"
    assert choose_teacher_logits("auto", need=81, free=100) == "cached"
    assert choose_teacher_logits("cached", need=1, free=100) == "cached"
    assert choose_teacher_logits("online", need=100, free=1) == "online"
    vocab = 49152
    full = estimate_bytes(tiny_models["llama"], str(pruned), fast(quant=False), vocab)
    nf4 = estimate_bytes(tiny_models["llama"], str(pruned), fast(quant=True), vocab)
    # the student's 3 layers: q, o 32x32; k, v 32x16 (2 kv heads); gate, up, down 32x64 each,
    # at 4 bytes (fp32) in full and 0.5 in NF4
    linear_weights = 3 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    assert full - nf4 == int(linear_weights * 3.5)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def no_training(monkeypatch):
    from transformers import AutoModelForCausalLM

    def tripwire(*args, **kwargs):
        raise AssertionError("a model started to load despite bad input")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", tripwire)


def test_bad_methods_and_teachers_are_refused_before_work(pruned, tiny_models, text, tmp_path,
                                                          no_training):
    out = tmp_path / "out"

    def refused(model, match, **kwargs):
        with pytest.raises(LayerPruneError, match=match):
            heal(str(model), text, str(out), fast(), **kwargs)
        assert not out.exists()

    refused(pruned, r"method must be one of lora, distill, linear, linear\+distill, got 'foo'",
            method="foo")
    # the pruned model is no teacher of itself: 3 layers where prune.json says 4 were cut
    refused(pruned, r"teacher: .* has 3 decoder layers, but prune.json says the pruned model "
            r"was cut from one of 4", method="distill", teacher=str(pruned))
    # no prune.json: nothing names a source
    refused(tiny_models["llama"], "teacher: method 'distill' needs a teacher",
            method="distill")
    for method in ("linear", "linear+distill"):  # the patch's own check, made once, up front
        refused(tiny_models["llama"], "has no prune.json; the linear patch needs a checkpoint "
                "written by `layerprune prune`", method=method, teacher=tiny_models["llama"])
