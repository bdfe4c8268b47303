"""Heal a pruned model with QLoRA, as in Gromov et al. 2024 (arXiv 2403.17887), Sec. 3.

After a block of layers is removed, a small low-rank adapter trained for a few hundred steps on
generic text (the paper: C4; here by default `bundled:wiki-heal`) recovers much of the lost
next-token loss. The recipe follows the paper: the pruned weights are frozen in 4-bit NF4
(QLoRA), LoRA adapters of small rank sit on the feed-forward (MLP) modules only, dropout 0.05,
lr 3e-4.

`heal(model_dir, data, out_dir, config)` validates everything, then trains with the transformers
`Trainer` (checkpoints in `out_dir/checkpoints/`; after a kill, training resumes from the newest
*complete* one, see heal_checkpoints.py, and ends with the weights an uninterrupted run has) and
writes:
- `adapter/`: the LoRA adapter (peft, safetensors);
- `merged/`: the adapter merged into a full-precision reload of the pruned model (never into
  the 4-bit weights, whose rounding would be baked in), with tokenizer and model card;
  a plain `AutoModelForCausalLM.from_pretrained` loads it;
- `loss_curve.json` and `loss_curve.png`; and last, `heal.json`, the mark of a finished run.
Trainer's checkpoints hold its own pickles (optimizer.pt, rng_state.pth); they are deleted once
the run has finished, so a finished `out_dir` holds no pickle files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerprune.assets import resolve_ref
from layerprune.data import check_source, read_records
from layerprune.errors import LayerPruneError
from layerprune.figures import train_loss_curves
from layerprune.heal_checkpoints import (discard_incomplete, logging_steps, marker_callback,
                                         newest_complete)
from layerprune.io import atomic_output_dir, check_output_dir, write_json_atomic
from layerprune.models import check_model_ref, decoder_layers, load_tokenizer, read_config

# Submodule names (first component below a decoder layer) that hold the feed-forward block,
# and those that hold attention, across Llama/Qwen2/Gemma ("mlp", "self_attn"), GPT-2 ("mlp",
# "attn"), GPT-NeoX ("mlp", "attention"), Mixtral-style ("block_sparse_moe"/"feed_forward").
MLP_KEYS = ("mlp", "feed_forward", "ffn", "moe")
ATTN_KEYS = ("attn", "attention")


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
    seq_len: int = Field(256, ge=2, le=131_072, description="tokens per packed sequence")
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


def target_modules(model: torch.nn.Module, targets: str) -> list[str]:
    """Layer-relative names of the Linear (or GPT-2 Conv1D) modules to adapt, e.g.
    ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]; peft matches them as name suffixes, so
    GPT-2's "mlp.c_proj" and "attn.c_proj" stay apart."""
    names = set()
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
                continue
            head = name.split(".")[0].lower()
            kind = ("mlp" if any(k in head for k in MLP_KEYS)
                    else "attn" if any(k in head for k in ATTN_KEYS) else None)
            if kind is not None and targets in (kind, "all"):
                names.add(name)
    if not names:
        raise LayerPruneError(f"targets: no Linear modules for {targets!r} inside the decoder "
                              f"layers of {type(model).__name__}; allowed: mlp, attn, all")
    return sorted(names)


def _compute_dtype(cfg: HealConfig) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    return getattr(torch, cfg.compute_dtype)


