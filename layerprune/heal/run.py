"""Heal a pruned model: one interface, four methods, the same outputs.

- `lora`: QLoRA as in Gromov et al. 2024 (arXiv 2403.17887), Sec. 3: the pruned weights frozen
  in 4-bit NF4, LoRA adapters of small rank on the feed-forward (MLP) modules only, dropout
  0.05, lr 3e-4, next-token loss on generic text (the paper: C4; here `bundled:wiki-heal`).
- `distill`: the same adapters trained to match the unpruned teacher's next-token distribution
  (`layerprune.heal.distill`: KL at temperature T, optionally mixed with the LM loss).
- `linear`: no training; a least-squares linear map fitted at the cut and folded into the last
  kept layer's weights (`layerprune.heal.linear_patch`, ReplaceMe-style).
- `linear+distill`: the linear patch, then distillation into the patched weights.
The teacher (and for the linear patch, the removed layers) come from the pruned checkpoint's
`prune.json`; `teacher` overrides its source.

`heal(model_dir, data, out_dir, config, method=...)` validates everything first, then writes:
- `adapter/`: the LoRA adapter (peft, safetensors), for the training methods;
- `merged/`: a full checkpoint (the adapter merged into a full-precision reload of the pruned,
  or patched, weights; never into the 4-bit ones, whose rounding would be baked in), with
  tokenizer, `prune.json` and model card; a plain `AutoModelForCausalLM.from_pretrained` loads it;
- `loss_curve.json` (for `linear` an empty curve), and last, `heal.json`, the mark of a
  finished run. Its figure, `loss_curve.png`, is drawn by `report.figures.heal_curve`.
Training checkpoints live in `out_dir/checkpoints/` (heal_checkpoints.py: a killed run resumes
from the newest complete one and ends with the weights an uninterrupted run has), beside them
the teacher's top-k cache and the patched working checkpoint; all are deleted once the run has
finished (the Trainer's checkpoints hold pickles), so a finished `out_dir` holds no pickle.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from layerprune.errors import LayerPruneError
from layerprune.heal import linear_patch
from layerprune.heal.checkpoints import prepare_checkpoint_dir
from layerprune.heal.config import (
    TEACHER_USED,
    TRAINED,
    HealConfig,
    check_config,
    check_method,
    method_config,
)
from layerprune.heal.outputs import merge, save_adapter, write_card
from layerprune.heal.training import Blocks, load_for_training, run_trainer
from layerprune.heal.validation import validate
from layerprune.models.memory import PeakMemory, release_memory
from layerprune.store.files import read_json, write_json_atomic


def heal(model_dir: str, data: str, out_dir: str, config: HealConfig | dict | None = None,
         resume: bool = True, progress: Callable[[int, int], None] | None = None,
         checkpoint_dir: str | None = None, method: str = "lora",
         teacher: str | None = None) -> dict:
    """Heal the pruned checkpoint `model_dir` on text `data` into `out_dir` with `method` (one of
    METHODS); returns heal.json. `teacher`: the model matched (distill) or whose activations are
    fitted (linear); None: the `source` in model_dir's prune.json. lora ignores it.

    With `resume`, an interrupted run continues from its newest complete checkpoint in
    out_dir/checkpoints (incomplete ones, cut short by a kill, are deleted with a log line).
    `checkpoint_dir`: keep the checkpoints there instead, and leave them when done: the caller
    removes them once the outputs are safe (the flow: after publishing, so that a kill while
    uploading resumes from the last checkpoint rather than from step 0).
    """
    start = time.perf_counter()
    cfg, method = check_config(config), check_method(method)
    out = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    plan = validate(model_dir, data, out, cfg, method, teacher if method in TEACHER_USED
                    else None, resume, ckpt_dir, method_config(cfg, method))
    created = [p for p in (ckpt_dir, *ckpt_dir.parents) if not p.exists()]
    try:
        with PeakMemory() as peak:
            last = prepare_checkpoint_dir(ckpt_dir, plan.request, resume) \
                if method in TRAINED else None
            (out / "heal.json").unlink(missing_ok=True)  # no stale "finished" mark meanwhile
            record = {"method": method, "teacher": plan.teacher,
                      **({"teacher_revision": plan.teacher_revision}
                         if plan.teacher_revision else {}), "model_dir": plan.path,
                      "data": data, "config": cfg.model_dump(), "steps": 0, "tokens_seen": 0,
                      "fit_tokens": 0, "train_seconds": 0.0, "patch_seconds": 0.0,
                      "initial_train_loss": None, "final_train_loss": None,
                      "resumed_from_step": None}
            if method == "linear":
                curve = _linear(plan, data, out, cfg, progress, record)
            else:
                curve = _train(plan, data, out, cfg, method, ckpt_dir, last, progress, record)
    except LayerPruneError:
        _forget(created, ckpt_dir)
        raise
    if not checkpoint_dir:  # finished: the Trainer's pickles, the cache, the patch: not needed
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    record["peak_memory_mb"] = peak.mb
    record["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(out / "loss_curve.json", curve)
    write_json_atomic(out / "heal.json", record)  # last: marks the run finished
    return record


def _forget(created: list[Path], ckpt_dir: Path) -> None:
    """After a refusal that only a later check could make (the linear patch's own, e.g. an MLP it
    cannot fold into), remove what this call created, unless it holds something resumable."""
    if created and created[0] == ckpt_dir and not any(ckpt_dir.glob("checkpoint-*")):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for parent in created[1:]:  # deepest first; one that holds anything stays
            try:
                parent.rmdir()
            except OSError:
                break


def _patch(model_dir: str, data: str, merged_dir: Path, cfg: HealConfig, teacher: str,
           progress, record: dict, request) -> None:
    """The linear patch of model_dir into merged_dir; its figures go into `record`."""
    begin = time.perf_counter()
    result = linear_patch.patch_checkpoint(model_dir, data, str(merged_dir),
                                           samples=cfg.linear_samples, seq_len=cfg.seq_len,
                                           teacher=teacher, text_field=cfg.text_field,
                                           batch_size=cfg.batch_size, progress=progress,
                                           request=request)
    # the whole patch step (loading both models, the fit, the fold, the save); the fit alone
    # is linear_patch's own fit_seconds
    record["patch_seconds"] = time.perf_counter() - begin
    record["fit_tokens"] = result["tokens"]
    record["linear_patch"] = result


def _linear(plan, data: str, out: Path, cfg: HealConfig, progress, record: dict) -> list:
    """`linear`: the patched checkpoint is merged/ itself; no adapter, no curve."""
    _patch(plan.path, data, out / "merged", cfg, plan.teacher, progress, record, plan.patch)
    write_card(out / "merged", record)
    shutil.rmtree(out / "adapter", ignore_errors=True)  # from an earlier run of another method
    (out / "loss_curve.png").unlink(missing_ok=True)
    return []


def _train(plan, data: str, out: Path, cfg: HealConfig, method: str, ckpt_dir: Path,
           last: Path | None, progress, record: dict) -> list:
    """lora, distill, linear+distill: adapters trained, saved, merged into the student base."""
    student = plan.path
    if method == "linear+distill":
        # The patched checkpoint is the student. patch_checkpoint writes it atomically (its
        # record inside), so there means complete, and it is only there when ckpt_dir belongs
        # to this very request (prepare_checkpoint_dir).
        patched = ckpt_dir / "patched"
        if (patched / linear_patch.PATCH_FILE).is_file():  # reused: no patch time in this call
            result = read_json(patched / linear_patch.PATCH_FILE)
            record.update(fit_tokens=result["tokens"], linear_patch=result)
        else:
            _patch(plan.path, data, patched, cfg, plan.teacher, progress, record, plan.patch)
        student = str(patched)
    if method == "lora":
        model = load_for_training(student, cfg)
        curve, seconds = run_trainer(model, cfg, ckpt_dir, Blocks(plan.blocks), last, progress)
    else:
        from layerprune.heal.distill import train_distilled

        model, curve, seconds, choice = train_distilled(student, plan.teacher, plan.blocks, cfg,
                                                        ckpt_dir, last, progress,
                                                        plan.teacher_revision)
        record.update(choice)
    save_adapter(model, out / "adapter")
    del model
    release_memory()  # before merge() loads the full-precision base
    tail = curve[-max(1, len(curve) // 10):]  # mean over the last ~10% of steps: less noisy
    record.update({
        "final_train_loss": sum(p["loss"] for p in tail) / len(tail) if tail else None,
        "initial_train_loss": curve[0]["loss"] if curve else None,
        "steps": cfg.steps, "tokens_seen": cfg.steps * cfg.tokens_per_step,
        "train_seconds": seconds,
        "resumed_from_step": int(last.name.split("-")[-1]) if last else None,
        "packed_sequences": len(plan.blocks),
        "epochs": cfg.steps * cfg.batch_size * cfg.grad_accum / len(plan.blocks),
        "target_modules": plan.targets, "lora_alpha": cfg.lora_alpha})
    merge(student, out / "adapter", out / "merged", plan.tokenizer, record, plan.path)
    return curve

