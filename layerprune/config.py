"""Typed, validated run configuration: the user-facing schema of the pipeline.

These Pydantic models are the parameters of the Prefect flows (the UI renders them as a form and
refuses bad values before a worker starts) and can be written as YAML/JSON by hand. Checks that
need the filesystem or the model's depth run at the start of a run, before any heavy work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from layerprune.errors import LayerPruneError
from layerprune.heal import METHODS, HealConfig
from layerprune.placement import DEVICE_PATTERN, check_placement
from layerprune.prune import STRATEGIES

# The library's tuples are the one list of names; Literal[tuple] is Literal[each name].
Strategy = Literal[STRATEGIES]
HealMethod = Literal[METHODS]
# The demo's healing on a 2-core CPU: 10 steps of 4 x 128 tokens at lr 2e-3 closed ~80% of the
# loss gap of SmolLM2 without layers 23..28 in about a minute (lr 3e-4, the paper's, closed 7%
# in 10 steps); the paper trains for thousands of steps on a GPU. Gradient checkpointing off:
# memory is not the limit on a CPU and it made steps 1.8x slower.
DEMO_HEAL_STEPS = 10
DEMO_HEAL_LR = 2e-3
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "nf4", "int8"]
DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
# Bounds on list items and dict values live in the types, so they are in the parameters' JSON
# schema: the Prefect UI and server (enforce_parameter_schema) refuse a bad value at submission,
# not on a worker. Bounds that need the model's depth are checked at the start of a run.
BlockSize = Annotated[int, Field(ge=1, le=4096, description="layers dropped")]
Fraction = Annotated[float, Field(gt=0, lt=1)]
ItemLimit = Annotated[int, Field(ge=1, description="items scored")]
GpuCount = Annotated[int, Field(ge=1, le=64)]
ModelRef = Annotated[str, Field(min_length=1, pattern=r"\S")]
# A size as `layerprune.placement.parse_size` reads it (700MB, 40GB, 1.5GiB, bytes); that it is
# above zero is left to the validator (a pattern for it would be unreadable).
Size = Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*([KkMmGgTt][Ii]?[Bb]|[Bb])?\s*$",
                            description="e.g. 700MB, 40GB, 1.5GiB")]
# Where accelerate may put a module: a GPU index, cpu, disk, or a named device.
PlacedDevice = Annotated[int, Field(ge=0)] | Annotated[
    str, Field(pattern=r"^(cpu|disk|mps|(cuda|xpu|npu|mlu|hpu)(:\d+)?|\d+)$")]


def default_artifacts_root() -> str:
    return os.environ.get("LAYERPRUNE_ARTIFACTS",
                          str(Path.home() / ".cache" / "layerprune" / "artifacts"))


def check_artifacts_root(root: str) -> str:
    """A local artifact root must be able to become a directory: it, or the nearest of its
    parents that exists, is not a file. Checked when the parameters are validated (a run's
    first step, before any model loads); a JSON schema cannot say it, and whether an S3 bucket
    answers is `layerprune.remote.check_reachable`'s job, at the start of the flow."""
    from layerprune.io import check_output_dir
    from layerprune.remote import is_remote

    if not is_remote(root):
        source = " (from env LAYERPRUNE_ARTIFACTS)" \
            if root == os.environ.get("LAYERPRUNE_ARTIFACTS") else ""
        try:
            check_output_dir(Path(root.removeprefix("file://")).expanduser(), "artifacts")
        except LayerPruneError as e:
            raise ValueError(f"{e}{source}") from None
    return root


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    ref: str = Field("bundled:SmolLM2-135M-Instruct", min_length=1, pattern=r"\S",
                     description="Hub id (HuggingFaceTB/SmolLM2-135M), local HF directory, "
                                 ".gguf file, or bundled:SmolLM2-135M-Instruct")
    dtype: DType = Field("auto", description="auto: bfloat16 on a GPU that has it, "
                         "float32 on CPU; the compute dtype of a quantized model")
    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description="auto: the first GPU if any, else cpu")
    quantization: Quantization = Field("none", description="bitsandbytes on load: nf4 (4-bit, "
                                       "as QLoRA) or int8; none keeps `dtype`")
    device_map: DeviceMap | dict[str, PlacedDevice] | None = Field(
        None, description="spread the model over devices (accelerate): auto, balanced, "
        "sequential, or {module: device}; null: the whole model on `device`")
    max_memory: dict[str, Size] | None = Field(
        None, description='per device, with device_map: {"0": "70GiB", "cpu": "100GiB"}')
    offload_folder: str | None = Field(None, min_length=1, description="with device_map: "
                                       "where layers that fit no device are offloaded to disk")
    revision: str | None = Field(None, pattern=r"^\S+$", description="hub models: branch, tag "
                                 "or commit; the run pins the commit it resolves to")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _placement(self) -> ModelSpec:
        try:
            check_placement(self.dtype, self.device, self.quantization, self.device_map,
                            self.max_memory, self.offload_folder)
        except LayerPruneError as e:
            raise ValueError(str(e)) from None
        return self

    def load_options(self) -> dict:
        """Keyword arguments of `layerprune.models.load_model` (every field but ref)."""
        return self.model_dump(exclude={"ref"})


