"""The settings of each stage (calibration, loss, prune, benchmarks, heal, extraction, speed):
the parts of a run's parameters, one model each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from layerprune.config.common import (
    DEMO_HEAL_LR,
    DEMO_HEAL_STEPS,
    BlockSize,
    HealMethod,
    ItemLimit,
    ModelRef,
    Size,
    Strategy,
    TextSpec,
    _Spec,
)
from layerprune.errors import LayerPruneError
from layerprune.heal.config import HealConfig
from layerprune.method.prune import STRATEGIES


class CalibrationSpec(TextSpec):
    # Each redefined field restates its bounds: a subclass's field replaces the parent's whole.
    data: str = Field("bundled:wiki-calibration", min_length=1, pattern=r"\S")
    samples: int = Field(128, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=2, le=131_072)
    seed: int | None = Field(None, ge=0, description="None: the first `samples` records")


class LossSpec(TextSpec):
    data: str = Field("bundled:wiki-heldout", min_length=1, pattern=r"\S")
    samples: int = Field(32, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=2, le=131_072)


class PruneSpec(_Spec):
    block_sizes: list[BlockSize] = Field(default_factory=lambda: [2, 4, 6, 8, 10], min_length=1,
                                         description="numbers of layers to drop, each >= 1")
    strategies: list[Strategy] = Field(
        default_factory=lambda: ["similarity", "heuristic"], min_length=1,
        description="how the layers to drop are chosen: similarity (the paper's angular "
        "distance), heuristic (the last n but the final layer), block-influence (ShortGPT: the "
        "n layers that change their input least, contiguous or not), greedy-loss (one layer at "
        "a time, the one whose removal raises calibration loss least; ~L*n forward passes), "
        "random (`random_blocks` seeded contiguous blocks, reported as mean ± sd)")
    random_blocks: int = Field(3, ge=2, le=100, description="seeded blocks per n for the "
                               "random baseline (2 or more, for a standard deviation)")
    # Greedy-loss costs sum_{k<n}(L-k) loss passes (255 for L=30, n=10): a subset keeps that in
    # minutes on a CPU; block-influence needs one pass and uses every calibration sample.
    greedy_samples: int = Field(16, ge=1, le=1_000_000, description="calibration records "
                                "scored by greedy-loss at each step (the first ones)")
    export_checkpoints: bool = Field(False, description="write a full checkpoint per variant "
                                     "(otherwise only the recipe: source + removed layers)")

    @field_validator("block_sizes")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @field_validator("strategies")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


# lm-eval tasks (layerprune.evaluate.benchmarks.TASKS but "loss", which is always measured); an enum on
# the dict's keys, so the schema (propertyNames) refuses an unknown task at submission.
BenchmarkTask = Literal["mmlu", "boolq", "arc_easy", "arc_challenge", "hellaswag", "piqa",
                        "winogrande", "trivia_qa", "nq_open", "gsm8k"]


class BenchmarkSpec(_Spec):
    """lm-evaluation-harness tasks, run on the base model and on pruned (and healed) variants."""

    tasks: dict[BenchmarkTask, ItemLimit | None] = Field(
        default_factory=lambda: {"mmlu": 1, "boolq": 40},
        description="task -> items scored (the first N; per subject for MMLU; null = all). "
                    "Tasks: mmlu, boolq, arc_easy, arc_challenge, hellaswag, piqa, winogrande, "
                    "trivia_qa, nq_open (generative, exact match), gsm8k (online only)")
    target_stderr: float | None = Field(
        None, gt=0, lt=0.5,
        description="sets the items of every task from this standard error (0.02 = ±2 points) "
                    "instead of the limits in `tasks`: 625 items at 0.02, 11 per MMLU subject "
                    "(layerprune.evaluate.benchmarks.items_for_stderr); null: the limits in `tasks`")
    shots: int | None = Field(None, ge=0, description="few-shot examples; null = each task's "
                              "default (MMLU 5 as in the paper, others 0)")
    block_sizes: list[BlockSize] | None = Field(
        default_factory=lambda: [6],
        description="benchmark only the variants with these n (null = every variant); "
                    "MMLU 5-shot costs ~35k tokens per model, loss is always measured")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        from layerprune.evaluate.benchmarks import TASKS, check_limit

        valid = [t for t in TASKS if t != "loss"]
        unknown = [t for t in v if t not in valid]
        if unknown:
            raise ValueError(f"unknown benchmark tasks {unknown}; valid: {valid}")
        for limit in v.values():
            check_limit(limit)
        return v

    def limits(self) -> dict[str, int | None]:
        """Each task's item limit: from `target_stderr` when set, else the values of `tasks`."""
        if self.target_stderr is None:
            return dict(self.tasks)
        from layerprune.evaluate.benchmarks import items_for_stderr

        return {task: items_for_stderr(task, self.target_stderr) for task in self.tasks}


