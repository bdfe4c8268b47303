"""Healing: the real QLoRA path on tiny random models, merging, resuming, and input checks.

The tiny models (conftest: hidden 32, 4 layers, SmolLM2's tokenizer) are small enough that
bitsandbytes' 4-bit NF4 layers train on CPU in well under a second per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerprune import heal as heal_mod
from layerprune.errors import LayerPruneError
from layerprune.heal import HealConfig, check_config, heal, load_for_training, target_modules

# A short text repeated: a model can learn it quickly, so the loss must fall.
REPEAT = "the cat sat on the mat and the dog ran to the park . " * 8


@pytest.fixture(scope="module")
def heal_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("heal-data") / "heal.txt"
    path.write_text("\n\n".join([REPEAT] * 40))
    return str(path)


def fast(**kw) -> HealConfig:
    """Small settings for tiny models: a high lr so a few steps move the loss visibly."""
    base = dict(steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_ratio=0.0, save_every=None)
    return HealConfig(**{**base, **kw})


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def healed(tmp_path_factory, tiny_models, heal_text):
    """One 30-step QLoRA run on the tiny Llama, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("healed") / "out"
    calls = []
    record = heal(tiny_models["llama"], heal_text, str(out), fast(steps=30),
                  progress=lambda step, total: calls.append((step, total)))
    return out, record, calls


def test_config_defaults_and_errors():
    cfg = HealConfig()
    assert (cfg.rank, cfg.lora_alpha, cfg.dropout, cfg.lr, cfg.targets, cfg.quant) == (
        8, 16.0, 0.05, 3e-4, "mlp", True)
    assert HealConfig(rank=4).lora_alpha == 8.0 and HealConfig(alpha=5).lora_alpha == 5.0
    with pytest.raises(LayerPruneError, match=r"rank.*less than or equal to 64"):
        check_config({"rank": 65})
    with pytest.raises(LayerPruneError, match="bogus"):
        check_config({"bogus": 1})


def test_target_modules_per_family(tiny_models):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    def names(family, targets):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                tiny_models[family]))
        return target_modules(model, targets)

    for family in ("llama", "qwen2", "gemma3"):
        assert names(family, "mlp") == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
        assert names(family, "attn") == [f"self_attn.{p}_proj" for p in "koqv"]
    assert names("gpt2", "mlp") == ["mlp.c_fc", "mlp.c_proj"]  # Conv1D; suffixes stay apart
    assert names("gpt2", "all") == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.parametrize("quant", [True, False])
def test_only_lora_trains_on_4bit_base(tiny_models, quant):
    import bitsandbytes as bnb

    model = load_for_training(tiny_models["llama"], fast(quant=quant))
    wrapped = [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj",
                                                                  "down_proj"))]
    assert wrapped and all(hasattr(m, "lora_A") for m in wrapped)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert (n_4bit == 4 * 7) if quant else (n_4bit == 0)  # every Linear of the 4 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("self_attn" in n for n in trainable)  # targets="mlp", as in the paper


