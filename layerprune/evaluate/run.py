"""Score a model already in memory: lm-evaluation-harness tasks and next-token loss.

The paper (Gromov et al. 2024) plots MMLU (5-shot), BoolQ (0-shot) and next-token loss against
the fraction of layers dropped; ARC, HellaSwag, PIQA and WinoGrande are there for a wider look.
Depth pruning hurts generation and knowledge recall more than multiple-choice scores show, so
the generative tasks TriviaQA and NQ-Open (offline) and GSM8K (online only) are there too.

- Multiple-choice tasks run through EleutherAI's lm-evaluation-harness with its stock prompts and
  metrics. Offline (the default) they read local copies of the data (`layerprune.evaluate.lm_eval_tasks`);
  online (`offline=False`, or env `LAYERPRUNE_EVAL_ONLINE=1`) the stock tasks download their own.
- Generative tasks (trivia_qa, nq_open, gsm8k) are lm-eval's stock `generate_until` tasks: greedy
  generation until the stock stop strings (or lm-eval's max_gen_toks, 256 tokens), scored by the
  stock filters and `exact_match`. GSM8K ships no offline data: asking for it offline fails
  before any model work. On a CPU they generate one item at a time (see `_run_harness`).
- `limit=N` scores the first N items of each lm-eval task, the same items every run. For MMLU the
  limit applies per subject, as lm-eval applies it to every task of a group: limit=1 scores 57
  questions. MMLU's value is lm-eval's group accuracy, weighted by each subject's item count.
- lm-eval scores through `layerprune.evaluate.scoring.SharedPrefixHFLM`: HFLM that encodes each shared
  few-shot prefix once and computes logits only where an answer is scored (the same scores up
  to float rounding). Env LAYERPRUNE_EVAL_STOCK_HFLM=1 scores with lm-eval's own HFLM instead,
  to cross-check a result.
- "loss" is `layerprune.method.loss.next_token_loss` on `loss_data` (default `bundled:wiki-heldout`).

Every result is `{"value", "stderr", "n", "metric", "baseline", ...}` where `baseline` is what a
model with no knowledge scores: the mean of 1/(number of choices) over the scored items for
multiple choice; for BoolQ the majority-class rate of the scored items (always answering the
commoner answer); 0 for exact match (a model that knows nothing matches no answer); for loss
ln(vocabulary size), the loss of a uniform prediction. `stderr` is lm-eval's standard error of
the item mean (for loss: over records, `layerprune.method.loss.ratio_stderr`); `items_for_stderr`
turns a target standard error into an item limit. Generative results add `examples`: the first
EXAMPLES items' question, scored answer, target(s) and exact match.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections import Counter, defaultdict

from layerprune.evaluate.benchmarks import (
    DEFAULT_LOSS_DATA,
    EXAMPLES,
    ONLINE_ENV,
    STOCK_HFLM_ENV,
    TASKS,
    check_args,
    env_flag,
    generative,
)


def evaluate(model, tokenizer, tasks: list[str], limit: int | dict[str, int | None] | None = None,
             shots: int | None = None, batch_size: int = 8, loss_data: str | None = None,
             loss_seq_len: int = 256, loss_samples: int | None = None,
             offline: bool | None = None, loss_text_field: str = "text") -> dict:
    """Evaluate `model` on `tasks`; returns `{task: {"value", "stderr", "n", "metric", ...}}`.

    limit: items per task (per subject for MMLU), the first ones; None = all. A dict gives each
        task its own ({task: limit}, e.g. from `items_for_stderr`); tasks it omits score all.
    shots: few-shot examples for every harness task; None = each task's default (MMLU 5, else 0).
    loss_samples: records of `loss_data` for "loss" (the first ones); None = the loss task's
        limit, and all records when that is None too. Each record is truncated to its first
        `loss_seq_len` tokens.
    offline: None = offline unless env LAYERPRUNE_EVAL_ONLINE=1.
    """
    if offline is None:
        offline = not env_flag(ONLINE_ENV)
    tasks = check_args(tasks, limit, shots, batch_size, loss_data, loss_seq_len, loss_samples,
                       offline)
    limits = limit if isinstance(limit, dict) else {t: limit for t in tasks}
    results: dict[str, dict] = {}
    harness = [t for t in tasks if t != "loss"]
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode is restored below
    try:
        if harness:
            results.update(_run_harness(model, tokenizer, harness,
                                        {t: limits.get(t) for t in harness}, shots, batch_size,
                                        offline))
        if "loss" in tasks:
            from layerprune.method.loss import loss_metrics

            results["loss"] = loss_metrics(model, tokenizer, loss_data or DEFAULT_LOSS_DATA,
                                           loss_seq_len, loss_samples or limits.get("loss"),
                                           batch_size, loss_text_field)
    finally:
        model.train(was_training)
    return {t: results[t] for t in tasks}


# ----------------------------------------------------------------------------- lm-eval tasks

def _run_harness(model, tokenizer, tasks: list[str], limits: dict[str, int | None],
                 shots: int | None, batch_size: int, offline: bool) -> dict[str, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerprune.evaluate.scoring import SharedPrefixHFLM
    from layerprune.models.placement import input_device

    if offline:
        from layerprune.evaluate import lm_eval_tasks

        include = lm_eval_tasks.prepare(tasks)
        # Only our copies are indexed: skipping the ~thousands of stock YAMLs saves seconds.
        manager = TaskManager(include_path=str(include), include_defaults=False)
        names = {t: lm_eval_tasks.offline_name(t) for t in tasks}
    else:
        manager = TaskManager()
        names = {t: TASKS[t].stock for t in tasks}
    # HFLM sets a pad token on tokenizers that lack one: give it a copy, not the caller's.
    lm_class = HFLM if env_flag(STOCK_HFLM_ENV) else SharedPrefixHFLM
    # lm-eval decodes a batch until its longest answer stops (up to max_gen_toks = 256 tokens).
    # On a CPU that wait costs more than batching saves: 20 items of SmolLM2 (1 thread) took
    # 84 s (TriviaQA) and 58 s (NQ-Open) at batch 8, 8.5 s and 17 s at batch 1.
    cpu = input_device(model).type == "cpu"
    sizes = {t: 1 if cpu and generative(t) else batch_size for t in tasks}
    # simple_evaluate takes one num_fewshot and one limit for all its tasks: one call per
    # distinct (shots, limit, batch size).
    by_call: dict[tuple[int, int | None, int], list[str]] = defaultdict(list)
    for t in tasks:
        by_call[(TASKS[t].shots if shots is None else shots, limits[t], sizes[t])].append(t)
    out, lms = {}, {}
    with _quiet_harness():
        for (k, limit, size), group in by_call.items():
            if size not in lms:
                lms[size] = lm_class(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                                     batch_size=size)
            res = simple_evaluate(model=lms[size], tasks=[names[t] for t in group],
                                  num_fewshot=k, limit=limit, task_manager=manager,
                                  log_samples=True)
            for t in group:
                out[t] = _summarise(t, names[t], res, k)
    return out


# lm-eval warnings that our use triggers by design: a model object instead of a name, a
# num_fewshot for every task, task YAMLs that rely on default aggregations.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type", "Passed an already-initialized",
                      "Overwriting default num_fewshot", "but higher_is_better is not",
                      "but aggregation is not")


@contextlib.contextmanager
def _quiet_harness():
    """Drop lm-eval's expected warnings and its per-task context-building bars (one bar per
    MMLU subject: 57 lines per pass); other warnings and the scoring bar stay."""
    import lm_eval.api.task as lm_eval_task

    def unexpected(record: logging.LogRecord) -> bool:
        return not any(w in record.getMessage() for w in _EXPECTED_WARNINGS)

    loggers = [logging.getLogger(f"lm_eval.{n}") for n in ("models.huggingface", "evaluator",
                                                            "api.task")]
    real_tqdm = lm_eval_task.tqdm
    lm_eval_task.tqdm = functools.partial(real_tqdm, disable=True)
    for logger in loggers:
        logger.addFilter(unexpected)
    try:
        yield
    finally:
        lm_eval_task.tqdm = real_tqdm
        for logger in loggers:
            logger.removeFilter(unexpected)


def _summarise(task: str, name: str, res: dict, shots: int) -> dict:
    """One task's (or group's) entry from simple_evaluate's results."""
    row = res["results"][name]
    leaves = _leaf_tasks(res, name)
    info = TASKS[task]
    metric, key = info.metric, f"{info.metric},{info.filter}"
    if key not in row:  # a stock task whose filter or metric names changed: never a silent None
        raise RuntimeError(f"lm-eval reported no {key!r} for {name}; it reported {sorted(row)}")
    # One logged sample per item and filter (GSM8K has two filters): keep the headline's.
    samples = [s for leaf in leaves for s in res["samples"][leaf]
               if s.get("filter", "none") == info.filter]
    stderr = _num(row.get(f"{metric}_stderr,{info.filter}"))
    out = {"value": _num(row[key]),
           "stderr": _stderr(samples, metric) if stderr is None else stderr,
           "n": sum(int(res["n-samples"][leaf]["effective"]) for leaf in leaves),
           "metric": metric, "baseline": _baseline(task, samples), "shots": shots}
    for extra in ("acc", "acc_norm"):
        if extra != metric and f"{extra},none" in row:
            out[extra] = _num(row[f"{extra},none"])
            out[f"{extra}_stderr"] = _num(row.get(f"{extra}_stderr,none"))
    if generative(task):  # what the model said, for a person to read
        out["examples"] = [{"question": s["doc"].get("question"), "answer": s["filtered_resps"][0],
                            "target": s["target"], "exact_match": _num(s["exact_match"])}
                           for s in sorted(samples, key=lambda s: s["doc_id"])[:EXAMPLES]]
    if len(leaves) > 1:  # MMLU: per-subject accuracy, under stock names without our prefix
        out["subtasks"] = {leaf.split("mmlu_", 1)[-1]: _num(res["results"][leaf].get("acc,none"))
                           for leaf in leaves}
    return out