class HealSpec(_Spec):
    """Healing of pruned variants (layerprune.heal), evaluated like the unhealed ones: every
    selected variant is healed by every method in `methods`, with the same config and data."""

    enabled: bool = Field(True, description="heal the variants selected below")
    block_sizes: list[BlockSize] = Field(default_factory=lambda: [6], description="heal variants "
                                   "with these n (each must be one of prune.block_sizes)")
    # The demo heals the paper's choice by two methods: each healed variant costs its own
    # benchmark passes (~1.5 min on a CPU), and the demo keeps to its time.
    strategies: list[Strategy] = Field(default_factory=lambda: ["similarity"],
                                       min_length=1, description="heal the variants of these "
                                       "strategies (not random: it is a baseline of k blocks)")
    methods: list[HealMethod] = Field(
        default_factory=lambda: ["linear", "lora"], min_length=1,
        description="lora: QLoRA on next-token loss (the paper); distill: the same adapters "
        "trained to match the teacher's next-token distribution; linear: a least-squares map "
        "at the cut folded into the weights, no training (seconds); linear+distill: both")
    teacher: ModelRef | None = Field(None, description="teacher of distill and source of the "
                                     "linear fit; null: the unpruned model of this run")
    data: str = Field("bundled:wiki-heal", min_length=1, pattern=r"\S",
                      description="healing text (C4 in the paper: allenai/c4:en:train)")
    config: HealConfig = Field(default_factory=lambda: HealConfig(
        steps=DEMO_HEAL_STEPS, seq_len=128, batch_size=4, lr=DEMO_HEAL_LR, save_every=5,
        gradient_checkpointing=False))
    # Inline by default: a run outside a deployment (demo, tests) has no pool to dispatch to,
    # and a pool needs a free GPU worker besides the parent's (docs/operations.md).
    dispatch: Literal["inline", "deployment"] = Field(
        "inline", description="inline: heal in this run's process, one variant after another; "
        "deployment: one heal-variant/default run per variant on the gpu pool, in parallel")

    @field_validator("strategies", "methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("strategies")
    @classmethod
    def _not_random(cls, v: list[str]) -> list[str]:
        if "random" in v:
            raise ValueError("random is a baseline of several blocks, not one variant to heal; "
                             f"heal one of {[s for s in STRATEGIES if s != 'random']}")
        return v


class ExtractionSpec(_Spec):
    """How the hidden-state stage holds the model (`layerprune.method.streaming`); the result is the
    same either way, so it is not part of any cache key."""

    mode: Literal["auto", "in-memory", "streamed"] = Field(
        "auto", description="streamed: one decoder layer in memory at a time; auto: streamed "
                            "when the model does not fit max_memory")
    max_memory: Size | None = Field(None, description="most weights + activations held at "
                                    "once, e.g. 700MB, 40GB (default: the memory available)")

    @field_validator("max_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        from layerprune.models.placement import parse_size

        if v is not None:
            try:
                parse_size(v, "max_memory")
            except LayerPruneError as e:
                raise ValueError(str(e)) from None
        return v


class SpeedSpec(_Spec):
    """The inference cost of every variant (`layerprune.evaluate.speed.measure`), on the run's device:
    the base model and the variant timed alternately, medians of `repeats` rounds."""

    # The defaults are sized for the demo on a CPU, where each timed call of a variant costs
    # about a second: SmolLM2 at these settings takes ~10 s per variant (1 thread). On a GPU,
    # raise batch and the token counts for figures that say something about serving.
    enabled: bool = Field(True, description="measure prefill/decode tokens per second, weight "
                          "bytes and peak memory of every variant against the base model")
    batch: int = Field(1, ge=1, le=4096, description="rows of the prefill pass and of the "
                       "batched decode (decode is also timed at batch 1)")
    prefill_tokens: int = Field(64, ge=1, le=131_072, description="tokens per row of the "
                                "timed prefill pass (at most the model's context)")
    decode_tokens: int = Field(16, ge=1, le=131_072, description="greedy tokens generated per "
                               "timed decode call, with the KV cache")
    repeats: int = Field(3, ge=1, le=100, description="timed rounds of base and variant, "
                         "alternately, after one warm-up round; each figure is their median")
