"""Heal a pruned model: one interface, four methods, the same outputs.

- `lora`: QLoRA as in Gromov et al. 2024 (arXiv 2403.17887), Sec. 3: the pruned weights frozen
  in 4-bit NF4, LoRA adapters of small rank on the feed-forward (MLP) modules only, dropout
  0.05, lr 3e-4, next-token loss on generic text (the paper: C4; here `bundled:wiki-heal`).
- `distill`: the same adapters trained to match the unpruned teacher's next-token distribution
  (`layerprune.distill`: KL at temperature T, optionally mixed with the LM loss).
- `linear`: no training; a least-squares linear map fitted at the cut and folded into the last
  kept layer's weights (`layerprune.linear_patch`, ReplaceMe-style).
- `linear+distill`: the linear patch, then distillation into the patched weights.
The teacher (and for the linear patch, the removed layers) come from the pruned checkpoint's
`prune.json`; `teacher` overrides its source.

`heal(model_dir, data, out_dir, config, method=...)` validates everything first, then writes:
- `adapter/`: the LoRA adapter (peft, safetensors), for the training methods;
- `merged/`: a full checkpoint (the adapter merged into a full-precision reload of the pruned,
  or patched, weights; never into the 4-bit ones, whose rounding would be baked in), with
  tokenizer, `prune.json` and model card; a plain `AutoModelForCausalLM.from_pretrained` loads it;
- `loss_curve.json` (+ `loss_curve.png`; for `linear` an empty curve and no png), and last,
  `heal.json`, the mark of a finished run.
Training checkpoints live in `out_dir/checkpoints/` (heal_checkpoints.py: a killed run resumes
from the newest complete one and ends with the weights an uninterrupted run has), beside them
the teacher's top-k cache and the patched working checkpoint; all are deleted once the run has
finished (the Trainer's checkpoints hold pickles), so a finished `out_dir` holds no pickle.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerprune import linear_patch
from layerprune.errors import LayerPruneError
from layerprune.figures import train_loss_curves
from layerprune.heal_checkpoints import prepare_checkpoint_dir
from layerprune.heal_outputs import merge, save_adapter, write_card
from layerprune.heal_training import (Blocks, PeakMemory, load_for_training, release_memory,
                                      run_trainer)
from layerprune.heal_validation import METHODS, TEACHER_USED, TRAINED, validate
from layerprune.io import read_json, write_json_atomic


class HealConfig(BaseModel):
    """Healing hyperparameters. Defaults follow the paper where it says, else common QLoRA use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, le=1_000_000, description="optimizer steps")
    # The paper swept rank 2..64 and found low ranks regularise; 8 is in its good range.
    rank: int = Field(8, ge=1, le=64, description="LoRA rank r")
    # None means 2 * rank: LoRA scales its update by alpha / rank, so tying alpha to the rank keeps
    # that scale (2, the usual choice) and hence the useful learning rate the same for every rank;
    # a fixed alpha=16 would make rank 2 take 8x larger steps than rank 8 would.
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None = 2 * rank")
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate (paper: 3e-4)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of steps of linear warmup")
    scheduler: Literal["cosine", "linear"] = "cosine"
    batch_size: int = Field(8, ge=1, le=4096, description="packed sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=2, le=131_072, description="tokens per packed sequence (and "
                         "per calibration record of the linear patch)")
    targets: Literal["mlp", "attn", "all"] = Field("mlp", description="where LoRA goes "
                                                   "(paper: mlp)")
    quant: bool = Field(True, description="freeze the base in 4-bit NF4 (QLoRA); False: plain LoRA")
    # auto: bf16 on a GPU that has it, else fp32 (bf16 matmuls on CPU are slower, not faster).
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # Saves activation memory (what limits batch size on a GPU) for one extra forward pass;
    # measured 1.8x slower per step on CPU with SmolLM2, where memory is not the limit.
    gradient_checkpointing: bool = True
    # None: the whole model on one device (the first GPU, else the CPU). A 70B model in NF4 is
    # ~35 GB of weights and trains on one 80 GB GPU (the paper used one A100); "auto" spreads the
    # layers over every visible GPU instead (accelerate's device_map, layers run in turn), for
    # models whose 4-bit weights plus activations exceed one card. Placement only: not keyed.
    device_map: Literal["auto", "balanced", "sequential"] | None = Field(
        None, description="spread the model over the visible GPUs; None: one device")
    save_every: int | None = Field(50, ge=1, le=1_000_000,
                                   description="checkpoint every K steps; None: never")
    # transformers' set_seed seeds numpy too, which takes 0..2^32-1 only
    seed: int = Field(0, ge=0, le=2**32 - 1)
    text_field: str = Field("text", min_length=1)
    # Distillation (methods distill, linear+distill). Above ~100 every softmax is flat to
    # float32 precision, and the T^2 factor would scale the loss by 10^4: no use past that.
    temperature: float = Field(1.0, gt=0, le=100, description="distillation temperature T "
                               "(softmax of logits / T for teacher and student)")
    kl_weight: float = Field(1.0, ge=0, le=1, description="share of the KL term; the rest is "
                             "the next-token loss (1: pure logit distillation, as Minitron)")
    teacher_logits: Literal["auto", "online", "cached"] = Field(
        "auto", description="online: the teacher runs beside the student on each batch; "
        "cached: its top-k logits are computed once, written to disk and the teacher freed; "
        "auto: online when both fit the device")
    top_k: int = Field(64, ge=1, le=1_000_000, description="logits per position kept in the "
                       "teacher cache (the KL is then over those ids)")
    # ReplaceMe fitted on a few thousand tokens; 120 records x 128 tokens closed 40% of the gap
    # on SmolLM2 (NOTES). Records past the data's end are simply not there.
    linear_samples: int = Field(120, ge=1, le=1_000_000, description="records of the data "
                                "(first N, cut to seq_len tokens) the linear patch is fitted on")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def check_config(config: HealConfig | dict | None) -> HealConfig:
    """A validated HealConfig, or LayerPruneError naming each bad field and its allowed range."""
    raw = config.model_dump() if isinstance(config, HealConfig) else (config or {})
    try:
        return HealConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']} "
                             f"(got {err.get('input')!r})" for err in e.errors())
        raise LayerPruneError(f"heal config: {problems}") from None


