"""Benchmarks: lm-eval offline on local data; every score checked against one computed here by
hand (log-likelihoods of each answer from a plain forward pass, argmax, mean), never a range."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from layerprune.errors import LayerPruneError
from layerprune.evaluate import benchmarks, lm_eval_tasks, run
from layerprune.models import assets

RECORDS = ["The quick brown fox jumps over the lazy dog.",
           "Paris is the capital and most populous city of France.",
           "Numbers: 1, 2, 3, 5, 8, 13, 21, 34."]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random 2-layer Llama with SmolLM2's real tokenizer (so prompts tokenize as for real)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def boolq_rows(n: int):
    from datasets import load_from_disk

    rows = load_from_disk(str(assets.resolve("bundled:hf_datasets") / "boolq/none/validation"))
    return rows.select(range(n))


def boolq_answers(n: int) -> list[bool]:
    return boolq_rows(n)["answer"]


def logliks(model, tokenizer, context: str, answers: list[str]) -> list[float]:
    """log p(answer | context) for one-token answers, from one forward pass of the context: the
    tokens of context+answer are the context's plus one, scored at the context's last position."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ends = []
    for answer in answers:
        whole = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
        assert whole[:-1] == ctx, f"{answer!r} is not one token after the context"
        ends.append(whole[-1])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].float(), -1)
    return [logp[t].item() for t in ends]


def boolq_margins(model, tokenizer, n: int) -> list[float]:
    """log p(" yes") - log p(" no") after the stock BoolQ prompt, for the first n items."""
    margins = []
    for row in boolq_rows(n):
        context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        yes, no = logliks(model, tokenizer, context, [" yes", " no"])
        margins.append(yes - no)
    return margins


def accuracy_by_hand(correct: list[bool]) -> tuple[float, float]:
    """(mean, standard error of the mean with the n-1 sample variance, as lm-eval reports)."""
    n, p = len(correct), sum(correct) / len(correct)
    return p, math.sqrt(sum((c - p) ** 2 for c in correct) / (n - 1) / n)


def boolq_by_hand(margins: list[float], yes_bias: float = 0.0) -> tuple[float, float]:
    """Accuracy and its stderr on the first len(margins) items, answering " yes" where the
    margin (plus a bias on the " yes" logit) is positive."""
    answers = boolq_answers(len(margins))
    return accuracy_by_hand([(m + yes_bias > 0) == a for m, a in zip(margins, answers)])


def yes_bias_between(margins: list[float]) -> float:
    """A bias for the " yes" logit that makes half of these items answer " yes": a bias on one
    logit shifts that answer's log-prob margin by exactly itself."""
    middle = sorted(margins)[(len(margins) - 1) // 2:][:2]
    assert middle[0] < middle[1] - 1e-3, "a clear gap for the bias to sit in"
    return -sum(middle) / 2


@contextlib.contextmanager
def yes_biased(model, tokenizer, bias: float):
    """`model` with `bias` added to the " yes" logit at every position."""
    (yes,) = tokenizer(" yes")["input_ids"]  # lm-eval scores " yes" / " no" after "Answer:"
    logit_bias = torch.zeros(len(tokenizer))
    logit_bias[yes] = bias
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits + logit_bias.to(logits))
    try:
        yield model
    finally:
        hook.remove()


def test_boolq_equals_a_hand_computation(tiny, tokenizer, caplog):
    """The random model alone says " no" to every item, so a bias on the " yes" logit, set
    between the items' margins, makes it answer both ways; the accuracy lm-eval reports must
    then be the one computed here item by item (a swapped label, a wrong answer position or a
    wrong mean all differ)."""
    import lm_eval.api.task
    import tqdm

    margins = boolq_margins(tiny, tokenizer, 8)
    bias = yes_bias_between(margins)
    with yes_biased(tiny, tokenizer, bias), caplog.at_level("WARNING"):
        out = run.evaluate(tiny, tokenizer, ["boolq"], limit=8)["boolq"]
    # lm-eval's by-design warnings are dropped, and its progress bars are restored afterwards
    assert not [r for r in caplog.records if "num_fewshot" in r.getMessage()
                or "already-initialized" in r.getMessage()]
    assert lm_eval.api.task.tqdm is tqdm.tqdm
    assert out["n"] == 8 and out["metric"] == "acc" and out["shots"] == 0
    value, stderr = boolq_by_hand(margins, yes_bias=bias)
    assert 0 < value < 1
    assert out["value"] == pytest.approx(value) and out["stderr"] == pytest.approx(stderr)
    answers = boolq_answers(8)
    assert out["baseline"] == max(sum(answers), 8 - sum(answers)) / 8


def test_a_model_that_always_says_yes_scores_the_share_of_true(tiny, tokenizer):
    (yes,) = tokenizer(" yes")["input_ids"]  # lm-eval scores " yes" / " no" after "Answer:"
    bias = torch.zeros(len(tokenizer))
    bias[yes] = 100.0  # p(" yes") ~ 1 at every position, whatever the prompt
    hook = tiny.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    try:
        out = run.evaluate(tiny, tokenizer, ["boolq"], limit=12, batch_size=4)["boolq"]
    finally:
        hook.remove()
    answers = boolq_answers(12)
    # both answers occur, and not equally often: a swapped label would score 1 - share
    assert 0 < sum(answers) < 12 and 2 * sum(answers) != 12
    assert out["n"] == 12
    assert out["value"] == pytest.approx(sum(answers) / 12)


