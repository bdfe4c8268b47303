"""What one run is given: `PruneAndHealParams` (one model) and `SweepParams` (many models), the
parameters of the flows, which the Prefect UI renders as their form.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from layerprune.config.common import (
    BlockSize,
    DType,
    Fraction,
    GpuCount,
    ModelRef,
    ModelSpec,
    Quantization,
    Strategy,
    _Spec,
    check_artifacts_root,
    default_artifacts_root,
)
from layerprune.config.stages import (
    BenchmarkSpec,
    CalibrationSpec,
    ExtractionSpec,
    HealSpec,
    LossSpec,
    PruneSpec,
    SpeedSpec,
)
from layerprune.models.placement import DEVICE_PATTERN

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
                                 description="seconds each per-model run may run (from its start: "
                                             "time queued does not count)")
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
