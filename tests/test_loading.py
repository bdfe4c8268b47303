"""How a model is held (layerprune.models.loading): auto dtype/device, bitsandbytes quantization,
device_map with disk offload, and hub models pinned to a commit. Every stage asks `load_model`,
so these paths serve extraction, loss, evaluation and pruning alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from layerprune.api import model_spec
from layerprune.errors import LayerPruneError
from layerprune.method.calibration import tokenize
from layerprune.method.hidden_states import last_token_states
from layerprune.method.loss import next_token_loss
from layerprune.method.prune import removed_layers
from layerprune.models.loading import decoder_layers, load_model
from layerprune.models.placement import dtype_name, parse_size
from tests.conftest import TEXTS

REPO = Path(__file__).resolve().parent.parent


def _ids(loaded, n=4):
    return tokenize(TEXTS[:n], loaded.tokenizer, seq_len=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_auto_dtype_and_device_resolve_to_float32_cpu_without_a_gpu(tiny_models):
    assert dtype_name("auto", "auto") == "float32" and dtype_name("bfloat16", "cpu") == "bfloat16"
    loaded = load_model(tiny_models["llama"])  # every default is auto
    param = next(loaded.model.parameters())
    assert param.dtype == torch.float32 and param.device.type == "cpu"


@pytest.mark.parametrize("placement, named", [
    ({"dtype": "float64"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"quantization": "int4"}, "quantization"),
    ({"device_map": "everywhere"}, "device_map"),
    ({"max_memory": {"cpu": "1GB"}}, "device_map"),  # max_memory without a device_map
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory"),
])
def test_bad_placement_is_one_error_naming_the_parameter(tiny_models, placement, named):
    with pytest.raises(LayerPruneError, match=named):
        model_spec(tiny_models["llama"], placement)


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("700MB") == 700_000_000 and parse_size("40GB") == 40 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(4096) == 4096
    with pytest.raises(LayerPruneError, match="--max-memory|size"):
        parse_size("-3GB")


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory, tokenizer) -> str:
    """A tiny Llama of hidden size 64: bitsandbytes' CPU 4-bit kernel rejects hidden 32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("llama-64")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Largest relative error of a quantized model's hidden states against fp32's, measured on
# llama_64: nf4 0.17, int8 0.017. Adjacent layers' states differ by >= 0.32, zeros by 1.
STATE_TOLERANCE = {"nf4": 0.25, "int8": 0.05}


@pytest.mark.parametrize("quantization, layer_type", [("nf4", "Linear4bit"),
                                                       ("int8", "Linear8bitLt")])
def test_quantized_model_scores_close_to_full_precision(llama_64, quantization, layer_type):
    """bitsandbytes on CPU: the weights really are quantized (a loader that ignored the option
    would keep nn.Linear), and loss and hidden states still come out close to fp32's."""
    full = load_model(llama_64)
    quant = load_model(llama_64, quantization=quantization)
    mlp = decoder_layers(quant.model)[0].mlp
    assert type(mlp.down_proj).__name__ == layer_type
    ids = _ids(full)
    exact = next_token_loss(full.model, full.tokenizer, ids, 2)["loss"]
    approx = next_token_loss(quant.model, quant.tokenizer, ids, 2)["loss"]
    assert approx != exact and abs(approx - exact) < 0.05 * exact
    states = last_token_states(quant.model, ids, 2, show_bar=False)
    exact_states = last_token_states(full.model, ids, 2, show_bar=False)
    assert states.shape == exact_states.shape == (4, len(ids), 64)
    error = ((states - exact_states).norm(dim=-1) / exact_states.norm(dim=-1)).max().item()
    assert 0 < error < STATE_TOLERANCE[quantization], error


def test_lm_eval_tasks_run_on_a_4bit_model(llama_64, real_assets):
    """lm-eval's HFLM (our SharedPrefixHFLM) takes a bitsandbytes model as it is: no .to(),
    no dtype cast of 4-bit weights (either raises), and scores what a plain forward pass of
    the 4-bit model gives (tests/test_benchmarks.py computes BoolQ accuracy by hand)."""
    from layerprune.evaluate import benchmarks, run
    from tests.test_benchmarks import boolq_by_hand, boolq_margins, yes_bias_between, yes_biased

    quant = load_model(llama_64, quantization="nf4")
    margins = boolq_margins(quant.model, quant.tokenizer, 4)
    bias = yes_bias_between(margins)  # the random model answers both ways
    with yes_biased(quant.model, quant.tokenizer, bias):
        metrics = run.evaluate(quant.model, quant.tokenizer, ["boolq"], limit=4)
    value, _ = boolq_by_hand(margins, yes_bias=bias)
    assert metrics["boolq"]["n"] == 4 and metrics["boolq"]["value"] == pytest.approx(value)