def test_heal_lowers_loss_and_writes_outputs(healed):
    out, record, calls = healed
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [p["step"] for p in curve] == list(range(1, 31))
    # the frozen random head caps it: the loss plateaus about 0.5 nats below where it starts
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.3, curve
    assert record["final_train_loss"] < record["initial_train_loss"]
    assert json.loads((out / "heal.json").read_text()) == record
    assert record["steps"] == 30 and record["tokens_seen"] == 30 * 4 * 32
    assert record["config"]["rank"] == 8 and record["resumed_from_step"] is None
    assert calls[0] == (1, 30) and calls[-1] == (30, 30)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "## Healing" in (out / "merged" / "README.md").read_text()
    # finished: no checkpoints, no pickles, no temporary directories left behind
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter", "heal.json", "loss_curve.json", "loss_curve.png", "merged"]
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def test_merged_equals_base_plus_adapter(healed, tiny_models):
    from peft import PeftModel

    out, _, _ = healed
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = reload(tiny_models["llama"])
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        expected = with_adapter(ids).logits
        merged = reload(out / "merged")
        got = merged(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter did something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None


def test_gpt2_conv1d_merge(tmp_path, tiny_models, heal_text):
    """GPT-2's Conv1D stores weights transposed; 4-bit loading turns them into Linear4bit, the
    full-precision merge target is Conv1D again. The merge must still equal base + adapter."""
    from peft import PeftModel

    out = tmp_path / "out"
    heal(tiny_models["gpt2"], heal_text, str(out), fast(steps=3, targets="all"))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(reload(tiny_models["gpt2"]),
                                             str(out / "adapter")).eval()(ids).logits
        got = reload(out / "merged")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_interrupted_run_resumes_from_checkpoint(tmp_path, tiny_models, heal_text):
    out = tmp_path / "out"
    cfg = fast(steps=4, save_every=2)

    def interrupt(step, total):
        if step == 3:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        heal(tiny_models["llama"], heal_text, str(out), cfg, progress=interrupt)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"]
    state = json.loads((out / "checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert not (out / "heal.json").exists() and not (out / "merged").exists()
    assert not (out / "adapter").exists()

    with pytest.raises(LayerPruneError, match="different heal run"):  # other settings: refuse
        heal(tiny_models["llama"], heal_text, str(out), fast(steps=4, save_every=2, lr=1e-3))

    steps = []
    record = heal(tiny_models["llama"], heal_text, str(out), cfg,
                  progress=lambda step, total: steps.append(step))
    assert steps == [3, 4]  # steps 1-2 came from the checkpoint
    assert record["resumed_from_step"] == 2 and record["steps"] == 4
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [p["step"] for p in curve] == [1, 2, 3, 4]
    assert (out / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("kwargs, data, match", [
    ({"rank": 0}, None, "rank"),
    ({"rank": 65}, None, "rank"),
    ({"steps": 0}, None, "steps"),
    ({"targets": "ffn"}, None, "targets"),
    ({"seq_len": 100_000}, None, "seq_len must be <= 512"),
    ({}, "short", "fewer than one packed sequence"),
    ({}, "missing.jsonl", "does not exist"),
])
def test_bad_input_fails_before_training(tmp_path, tiny_models, heal_text, monkeypatch,
                                         kwargs, data, match):
    def no_training(*a, **k):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(heal_mod, "load_for_training", no_training)
    if data == "short":
        data = str(tmp_path / "short.txt")
        Path(data).write_text("only a few words")
    elif data is not None:
        data = str(tmp_path / data)
    config = {"steps": 4, "seq_len": 32, **kwargs}
    out = tmp_path / "out"
    with pytest.raises(LayerPruneError, match=match):
        heal(tiny_models["llama"], data or heal_text, str(out), config)
    assert not out.exists()


def test_model_dir_must_be_a_checkpoint(tmp_path, heal_text):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerPruneError, match="model"):
        heal(str(tmp_path / "empty"), heal_text, str(tmp_path / "out"), fast())
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_heal_real_pruned_smollm2(tmp_path):
    from layerprune.models import load_model
    from layerprune.prune import save_pruned

    pruned = tmp_path / "pruned"
    save_pruned(load_model("bundled:SmolLM2-135M-Instruct"), list(range(23, 29)), pruned)
    out = tmp_path / "healed"
    record = heal(str(pruned), "bundled:wiki-heal", str(out),
                  HealConfig(steps=2, batch_size=1, seq_len=64, save_every=None))
    assert record["steps"] == 2 and record["final_train_loss"] == record["final_train_loss"]
    model = reload(out / "merged")
    assert model.config.num_hidden_layers == 24
    assert json.loads((out / "merged" / "prune.json").read_text())["removed_layers"] == list(
        range(23, 29))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
