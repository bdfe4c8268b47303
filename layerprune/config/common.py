"""The shared types of the run configuration and the model it runs on (`ModelSpec`).

Bounds live in the types, so they are in the parameters' JSON schema: the Prefect UI and server
refuse a bad value at submission, not on a worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from layerprune.errors import LayerPruneError
from layerprune.heal.config import METHODS
from layerprune.method.prune import STRATEGIES
from layerprune.models.placement import DEVICE_PATTERN, check_placement

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
# A size as `layerprune.models.placement.parse_size` reads it (700MB, 40GB, 1.5GiB, bytes); that it is
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
    answers is `layerprune.store.remote.check_reachable`'s job, at the start of the flow."""
    from layerprune.store.files import check_output_dir
    from layerprune.store.remote import is_remote

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
        """Keyword arguments of `layerprune.models.loading.load_model` (every field but ref)."""
        return self.model_dump(exclude={"ref"})


class TextSpec(_Spec):
    data: str = Field(min_length=1, pattern=r"\S", description=".txt/.jsonl/.parquet file, "
                      "saved dataset directory, bundled:<name>, or hub dataset")
    samples: int = Field(ge=1, le=1_000_000, description="number of records used")
    seq_len: int = Field(ge=2, le=131_072, description="tokens kept per record (longer records "
                         "are cut; at most the model's context)")
    text_field: str = Field("text", min_length=1, description="the field (.jsonl) or column "
                            "(.parquet, dataset) holding the text")
