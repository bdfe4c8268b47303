"""SharedPrefixHFLM: the same scores as lm-eval's HFLM for far fewer tokens and logits."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from layerprune.evaluate.scoring import MIN_SHARED_PREFIX, SharedPrefixHFLM, group_rows

# Five "examples" shared by every question, as in a few-shot prompt: ~120 tokens, longer than
# MIN_SHARED_PREFIX and than the tiny models' 4-token sliding windows.
SHOTS = "".join(f"Question: what is {a} plus {b}?\nAnswer: {a + b}\n\n"
                for a, b in [(1, 2), (3, 4), (10, 7), (2, 2), (40, 2)])
QUESTIONS = ["What is 5 plus 6?", "What is 12 plus 30?", "Is the sky green?"]


def requests() -> list[tuple[str, str]]:
    """(context, continuation) pairs covering every path of the scorer."""
    out = []
    for q in QUESTIONS:  # one-token answers sharing a context, behind a shared prefix
        out += [(f"{SHOTS}Question: {q}\nAnswer:", f" {x}") for x in ("A", "B", "C", "D")]
    out += [(f"{SHOTS}Question: {QUESTIONS[0]}\nAnswer:", " eleven, as five plus six is eleven"),
            # the same model input as the one above, scoring its last token only
            (f"{SHOTS}Question: {QUESTIONS[0]}\nAnswer: eleven, as five plus six is", " eleven")]
    out += [("The capital of France is", " Paris"), ("The capital of France is", " Lyon city"),
            ("Water boils at", " 100 degrees"), ("", "An empty context scores from BOS."),
            (SHOTS * 3, " and the prompt is longer than max_length")]  # left-truncated
    return out


def scores(lm, pairs) -> list[tuple[float, bool]]:
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i)
                             for i, pair in enumerate(pairs)], disable_tqdm=True)


def counting(model):
    """Counts of input tokens fed to `model` and of positions its lm_head projects."""
    counts = {"tokens": 0, "logit_rows": 0}

    def count_tokens(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        counts["tokens"] += ids.numel()

    def count_rows(module, args, out):
        counts["logit_rows"] += out.shape[:-1].numel()

    hooks = [model.register_forward_pre_hook(count_tokens, with_kwargs=True),
             model.get_output_embeddings().register_forward_hook(count_rows)]
    return counts, hooks


def assert_same_scores_for_less_work(model, tokenizer):
    pairs = requests()
    results, counts = {}, {}
    # The reference scores every request on its own (logits_cache=False): lm-eval 0.4.13's
    # shared-logits path reads the wrong positions when requests with the same model input score
    # continuations of different lengths (the " eleven" request above). The work is counted
    # against HFLM as users run it, with that sharing on.
    for name, cls, kwargs in [("reference", HFLM, {"logits_cache": False}),
                              ("stock", HFLM, {}), ("ours", SharedPrefixHFLM, {})]:
        lm = cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=4,
                 max_length=256, **kwargs)
        counts[name], hooks = counting(model)
        results[name] = scores(lm, pairs)
        for h in hooks:
            h.remove()
    for (expected, expected_greedy), (ours, greedy) in zip(results["reference"], results["ours"]):
        assert ours == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert greedy == expected_greedy
    # HFLM feeds each distinct model input whole and projects every position of it.
    assert counts["ours"]["tokens"] < 0.5 * counts["stock"]["tokens"]
    assert counts["ours"]["logit_rows"] < 0.1 * counts["stock"]["logit_rows"]


def test_scores_equal_stock_hflm_for_fewer_tokens_and_logits(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    assert_same_scores_for_less_work(AutoModelForCausalLM.from_pretrained(tiny_model).eval(),
                                     tokenizer)


@pytest.mark.real
def test_real_smollm2_scores_equal_stock_hflm(real_assets):
    from layerprune.models.loading import load_model

    loaded = load_model("bundled:SmolLM2-135M-Instruct")
    assert_same_scores_for_less_work(loaded.model, loaded.tokenizer)


def test_group_rows_shares_long_prefixes_and_never_a_scored_position():
    shared = tuple(range(100, 100 + MIN_SHARED_PREFIX + 8))
    seqs = [shared + (1, 2, 3), shared + (1, 2, 4, 5), shared + (9,),  # one group
            shared[:MIN_SHARED_PREFIX - 1] + (7, 7),                   # shares too little
            (5, 6, 7)]
    need = [1, 3, 2, 1, 2]
    groups = group_rows(seqs, need)
    assert groups == [(len(shared) - 1, [0, 1, 2]), (0, [4, 3])]
    for prefix_len, members in groups:
        assert all(prefix_len <= len(seqs[r]) - need[r] for r in members)
        assert len({seqs[r][:prefix_len] for r in members}) == 1
