"""Prefect task: heal a pruned variant with QLoRA (layerprune.heal).

The pruned checkpoint is cut from the source's safetensors files on disk, or written from the
model in memory when the source has none (`prune.write_pruned`), or taken from the prune stage
when it was exported; then it is healed and published: `adapter/`, `merged/` (a full
checkpoint), `heal.json`, the loss curve. The working directory is stable per key, so a retried
or rerun task resumes from the Trainer's last checkpoint instead of starting over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerprune import heal
from layerprune.config import HealSpec, ModelSpec
from layerprune.data import fingerprint as data_fingerprint
from layerprune.prune import write_pruned
from tasks.common import (model_in_memory, model_lock, numerics_key, progress_reporter,
                          release_model, run_stage, stage_files, stage_task)

STAGE, VERSION = "heal", 1


def key_params(model_info: dict, model: ModelSpec, recipe: dict, spec: HealSpec) -> dict:
    return {"model": model_info["fingerprint"], **numerics_key(model),
            "removed_layers": recipe["meta"]["removed_layers"],
            "data": data_fingerprint(spec.data),
            # Where the model sits (device_map) does not change what it learns.
            "config": spec.config.model_dump(exclude={"device_map"})}


@stage_task(STAGE, VERSION, key_params, task_run_name="heal-{recipe[meta][strategy]}-n{recipe[meta][n]}",
            retries=2)
def heal_variant(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
                 spec: HealSpec) -> dict:
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
                           progress=progress_reporter("healing"),
                           checkpoint_dir=str(out.parent / "checkpoints"))
        if pruned != exported:
            shutil.rmtree(pruned, ignore_errors=True)
        return {k: record[k] for k in ("final_train_loss", "initial_train_loss", "steps",
                                       "tokens_seen", "train_seconds", "resumed_from_step")}

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, model, recipe, spec),
                     build, resumable=True)
