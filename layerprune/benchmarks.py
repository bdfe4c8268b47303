"""Benchmarks of a model already in memory: lm-evaluation-harness tasks and next-token loss.

The paper (Gromov et al. 2024) plots MMLU (5-shot), BoolQ (0-shot) and next-token loss against
the fraction of layers dropped; ARC, HellaSwag, PIQA and WinoGrande are there for a wider look.
Depth pruning hurts generation and knowledge recall more than multiple-choice scores show, so
the generative tasks TriviaQA and NQ-Open (offline) and GSM8K (online only) are there too.

- Multiple-choice tasks run through EleutherAI's lm-evaluation-harness with its stock prompts and
  metrics. Offline (the default) they read local copies of the data (`layerprune.lm_eval_tasks`);
  online (`offline=False`, or env `LAYERPRUNE_EVAL_ONLINE=1`) the stock tasks download their own.
- Generative tasks (trivia_qa, nq_open, gsm8k) are lm-eval's stock `generate_until` tasks: greedy
  generation until the stock stop strings (or lm-eval's max_gen_toks, 256 tokens), scored by the
  stock filters and `exact_match`. GSM8K ships no offline data: asking for it offline fails
  before any model work. On a CPU they generate one item at a time (see `_run_harness`).
- `limit=N` scores the first N items of each lm-eval task, the same items every run. For MMLU the
  limit applies per subject, as lm-eval applies it to every task of a group: limit=1 scores 57
  questions. MMLU's value is lm-eval's group accuracy, weighted by each subject's item count.
- lm-eval scores through `layerprune.scoring.SharedPrefixHFLM`: HFLM that encodes each shared
  few-shot prefix once and computes logits only where an answer is scored (the same scores up
  to float rounding). Env LAYERPRUNE_EVAL_STOCK_HFLM=1 scores with lm-eval's own HFLM instead,
  to cross-check a result.
- "loss" is `layerprune.loss.next_token_loss` on `loss_data` (default `bundled:wiki-heldout`).

Every result is `{"value", "stderr", "n", "metric", "baseline", ...}` where `baseline` is what a
model with no knowledge scores: the mean of 1/(number of choices) over the scored items for
multiple choice; for BoolQ the majority-class rate of the scored items (always answering the
commoner answer); 0 for exact match (a model that knows nothing matches no answer); for loss
ln(vocabulary size), the loss of a uniform prediction. `stderr` is lm-eval's standard error of
the item mean (for loss: over records, `layerprune.loss.ratio_stderr`); `items_for_stderr`
turns a target standard error into an item limit. Generative results add `examples`: the first
EXAMPLES items' question, scored answer, target(s) and exact match.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.io import write_json_atomic

ONLINE_ENV = "LAYERPRUNE_EVAL_ONLINE"
STOCK_HFLM_ENV = "LAYERPRUNE_EVAL_STOCK_HFLM"
DEFAULT_LOSS_DATA = "bundled:wiki-heldout"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TaskInfo:
    shots: int      # default number of few-shot examples
    metric: str     # the headline metric ("value"); acc_norm is reported too where lm-eval has it
    stock: str      # lm-eval's stock task (or group) name, used online
    filter: str = "none"  # the stock filter whose output the headline metric scores


# acc_norm (log-likelihood per byte of the answer) heads the tasks whose answers are free text of
# different lengths, where plain acc favours short answers; acc heads those with one-word or
# one-letter answers (MMLU, BoolQ) and WinoGrande, whose choices share one continuation.
TASKS: dict[str, TaskInfo] = {
    "mmlu": TaskInfo(5, "acc", "mmlu"),     # 5-shot as in the paper; examples from `dev`
    "boolq": TaskInfo(0, "acc", "boolq"),
    "arc_easy": TaskInfo(0, "acc_norm", "arc_easy"),
    "arc_challenge": TaskInfo(0, "acc_norm", "arc_challenge"),
    "hellaswag": TaskInfo(0, "acc_norm", "hellaswag"),
    "piqa": TaskInfo(0, "acc_norm", "piqa"),
    "winogrande": TaskInfo(0, "acc", "winogrande"),
    # Generative, 0-shot as stock; the stock filter strips the whitespace around the answer
    # and keeps the first generation. GSM8K: 5-shot as stock, scored on the strict
    # "#### <number>" answer (its second filter, flexible-extract, takes any last number).
    "trivia_qa": TaskInfo(0, "exact_match", "triviaqa", "remove_whitespace"),
    "nq_open": TaskInfo(0, "exact_match", "nq_open", "remove_whitespace"),
    "gsm8k": TaskInfo(5, "exact_match", "gsm8k", "strict-match"),
    "loss": TaskInfo(0, "loss", ""),
}
# MMLU's subjects: a limit applies to each (lm-eval limits every task of a group).
MMLU_SUBJECTS = 57
# Generative results carry the first few items' answers (the filtered generation that was
# scored), enough to see what a pruned model says without bloating metrics.json.
EXAMPLES = 5


def generative(task: str) -> bool:
    """Whether `task` generates free text (scored by exact match) rather than scoring choices."""
    return TASKS[task].metric == "exact_match"


def check_tasks(tasks: list[str]) -> list[str]:
    """The task names without duplicates, in order; unknown names raise LayerPruneError."""
    if isinstance(tasks, str) or not tasks:
        raise LayerPruneError(f"tasks must be a non-empty list of names from {list(TASKS)}, "
                              f"got {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LayerPruneError(f"tasks: unknown {unknown}; valid tasks are {list(TASKS)}")
    return list(dict.fromkeys(tasks))


def check_limit(limit: int | None, name: str = "limit") -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise LayerPruneError(f"{name} must be a positive integer (items per task) or None "
                              f"(all items), got {limit!r}")


def check_target_stderr(target_stderr: float) -> None:
    # 0.5 is the largest stderr a 0/1 score can have, with a single item: no target above it.
    if (isinstance(target_stderr, bool) or not isinstance(target_stderr, (int, float))
            or not 0 < target_stderr < 0.5):
        raise LayerPruneError(f"target_stderr must be a number in (0, 0.5), e.g. 0.02 for "
                              f"±2 points; got {target_stderr!r}")


def items_for_stderr(task: str, target_stderr: float) -> int:
    """The lm-eval `limit` that keeps `task`'s standard error at most `target_stderr`.

    A score that is a mean of 0/1 items (accuracy, exact match) has stderr sqrt(p(1-p)/n), at
    most 0.5/sqrt(n) (p = 0.5), so n = ceil(0.25 / target^2) items guarantee the target whatever
    the model scores: 0.02 (±2 points) -> 625 items. For MMLU the limit applies per subject:
    ceil(n / 57) each. lm-eval's stderr uses the n-1 sample variance, larger by at most
    sqrt(n/(n-1)) (0.08% at n = 625). A task with fewer items than this scores them all
    (MMLU's smallest subject has 100 test questions: the per-subject limit holds up to 5,700).
    """
    check_target_stderr(target_stderr)
    if task not in TASKS or task == "loss":
        raise LayerPruneError(f"target_stderr sets items of the benchmark tasks "
                              f"{[t for t in TASKS if t != 'loss']}, not {task!r} (the loss "
                              "task reads its records from loss_samples)")
    items = math.ceil(0.25 / target_stderr**2)
    return math.ceil(items / MMLU_SUBJECTS) if task == "mmlu" else items


def check_args(tasks: list[str], limit: int | dict[str, int | None] | None = None,
               shots: int | None = None, batch_size: int = 8, loss_data: str | None = None,
               loss_seq_len: int = 256, loss_samples: int | None = None,
               offline: bool | None = None) -> list[str]:
    """Every check `evaluate` makes, cheap and before any model work. Returns the task list."""
    tasks = check_tasks(tasks)
    harness = [t for t in tasks if t != "loss"]
    if harness and importlib.util.find_spec("lm_eval") is None:
        raise LayerPruneError(f"tasks: {harness} need lm-evaluation-harness, which is not "
                              "installed: pip install 'prune-and-heal[eval]' (or ask for 'loss' "
                              "only)")
    if offline is None:
        offline = not _env_flag(ONLINE_ENV)
    from layerprune.lm_eval_tasks import OFFLINE_TASKS

    online_only = [t for t in harness if t not in OFFLINE_TASKS]
    if offline and online_only:
        raise LayerPruneError(f"tasks: {online_only} have no offline copy (no bundled data); "
                              f"set {ONLINE_ENV}=1 to run lm-eval's stock task, which downloads "
                              "its data from the Hugging Face hub")
    if isinstance(limit, dict):
        unknown = [t for t in limit if t not in tasks]
        if unknown:
            raise LayerPruneError(f"limit: per-task limits for {unknown}, which are not among "
                                  f"the tasks {tasks}")
        for task, task_limit in limit.items():
            check_limit(task_limit, f"limit of {task}")
    else:
        check_limit(limit)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise LayerPruneError(f"shots must be an integer >= 0 or None (each task's default: "
                              f"{ {t: i.shots for t, i in TASKS.items() if t != 'loss'} }), "
                              f"got {shots!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise LayerPruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if "loss" in tasks:
        from layerprune.data import check_source

        check_source(loss_data or DEFAULT_LOSS_DATA)
        if isinstance(loss_seq_len, bool) or not isinstance(loss_seq_len, int) or loss_seq_len < 2:
            raise LayerPruneError(f"loss_seq_len must be an integer >= 2, got {loss_seq_len!r}")
        check_limit(loss_samples, "loss_samples")
    return tasks


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
        offline = not _env_flag(ONLINE_ENV)
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
            from layerprune.loss import loss_metrics

            results["loss"] = loss_metrics(model, tokenizer, loss_data or DEFAULT_LOSS_DATA,
                                           loss_seq_len, loss_samples or limits.get("loss"),
                                           batch_size, loss_text_field)
    finally:
        model.train(was_training)
    return {t: results[t] for t in tasks}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def write_metrics(metrics: dict, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/metrics.json` atomically; returns its path."""
    path = Path(out_dir) / METRICS_FILE
    write_json_atomic(path, metrics)
    return path


# ----------------------------------------------------------------------------- lm-eval tasks

def _run_harness(model, tokenizer, tasks: list[str], limits: dict[str, int | None],
                 shots: int | None, batch_size: int, offline: bool) -> dict[str, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerprune.placement import input_device
    from layerprune.scoring import SharedPrefixHFLM

    if offline:
        from layerprune import lm_eval_tasks

        include = lm_eval_tasks.prepare(tasks)
        # Only our copies are indexed: skipping the ~thousands of stock YAMLs saves seconds.
        manager = TaskManager(include_path=str(include), include_defaults=False)
        names = {t: lm_eval_tasks.offline_name(t) for t in tasks}
    else:
        manager = TaskManager()
        names = {t: TASKS[t].stock for t in tasks}
    # HFLM sets a pad token on tokenizers that lack one: give it a copy, not the caller's.
    lm_class = HFLM if _env_flag(STOCK_HFLM_ENV) else SharedPrefixHFLM
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