def _leaf_tasks(res: dict, name: str) -> list[str]:
    """The tasks (not groups) under `name`, itself included when it is a task."""
    if name in res["n-samples"]:
        return [name]
    children = res.get("group_subtasks", {}).get(name, [])
    return sorted(leaf for child in children for leaf in _leaf_tasks(res, child))


def _baseline(task: str, samples: list[dict]) -> float | None:
    if not samples:
        return None
    if generative(task):  # knowing nothing, no generated answer matches
        return 0.0
    if task == "boolq":  # always answering the commoner answer of the scored items
        return max(Counter(int(s["target"]) for s in samples).values()) / len(samples)
    # One loglikelihood request per choice: a blind guess is right 1/choices of the time.
    return sum(1 / len(s["arguments"]) for s in samples) / len(samples)


def _stderr(samples: list[dict], metric: str) -> float | None:
    """Standard error of the item mean, as lm-eval computes it for one task.

    lm-eval reports none for a group whose subtasks have a single item each (MMLU at limit=1);
    MMLU's size-weighted group mean is the mean over all its items, so this is its stderr too.
    """
    values = [float(s[metric]) for s in samples if metric in s]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values))


def _num(x) -> float | None:
    """lm-eval writes "N/A" where a stderr cannot be computed (e.g. one item)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