def load_for_training(model_dir: str, cfg: HealConfig):
    """The pruned model, frozen (4-bit NF4 when cfg.quant), with fresh LoRA adapters attached."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    dtype = _compute_dtype(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict = {"dtype": dtype, "device_map": cfg.device_map or {"": device}}
    if cfg.quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # no KV cache in training; it also fights checkpointing
    targets = target_modules(model, cfg.targets)
    # Non-reentrant checkpointing needs no requires_grad trick on the inputs and is the
    # recommended mode in torch >= 2.4.
    ckpt_kwargs = {"use_reentrant": False}
    if cfg.quant:
        # Casts norms etc. to fp32 and freezes the base: the standard QLoRA preparation.
        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    set_seed(cfg.seed)  # the LoRA A matrices are drawn at random
    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.dropout, target_modules=targets, bias="none",
                      fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
    return get_peft_model(model, lora)


def pack(data: str, tokenizer, cfg: HealConfig) -> torch.Tensor:
    """Token blocks [n, seq_len]: records tokenized, joined with EOS between documents, cut into
    seq_len pieces, the remainder dropped. Reads only as many records as `steps` can use (in
    growing chunks), so a streamed hub dataset is never read to its end."""
    need = cfg.steps * cfg.tokens_per_step
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    done, limit = 0, 64
    while True:
        texts = read_records(data, limit=limit, text_field=cfg.text_field)
        for row in tokenizer(texts[done:])["input_ids"]:
            ids += list(row) + eos
        done = len(texts)
        if len(ids) >= need or done < limit:
            break
        limit *= 4
    n = min(len(ids), need) // cfg.seq_len
    if n == 0:
        raise LayerPruneError(f"data: {data!r} has {len(ids)} tokens, fewer than one packed "
                              f"sequence of seq_len={cfg.seq_len}; use more text or a smaller "
                              "seq_len")
    return torch.tensor(ids[: n * cfg.seq_len], dtype=torch.long).view(n, cfg.seq_len)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}  # the model shifts labels


def _resolve_model_dir(model_dir: str) -> str:
    check_model_ref(model_dir)
    path = resolve_ref(model_dir)
    if not (Path(path) / "config.json").is_file():
        raise LayerPruneError(f"model_dir: {model_dir!r} must be a Hugging Face checkpoint "
                              "directory (e.g. written by prune); GGUF files and hub ids are "
                              "not healed directly")
    return path


def _validate(model_dir: str, data: str, out_dir: Path, cfg: HealConfig, resume: bool,
              ckpt_dir: Path):
    """Every check that can fail on bad input, before anything is written or trained."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = _resolve_model_dir(model_dir)
    check_source(data)
    check_output_dir(out_dir, "out_dir")
    model_cfg = read_config(path)
    max_pos = getattr(model_cfg, "max_position_embeddings", None) or getattr(
        model_cfg, "n_positions", None)
    if max_pos and cfg.seq_len > max_pos:
        raise LayerPruneError(f"seq_len must be <= {max_pos} (the model's context), "
                              f"got {cfg.seq_len}")
    with init_empty_weights():  # structure only, no memory: finds the target modules up front
        targets = target_modules(AutoModelForCausalLM.from_config(model_cfg), cfg.targets)
    tokenizer = load_tokenizer(path)
    blocks = pack(data, tokenizer, cfg)
    # What must match for a checkpoint to be resumed (checkpointing settings may change).
    request = {"model_dir": path, "data": data,
               "config": cfg.model_dump(exclude={"save_every", "gradient_checkpointing"})}
    # Not transformers' get_last_checkpoint: it returns a checkpoint cut short by a kill.
    last = newest_complete(ckpt_dir) if resume else None
    saved = ckpt_dir / "request.json"
    if last and (not saved.is_file() or json.loads(saved.read_text()) != request):
        raise LayerPruneError(f"out_dir: {str(out_dir)!r} holds checkpoints of a different heal "
                              "run (model, data or config differ); use resume=False or "
                              "another out_dir")
    return path, tokenizer, blocks, targets, request, last