def test_disk_offloaded_model_gives_the_in_memory_results_and_prunes(tiny_models, tmp_path):
    """A device_map that sends two layers to disk (accelerate) computes what the whole model in
    memory does, for the full model and for variants with layers removed in place."""
    ref = tiny_models["llama"]
    whole = load_model(ref)
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    spread = load_model(ref, device_map=dmap, offload_folder=str(tmp_path / "offload"))
    assert set(spread.model.hf_device_map.values()) == {"cpu", "disk"}
    ids = _ids(whole)
    torch.testing.assert_close(last_token_states(spread.model, ids, 2, show_bar=False),
                               last_token_states(whole.model, ids, 2, show_bar=False),
                               atol=1e-5, rtol=0)
    losses = []
    for drop in ([1, 2], [0]):
        with removed_layers(whole.model, drop), removed_layers(spread.model, drop):
            expected = next_token_loss(whole.model, whole.tokenizer, ids, 2)["loss"]
            assert next_token_loss(spread.model, spread.tokenizer, ids, 2)["loss"] == \
                pytest.approx(expected, abs=1e-5)
            losses.append(expected)
    assert losses[0] != pytest.approx(losses[1]), "the two variants must differ"


def test_a_budget_with_room_for_nothing_is_refused(tiny_models, tmp_path):
    with pytest.raises(LayerPruneError, match="max_memory"):
        load_model(tiny_models["llama"], device_map="auto", max_memory={"cpu": "1KB"},
                   offload_folder=str(tmp_path / "offload"))


def _cache_snapshot(cache: Path, repo: str, commit: str, source: str) -> None:
    """Lay `source`'s files out as the hub cache holds commit `commit` of `repo`."""
    import shutil

    entry = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, entry / "snapshots" / commit)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(commit)


PINNING_SCRIPT = textwrap.dedent('''
    import json, sys
    import huggingface_hub
    from layerprune.models.loading import fingerprint, load_model
    from tasks.models import describe_model, pinned
    from layerprune.config import ModelSpec

    # The one thing mocked: the hub's answer to "which commit is main now?".
    class Info:
        sha = sys.argv[1]
    huggingface_hub.HfApi.model_info = lambda self, repo_id, revision=None, **kw: Info()

    spec = ModelSpec(ref="org/tiny")
    info = describe_model.fn(spec)
    loaded = load_model("org/tiny", **pinned(spec, info).load_options())
    print(json.dumps({"revision": info["revision"], "fingerprint": info["fingerprint"],
                      "loaded_fingerprint": loaded.fingerprint,
                      "architecture": type(loaded.model).__name__}))
''')


def test_hub_models_are_pinned_to_the_commit_main_resolves_to(tiny_models, tmp_path):
    """A hub id is fingerprinted with the commit its revision resolves to, and that commit is
    what loads: after an upstream push, the same id is a new model (no stale cache hit) and the
    new weights load. Runs offline on a hub cache laid out on disk; only the revision lookup is
    mocked."""
    cache = tmp_path / "hub"
    old, new = "a" * 40, "b" * 40
    _cache_snapshot(cache, "org/tiny", old, tiny_models["llama"])  # 4 layers
    _cache_snapshot(cache, "org/tiny", new, tiny_models["qwen2"])  # the upstream push
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}

    def run(commit: str) -> dict:
        out = subprocess.run([sys.executable, "-c", PINNING_SCRIPT, commit], env=env,
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    before, after = run(old), run(new)
    assert before["revision"] == old and after["revision"] == new
    assert before["fingerprint"] == before["loaded_fingerprint"]
    assert before["fingerprint"] != after["fingerprint"]
    assert before["fingerprint"].startswith("hub-")
    assert (before["architecture"], after["architecture"]) == ("LlamaForCausalLM",
                                                               "Qwen2ForCausalLM")


TEACHER_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import huggingface_hub
    from layerprune import api

    main_file, out = Path(sys.argv[1]), Path(sys.argv[2])

    # The one thing mocked: the hub's answer to "which commit is main now?", read from a file
    # so that main can move while this process runs.
    class Info:
        @property
        def sha(self):
            return main_file.read_text().strip()
    huggingface_hub.HfApi.model_info = lambda self, repo_id, revision=None, **kw: Info()

    api.prune("org/tiny", 1, str(out / "pruned"), strategy="heuristic")
    main_file.write_text(sys.argv[3])  # upstream pushes a different model to main
    record = api.heal(str(out / "pruned"), sys.argv[4], str(out / "healed"), method="linear",
                      linear_samples=4, seq_len=16)
    print(json.dumps({"prune": json.loads(
        (out / "pruned" / "prune.json").read_text()), "heal": record}))
''')


def test_a_hub_teacher_is_loaded_at_the_commit_its_student_was_pruned_from(tiny_models,
                                                                          texts_jsonl, tmp_path):
    """A hub model is pinned once (config, tokenizer and weights of one commit), prune.json
    records that commit, so healing loads the teacher (the source) at it even after
    main moved on. Catches a teacher loaded at whatever main is at healing time (then the patch
    would be fitted to another model's activations)."""
    cache = tmp_path / "hub"
    old, new = "c" * 40, "d" * 40
    _cache_snapshot(cache, "org/tiny", old, tiny_models["llama"])
    _cache_snapshot(cache, "org/tiny", new, tiny_models["qwen2"])
    main_file = tmp_path / "main"
    main_file.write_text(old)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "LAYERPRUNE_CACHE": str(tmp_path / "lp-cache")}
    out = subprocess.run([sys.executable, "-c", TEACHER_SCRIPT, str(main_file), str(tmp_path),
                          new, texts_jsonl], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prune"]["source"] == "org/tiny"
    assert result["prune"]["source_revision"] == old
    assert result["heal"]["teacher"] == "org/tiny" and result["heal"]["teacher_revision"] == old