class TextSpec(_Spec):
    data: str = Field(min_length=1, pattern=r"\S", description=".txt/.jsonl/.parquet file, "
                      "saved dataset directory, bundled:<name>, or hub dataset")
    samples: int = Field(ge=1, le=1_000_000, description="number of records used")
    seq_len: int = Field(ge=2, le=131_072, description="tokens kept per record (longer records "
                         "are cut; at most the model's context)")
    text_field: str = Field("text", min_length=1, description="the field (.jsonl) or column "
                            "(.parquet, dataset) holding the text")


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


# lm-eval tasks (layerprune.benchmarks.TASKS but "loss", which is always measured); an enum on
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
                    "(layerprune.benchmarks.items_for_stderr); null: the limits in `tasks`")
    shots: int | None = Field(None, ge=0, description="few-shot examples; null = each task's "
                              "default (MMLU 5 as in the paper, others 0)")
    block_sizes: list[BlockSize] | None = Field(
        default_factory=lambda: [6],
        description="benchmark only the variants with these n (null = every variant); "
                    "MMLU 5-shot costs ~35k tokens per model, loss is always measured")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        from layerprune.benchmarks import TASKS, check_limit

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
        from layerprune.benchmarks import items_for_stderr

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
    """How the hidden-state stage holds the model (`layerprune.streaming`); the result is the
    same either way, so it is not part of any cache key."""

    mode: Literal["auto", "in-memory", "streamed"] = Field(
        "auto", description="streamed: one decoder layer in memory at a time; auto: streamed "
                            "when the model does not fit max_memory")
    max_memory: Size | None = Field(None, description="most weights + activations held at "
                                    "once, e.g. 700MB, 40GB (default: the memory available)")

    @field_validator("max_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        from layerprune.placement import parse_size

        if v is not None:
            try:
                parse_size(v, "max_memory")
            except LayerPruneError as e:
                raise ValueError(str(e)) from None
        return v


class SpeedSpec(_Spec):
    """The inference cost of every variant (`layerprune.speed.measure`), on the run's device:
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


# The stages of tasks/ (their STAGE names), for `refresh`.
StageName = Literal["calibration", "hidden_states", "distances", "prune", "eval", "heal",
                    "speed", "report"]


class PruneAndHealParams(_Spec):
    """Everything one `prune-and-heal` run needs; the defaults are the demo."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    benchmarks: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    heal: HealSpec = Field(default_factory=HealSpec)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    batch_size: int = Field(8, ge=1, le=4096, description="samples per forward pass")
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec)
    artifacts: str = Field(default_factory=default_artifacts_root, min_length=1, pattern=r"\S",
                           validate_default=True, description="artifact store root: a local "
                           "directory or s3://bucket/prefix (default: env LAYERPRUNE_ARTIFACTS)")
    refresh: list[StageName] = Field(default_factory=list,
                                     description="stages to compute again even when the store "
                                                 "has them (their stored results are replaced)")
    verify_artifacts: bool = Field(False, description="checksum every file of a reused artifact "
                                   "(by default: sizes, and checksums of files up to 1 MiB)")

    @field_validator("artifacts")
    @classmethod
    def _artifacts_root(cls, v: str) -> str:
        return check_artifacts_root(v)

    @model_validator(mode="after")
    def _healed_sizes_are_pruned(self) -> PruneAndHealParams:
        missing = set(self.heal.block_sizes) - set(self.prune.block_sizes) if self.heal.enabled \
            else set()
        if missing:
            raise ValueError(f"heal.block_sizes {sorted(missing)} are not in prune.block_sizes "
                             f"{self.prune.block_sizes}")
        return self


