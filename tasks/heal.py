"""Prefect task: heal a pruned variant by one method (layerprune.heal).

The pruned checkpoint is cut from the source's safetensors files on disk, or written from the
model in memory when the source has none (`prune.write_pruned`), or taken from the prune stage
when it was exported; then it is healed (lora, distill, linear or linear+distill) and
published: `adapter/` (training methods), `merged/` (a full checkpoint), `heal.json`, the loss
curve. The working directory is stable per key, so a retried or rerun task resumes from the
Trainer's last checkpoint instead of starting over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerprune.config import HealSpec, ModelSpec
from layerprune.heal import config
from layerprune.heal import run as heal
from layerprune.method.data import source_fingerprint as data_fingerprint
from layerprune.method.surgery import write_pruned
from layerprune.models.loading import fingerprint as model_fingerprint
from layerprune.report.figures import heal_curve
from tasks.common import (
    model_in_memory,
    model_lock,
    numerics_key,
    progress_reporter,
    release_model,
    run_stage,
    stage_files,
    stage_task,
)

STAGE, VERSION = "heal", 2
# What the report shows of each heal, from heal.json (small: the manifest carries it).
RECORD_FIELDS = ("method", "final_train_loss", "initial_train_loss", "steps", "tokens_seen",
                 "fit_tokens", "wall_seconds", "train_seconds", "patch_seconds",
                 "peak_memory_mb", "teacher_logits", "resumed_from_step")


def key_params(model_info: dict, model: ModelSpec, recipe: dict, spec: HealSpec,
               method: str) -> dict:
    return {"model": model_info["fingerprint"], **numerics_key(model),
            "removed_layers": recipe["meta"]["removed_layers"],
            "data": data_fingerprint(spec.data), "method": method,
            # None: the source model itself, already keyed by `model`
            "teacher": model_fingerprint(spec.teacher) if spec.teacher else None,
            # Only what changes this method's result (lora ignores the temperature, linear the
            # learning rate, ...); where the model sits (device_map) changes nothing.
            "config": config.method_config(spec.config, method)}


def run_name() -> str:
    """e.g. heal-similarity-n6-lora (shown in the Prefect UI)."""
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"heal-{p['recipe']['meta']['strategy']}-n{p['recipe']['meta']['n']}-{p['method']}"


@stage_task(STAGE, VERSION, key_params, task_run_name=run_name, retries=2)
def heal_variant(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
                 spec: HealSpec, method: str = "lora") -> dict:
    drop = recipe["meta"]["removed_layers"]

    def build(out: Path):
        pruned = out.parent / f"{out.name}.pruned"
        exported = stage_files(store_root, recipe) / "checkpoint"
        if exported.exists():
            pruned = exported
        elif not (pruned / "config.json").exists():
            write_pruned(model.ref, drop, pruned, {"strategy": recipe["meta"]["strategy"]},
                         dtype=model.dtype, load=lambda: model_in_memory(model), lock=model_lock())
        release_model()  # the source model would sit beside the one being trained
        # Checkpoints beside `out`, in the leased attempt directory: kept until the stage is
        # published (a kill mid-upload resumes from them), removed with the directory after.
        record = heal.heal(str(pruned), spec.data, str(out), spec.config, resume=True,
                           progress=progress_reporter(f"healing ({method})"),
                           checkpoint_dir=str(out.parent / "checkpoints"), method=method,
                           teacher=spec.teacher)  # None: prune.json's source, `model`
        heal_curve(out)
        if pruned != exported:
            shutil.rmtree(pruned, ignore_errors=True)
        return {k: record.get(k) for k in RECORD_FIELDS}

    return run_stage(store_root, STAGE, VERSION,
                     key_params(model_info, model, recipe, spec, method), build, resumable=True)
