"""Typed, validated run configuration: the user-facing schema of the pipeline.

These Pydantic models are the parameters of the Prefect flows (the UI renders them as a form and
refuses bad values before a worker starts) and can be written as YAML/JSON by hand. Checks that
need the filesystem or the model's depth run at the start of a run, before any heavy work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Strategy = Literal["similarity", "heuristic"]
DType = Literal["float32", "bfloat16", "float16"]


def default_artifacts_root() -> str:
    return os.environ.get("LAYERPRUNE_ARTIFACTS",
                          str(Path.home() / ".cache" / "layerprune" / "artifacts"))


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    ref: str = Field("bundled:SmolLM2-135M-Instruct", min_length=1,
                     description="Hub id (HuggingFaceTB/SmolLM2-135M), local HF directory, "
                                 ".gguf file, or bundled:SmolLM2-135M-Instruct")
    dtype: DType = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    trust_remote_code: bool = False


class TextSpec(_Spec):
    data: str = Field(min_length=1, description=".txt/.jsonl/.parquet file, saved dataset "
                                                "directory, bundled:<name>, or hub dataset")
    samples: int = Field(ge=1, le=1_000_000, description="number of records used")
    seq_len: int = Field(ge=2, le=131_072, description="tokens kept per record")
    text_field: str = "text"


class CalibrationSpec(TextSpec):
    data: str = "bundled:wiki-calibration"
    samples: int = Field(128, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=2, le=131_072)
    seed: int | None = Field(None, description="None: the first `samples` records")


class LossSpec(TextSpec):
    data: str = "bundled:wiki-heldout"
    samples: int = Field(32, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=2, le=131_072)


class PruneSpec(_Spec):
    block_sizes: list[int] = Field(default_factory=lambda: [2, 4, 6, 8, 10], min_length=1,
                                   description="numbers of layers to drop, each >= 1")
    strategies: list[Strategy] = Field(default_factory=lambda: ["similarity", "heuristic"],
                                       min_length=1)
    export_checkpoints: bool = Field(False, description="write a full checkpoint per variant "
                                     "(otherwise only the recipe: source + removed layers)")

    @field_validator("block_sizes")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"every block size must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("strategies")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class PruneAndHealParams(_Spec):
    """Everything one `prune-and-heal` run needs; the defaults are the demo."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    batch_size: int = Field(8, ge=1, le=4096, description="samples per forward pass")
    artifacts: str = Field(default_factory=default_artifacts_root,
                           description="artifact store root: a local directory or s3://bucket/prefix")