def check_method(method: str) -> str:
    if method not in METHODS:
        raise LayerPruneError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


# How the work is placed or checkpointed, not what it computes.
_PLACEMENT = {"save_every", "gradient_checkpointing", "device_map"}
_DISTILL = {"temperature", "kl_weight", "teacher_logits", "top_k"}
_LINEAR = {"linear_samples", "seq_len", "text_field"}  # what the linear patch reads


def method_config(cfg: HealConfig | dict, method: str) -> dict:
    """The config fields that can change the result of `method` (for cache keys): lora ignores
    the distillation and linear fields, linear every training field, and top_k counts only
    where a cache may be used (teacher_logits not online). Placement (device_map) and
    checkpointing settings never count."""
    cfg, method = check_config(cfg), check_method(method)
    fields = cfg.model_dump()
    keep: set[str] = set()
    if method in TRAINED:
        keep |= set(fields) - _PLACEMENT - _DISTILL - {"linear_samples"}
    if method in ("distill", "linear+distill"):
        keep |= _DISTILL - ({"top_k"} if cfg.teacher_logits == "online" else set())
    if method in ("linear", "linear+distill"):
        keep |= _LINEAR
    return {k: fields[k] for k in sorted(keep)}


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
            record = {"method": method, "teacher": plan.teacher, "model_dir": plan.path,
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
           progress, record: dict) -> None:
    """The linear patch of model_dir into merged_dir; its figures go into `record`."""
    begin = time.perf_counter()
    result = linear_patch.patch_checkpoint(model_dir, data, str(merged_dir),
                                           samples=cfg.linear_samples, seq_len=cfg.seq_len,
                                           teacher=teacher, text_field=cfg.text_field,
                                           batch_size=cfg.batch_size, progress=progress)
    # the whole patch step (loading both models, the fit, the fold, the save); the fit alone
    # is linear_patch's own fit_seconds
    record["patch_seconds"] = time.perf_counter() - begin
    record["fit_tokens"] = result["tokens"]
    record["linear_patch"] = result


def _linear(plan, data: str, out: Path, cfg: HealConfig, progress, record: dict) -> list:
    """`linear`: the patched checkpoint is merged/ itself; no adapter, no curve."""
    _patch(plan.path, data, out / "merged", cfg, plan.teacher, progress, record)
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
            _patch(plan.path, data, patched, cfg, plan.teacher, progress, record)
        student = str(patched)
    if method == "lora":
        model = load_for_training(student, cfg)
        curve, seconds = run_trainer(model, cfg, ckpt_dir, Blocks(plan.blocks), last, progress)
    else:
        from layerprune.distill import train_distilled

        model, curve, seconds, choice = train_distilled(student, plan.teacher, plan.blocks, cfg,
                                                        ckpt_dir, last, progress)
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
    train_loss_curves({"train loss": curve}, out / "loss_curve.png")
    return curve