def test_loss_task_matches_a_hand_computation(tiny, tokenizer, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in RECORDS))
    out = run.evaluate(tiny, tokenizer, ["loss"], loss_data=str(data), batch_size=2)
    out = out["loss"]
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for text in RECORDS:
            ids = tokenizer(text)["input_ids"]
            logits = tiny(torch.tensor([ids])).logits[0, :-1]
            nats += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            tokens += len(ids) - 1
            n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))  # ASCII: exact
    assert out["n"] == 3 and out["tokens"] == tokens and out["bytes"] == n_bytes
    assert out["value"] == pytest.approx(nats / tokens, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert out["baseline"] == pytest.approx(math.log(len(tokenizer)))


class Untouchable:
    """Stands for a model and tokenizer: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"model work started: .{name}")

    def __call__(self, *args, **kwargs):
        raise AssertionError("model work started")


@pytest.mark.parametrize("kwargs, words", [
    (dict(tasks=["boolq", "nope"]), ["nope", "mmlu", "boolq", "loss"]),
    (dict(tasks=[]), ["tasks"]),
    (dict(tasks=["boolq"], limit=0), ["limit", "positive"]),
    (dict(tasks=["boolq"], shots=-1), ["shots"]),
    (dict(tasks=["loss"], loss_data="/no/such/records.jsonl"), ["does not exist"]),
    (dict(tasks=["loss"], loss_samples=0), ["loss_samples"]),
])
def test_bad_input_fails_before_model_work(kwargs, words):
    with pytest.raises(LayerPruneError) as err:
        run.evaluate(Untouchable(), Untouchable(), **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_checks_alone():
    assert benchmarks.check_tasks(["boolq", "mmlu", "boolq"]) == ["boolq", "mmlu"]
    benchmarks.check_limit(None)
    benchmarks.check_limit(3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LayerPruneError, match="limit"):
            benchmarks.check_limit(bad)


def test_offline_prompts_are_the_stock_ones():
    """Rendered by lm-eval from our YAMLs, compared with the stock templates written out."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(lm_eval_tasks.prepare(["boolq", "mmlu"])),
                          include_defaults=False)
    tasks = manager.load(["lp_boolq", "lp_mmlu_anatomy"])["tasks"]
    boolq = tasks["lp_boolq"]
    doc = boolq.validation_docs()[0]
    expected = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.fewshot_context(doc, 0) == expected
    assert boolq.doc_to_choice(doc) == ["no", "yes"]
    assert boolq.doc_to_target(doc) == int(doc["answer"])

    def mmlu(d: dict) -> str:
        a, b, c, e = d["choices"]
        return f"{d['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {e}\nAnswer:"

    anatomy = tasks["lp_mmlu_anatomy"]
    doc = anatomy.test_docs()[0]
    shots = [mmlu(d) + " " + "ABCD"[d["answer"]] for d in anatomy.dataset["dev"]]
    assert len(shots) == 5  # stock 5-shot uses the first five `dev` questions, in order
    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                + "\n\n".join(shots) + "\n\n" + mmlu(doc))
    assert anatomy.fewshot_context(doc, 5) == expected


def test_write_metrics(tmp_path):
    metrics = {"boolq": {"value": 0.5, "stderr": 0.1, "n": 8, "metric": "acc"}}
    path = benchmarks.write_metrics(metrics, tmp_path / "run")
    assert path == tmp_path / "run" / "metrics.json"
    assert json.loads(path.read_text()) == metrics
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


MMLU_BY_HAND = 6  # subjects whose one question is scored here by hand (of 57)


@pytest.mark.real
def test_real_smollm2_mmlu_and_boolq(real_assets):
    from layerprune.models.loading import load_model

    loaded = load_model("bundled:SmolLM2-135M-Instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    # Zero-shot MMLU keeps this test short (5-shot prompts are ~6x longer; the 5-shot prompt
    # itself is checked above); limit applies per MMLU subject: 57 subjects x 1 question.
    out = run.evaluate(model, tokenizer, ["mmlu", "boolq"], limit=1, shots=0)
    subjects = lm_eval_tasks.mmlu_subjects()
    assert out["mmlu"]["n"] == len(subjects) == 57
    assert out["mmlu"]["baseline"] == pytest.approx(0.25)
    assert sorted(out["mmlu"]["subtasks"]) == sorted(subjects)
    # one question per subject: the group accuracy is the plain mean over subjects
    assert out["mmlu"]["value"] == pytest.approx(
        sum(out["mmlu"]["subtasks"].values()) / 57)

    from datasets import load_from_disk

    mmlu = assets.resolve("bundled:hf_datasets") / lm_eval_tasks.MMLU_DATA
    by_hand = {}
    for subject in sorted(subjects)[:MMLU_BY_HAND]:
        doc = load_from_disk(str(mmlu / subject / "test"))[0]
        a, b, c, d = doc["choices"]
        context = (f"The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n{doc['question'].strip()}\nA. {a}\nB. {b}"
                   f"\nC. {c}\nD. {d}\nAnswer:")
        scores = logliks(model, tokenizer, context, [f" {x}" for x in "ABCD"])
        by_hand[subject] = float(scores.index(max(scores)) == doc["answer"])
    assert {s: out["mmlu"]["subtasks"][s] for s in by_hand} == by_hand
    assert 0 < sum(by_hand.values()) < MMLU_BY_HAND, "both outcomes, so the check can fail"

    boolq = run.evaluate(model, tokenizer, ["boolq"], limit=8)["boolq"]
    margins = boolq_margins(model, tokenizer, 8)
    assert min(margins) < 0 < max(margins), "the real model answers both ways"
    value, stderr = boolq_by_hand(margins)
    assert boolq["n"] == 8 and out["boolq"]["n"] == 1
    assert boolq["value"] == pytest.approx(value) and boolq["stderr"] == pytest.approx(stderr)