def _callbacks(progress: Callable[[int, int], None] | None) -> list:
    """Trainer's tqdm bar, quieter; plus `progress(step, total)` as a TrainerCallback."""
    from transformers import ProgressCallback, TrainerCallback

    class QuietBar(ProgressCallback):
        """Shows the latest loss on the bar instead of printing a dict at every log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    class Hook(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps)

    return [QuietBar()] + ([Hook()] if progress else [])


def heal(model_dir: str, data: str, out_dir: str, config: HealConfig | dict | None = None,
         resume: bool = True, progress: Callable[[int, int], None] | None = None,
         checkpoint_dir: str | None = None) -> dict:
    """Heal the pruned checkpoint `model_dir` on text `data` into `out_dir`; returns heal.json.

    With `resume`, an interrupted run continues from its newest complete checkpoint in
    out_dir/checkpoints (incomplete ones, cut short by a kill, are deleted with a log line).
    `checkpoint_dir`: keep the checkpoints there instead, and leave them when done: the caller
    removes them once the outputs are safe (the flow: after publishing, so that a kill while
    uploading resumes from the last checkpoint rather than from step 0).
    """
    from transformers import ProgressCallback, Trainer, TrainingArguments, default_data_collator

    start = time.perf_counter()
    cfg = check_config(config)
    out = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    path, tokenizer, blocks, targets, request, last = _validate(model_dir, data, out, cfg,
                                                                resume, ckpt_dir)
    if resume:
        # A kill mid-save leaves a checkpoint-N that the Trainer would resume from, or later
        # write its new checkpoint-N on top of: delete every incomplete one (logged).
        last = discard_incomplete(ckpt_dir)
    if not last and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # nothing to resume (or not wanted): start clean
    (out / "heal.json").unlink(missing_ok=True)  # no stale "finished" mark while we work
    write_json_atomic(ckpt_dir / "request.json", request)

    model = load_for_training(path, cfg)
    dtype = _compute_dtype(cfg)
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler, warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
        weight_decay=0.0, optim="adamw_torch",
        # about 100 points on the loss curve; each logged loss is the mean since the last log,
        # and each checkpoint falls on a log step so that a resumed curve is the same curve
        logging_steps=logging_steps(cfg.steps, cfg.save_every),
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 1,
        save_total_limit=2,  # the newest checkpoint, and one more in case it was cut mid-write
        # (transformers v5 always saves weights as safetensors: no save_safetensors flag)
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=use_cpu,
        bf16=dtype == torch.bfloat16, remove_unused_columns=False,
        dataloader_pin_memory=not use_cpu)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks),
                      data_collator=default_data_collator)
    trainer.remove_callback(ProgressCallback)
    for callback in [marker_callback(), *_callbacks(progress)]:
        trainer.add_callback(callback)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history
             if "loss" in h]

    with atomic_output_dir(out / "adapter") as tmp:
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    tail = curve[-max(1, len(curve) // 10):]  # mean over the last ~10% of steps: less noisy
    record = {
        "final_train_loss": sum(p["loss"] for p in tail) / len(tail) if tail else None,
        "initial_train_loss": curve[0]["loss"] if curve else None,
        "steps": cfg.steps, "tokens_seen": cfg.steps * cfg.tokens_per_step,
        "wall_seconds": None, "train_seconds": result.metrics.get("train_runtime"),
        "resumed_from_step": int(last.name.split("-")[-1]) if last else None,
        "packed_sequences": len(blocks),
        "epochs": cfg.steps * cfg.batch_size * cfg.grad_accum / len(blocks),
        "target_modules": targets, "lora_alpha": cfg.lora_alpha,
        "model_dir": path, "data": data, "config": cfg.model_dump(),
    }
    merge(path, out / "adapter", out / "merged", tokenizer, record)
    write_json_atomic(out / "loss_curve.json", curve)
    train_loss_curves({"train loss": curve}, out / "loss_curve.png")
    if not checkpoint_dir:  # finished: the Trainer's pickles are not needed
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    record["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(out / "heal.json", record)  # last: marks the run finished
    return record


def merge(model_dir: str, adapter_dir: Path, merged_dir: Path, tokenizer, record: dict) -> None:
    """Merge the adapter into a full-precision reload of the pruned model and save it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The checkpoint's own dtype (fp32 for prune's output): merging into the 4-bit weights
    # instead would round the base and the update together.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_output_dir(merged_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(model_dir) / "prune.json").is_file():
            shutil.copy(Path(model_dir) / "prune.json", tmp / "prune.json")
        card = Path(model_dir) / "README.md"
        text = card.read_text() if card.is_file() else "---\nlibrary_name: transformers\n---\n"
        (tmp / "README.md").write_text(text.rstrip("\n") + "\n\n" + healing_card(record))


def healing_card(record: dict) -> str:
    cfg = record["config"]
    lines = ["## Healing", "",
             f"{'QLoRA (4-bit NF4 base)' if cfg['quant'] else 'LoRA'} on `{record['data']}`, "
             "merged into the full-precision pruned weights (Gromov et al. 2024, Sec. 3).", "",
             f"- steps: {record['steps']} ({record['tokens_seen']:,} tokens)",
             f"- train loss: {record['initial_train_loss']:.4f} -> "
             f"{record['final_train_loss']:.4f}",
             f"- LoRA: rank {cfg['rank']}, alpha {record['lora_alpha']:g}, dropout "
             f"{cfg['dropout']}, on {', '.join(record['target_modules'])}"]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in cfg.items()
              if k not in ("rank", "alpha", "dropout", "steps")]
    return "\n".join(lines) + "\n"
