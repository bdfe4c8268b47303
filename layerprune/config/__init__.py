"""Typed, validated run configuration: the user-facing schema of the pipeline.

These Pydantic models are the parameters of the Prefect flows (the UI renders them as a form and
refuses bad values before a worker starts) and can be written as YAML/JSON by hand. Checks that
need the filesystem or the model's depth run at the start of a run, before any heavy work.

- `common`: shared types, the artifact root, `ModelSpec` (which model, held how);
- `stages`: one model per stage's settings (`CalibrationSpec`, `PruneSpec`, `HealSpec`, ...);
- `runs`: `PruneAndHealParams` and `SweepParams`, the flows' parameters.
Every name is importable from `layerprune.config` itself.

May import: heal (HealConfig), evaluate (benchmark names), method, models, store, errors.
"""

from layerprune.config.common import (
                                      DEMO_HEAL_LR,
                                      DEMO_HEAL_STEPS,
                                      BlockSize,
                                      DeviceMap,
                                      DType,
                                      Fraction,
                                      GpuCount,
                                      HealMethod,
                                      ItemLimit,
                                      ModelRef,
                                      ModelSpec,
                                      PlacedDevice,
                                      Quantization,
                                      Size,
                                      Strategy,
                                      TextSpec,
                                      check_artifacts_root,
                                      default_artifacts_root,
)
from layerprune.config.runs import PruneAndHealParams, StageName, SweepParams
from layerprune.config.stages import (
                                      BenchmarkSpec,
                                      BenchmarkTask,
                                      CalibrationSpec,
                                      ExtractionSpec,
                                      HealSpec,
                                      LossSpec,
                                      PruneSpec,
                                      SpeedSpec,
)

__all__ = [
    "Strategy", "HealMethod", "DEMO_HEAL_STEPS", "DEMO_HEAL_LR", "DType", "Quantization",
    "DeviceMap", "BlockSize", "Fraction", "ItemLimit", "GpuCount", "ModelRef", "Size",
    "PlacedDevice", "default_artifacts_root", "check_artifacts_root", "ModelSpec", "TextSpec",
    "CalibrationSpec", "LossSpec", "PruneSpec", "BenchmarkTask", "BenchmarkSpec", "HealSpec",
    "ExtractionSpec", "SpeedSpec", "StageName", "PruneAndHealParams", "SweepParams"
]