class SweepParams(_Spec):
    """A comparison across models: one `prune-and-heal` run per model, fanned out to the GPU pool
    through `deployment`, gathered into one table. The remaining fields are the template every
    per-model run shares."""

    models: list[ModelRef] = Field(default_factory=lambda: ["bundled:SmolLM2-135M-Instruct"],
                              min_length=1,
                              description="model refs, one run each (see ModelSpec.ref)")
    fractions: list[Fraction] | None = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4], min_length=1,
        description="fractions of layers to drop, each in (0, 1); each model gets "
                    "n = round(fraction x its depth), at least 1 and leaving one layer")
    block_sizes: list[BlockSize] | None = Field(None, min_length=1,
                                                description="numbers of layers to drop, used "
                                          "as is for every model instead of fractions")
    strategies: list[Strategy] = Field(default_factory=lambda: ["similarity", "heuristic"],
                                       min_length=1)
    dtype: DType = "auto"
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    quantization: Quantization = "none"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    # Across models the benchmark curves are the point, so every variant is benchmarked by
    # default; healing (minutes per variant) is opt-in. Their block_sizes select among each
    # model's own block sizes: a size a model does not have is skipped for that model.
    benchmarks: BenchmarkSpec = Field(default_factory=lambda: BenchmarkSpec(block_sizes=None))
    heal: HealSpec = Field(default_factory=lambda: HealSpec(enabled=False))
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    batch_size: int = Field(8, ge=1, le=4096, description="samples per forward pass")
    deployment: str = Field("prune-and-heal/default", pattern=r"^[^/\s]+/[^/\s]+$",
                            description="FLOW/DEPLOYMENT that runs one model")
    # 6 h: a 70B model on one GPU (distances + 10 variants) fits; a hung child cannot hold a
    # `gpu` concurrency slot forever.
    child_timeout_s: int = Field(6 * 3600, ge=60, le=7 * 24 * 3600,
                                 description="seconds to wait for each per-model run")
    gpu_count: int = Field(1, ge=1, le=64, description="GPUs each per-model run gets (job "
                           "variable gpu_count; that many slots of the `gpu` limit)")
    gpu_counts: dict[str, GpuCount] = Field(default_factory=dict, description="per-model "
                                       "overrides of gpu_count: {model ref: GPUs}")
    artifacts: str = Field(default_factory=default_artifacts_root, min_length=1, pattern=r"\S",
                           validate_default=True, description="artifact store root shared by "
                           "every run: a local directory or s3://bucket/prefix (default: env "
                           "LAYERPRUNE_ARTIFACTS)")

    @field_validator("artifacts")
    @classmethod
    def _artifacts_root(cls, v: str) -> str:
        return check_artifacts_root(v)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _every_variant_unless_told(cls, v):
        # A sweep's `benchmarks` given without block_sizes still benchmarks every variant, as
        # the sweep's default does; BenchmarkSpec's own default (n = 6 only) is for one model.
        if isinstance(v, dict) and "block_sizes" not in v:
            return {**v, "block_sizes": None}
        return v

    @model_validator(mode="after")
    def _gpu_counts_name_models(self) -> SweepParams:
        unknown = sorted(set(self.gpu_counts) - set(self.models))
        if unknown:
            raise ValueError(f"gpu_counts names {unknown}, which are not in models")
        return self

    def gpus_for(self, ref: str) -> int:
        """GPUs of the per-model run of `ref`: its override, else gpu_count."""
        return self.gpu_counts.get(ref, self.gpu_count)

    @model_validator(mode="after")
    def _one_of_fractions_or_sizes(self) -> SweepParams:
        if self.block_sizes is not None and "fractions" in self.model_fields_set \
                and self.fractions is not None:
            raise ValueError("give either fractions or block_sizes, not both")
        if self.block_sizes is None and self.fractions is None:
            raise ValueError("give fractions or block_sizes")
        return self

    def block_sizes_for(self, num_layers: int) -> list[int]:
        """The block sizes for a model of `num_layers` layers (at least one layer remains)."""
        if self.block_sizes is not None:
            return sorted(set(self.block_sizes))
        sizes = {min(max(1, round(f * num_layers)), num_layers - 1) for f in self.fractions}
        return sorted(n for n in sizes if n >= 1)

    def child(self, ref: str, block_sizes: list[int]) -> PruneAndHealParams:
        """The parameters of the per-model run of `ref`."""
        bench, heal = self.benchmarks, self.heal
        if bench.block_sizes is not None:
            bench = bench.model_copy(update={
                "block_sizes": [n for n in bench.block_sizes if n in block_sizes]})
        healed = [n for n in heal.block_sizes if n in block_sizes]
        heal = heal.model_copy(update={"block_sizes": healed,
                                       "enabled": heal.enabled and bool(healed)})
        return PruneAndHealParams(
            model=ModelSpec(ref=ref, dtype=self.dtype, device=self.device,
                            quantization=self.quantization),
            calibration=self.calibration, loss=self.loss,
            prune=PruneSpec(block_sizes=block_sizes, strategies=self.strategies),
            benchmarks=bench, heal=heal, speed=self.speed, batch_size=self.batch_size,
            artifacts=self.artifacts)
