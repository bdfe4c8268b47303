"""Which benchmarks there are and what a request may ask of them, checked before any work.

The paper (Gromov et al. 2024) plots MMLU (5-shot), BoolQ (0-shot) and next-token loss against
the fraction of layers dropped; ARC, HellaSwag, PIQA and WinoGrande are there for a wider look.
Depth pruning hurts generation and knowledge recall more than multiple-choice scores show, so
the generative tasks TriviaQA and NQ-Open (offline) and GSM8K (online only) are there too.
`layerprune.evaluate.run.evaluate` scores a model on them; its module says how.

- `limit=N` scores the first N items of each lm-eval task, the same items every run. For MMLU the
  limit applies per subject, as lm-eval applies it to every task of a group: limit=1 scores 57
  questions. `items_for_stderr` turns a target standard error into an item limit.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.store.files import write_json_atomic

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
        offline = not env_flag(ONLINE_ENV)
    from layerprune.evaluate.lm_eval_tasks import OFFLINE_TASKS

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
        from layerprune.method.data import check_source

        check_source(loss_data or DEFAULT_LOSS_DATA)
        if isinstance(loss_seq_len, bool) or not isinstance(loss_seq_len, int) or loss_seq_len < 2:
            raise LayerPruneError(f"loss_seq_len must be an integer >= 2, got {loss_seq_len!r}")
        check_limit(loss_samples, "loss_samples")
    return tasks


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def write_metrics(metrics: dict, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/metrics.json` atomically; returns its path."""
    path = Path(out_dir) / METRICS_FILE
    write_json_atomic(path, metrics)
    return path
