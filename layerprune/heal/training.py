"""The training side of healing: LoRA adapters on a frozen (4-bit) pruned model, packed text, and
one `Trainer` run that resumes from a checkpoint; plus the peak-memory meter every method reports.

Used by `layerprune.heal.run` for the `lora` method (the paper's QLoRA) and by `layerprune.heal.distill`,
which trains the same adapters with another loss (a `Trainer` subclass, `run_trainer(cls=...)`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from layerprune.errors import LayerPruneError
from layerprune.heal.checkpoints import logging_steps, marker_callback
from layerprune.method.data import read_records
from layerprune.models.loading import decoder_layers

# Submodule names (first component below a decoder layer) that hold the feed-forward block,
# and those that hold attention, across Llama/Qwen2/Gemma ("mlp", "self_attn"), GPT-2 ("mlp",
# "attn"), GPT-NeoX ("mlp", "attention"), Mixtral-style ("block_sparse_moe"/"feed_forward").
MLP_KEYS = ("mlp", "feed_forward", "ffn", "moe")
ATTN_KEYS = ("attn", "attention")


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


def compute_dtype(cfg) -> torch.dtype:
    """cfg.compute_dtype; auto: bf16 on a GPU that has it, else fp32 (bf16 matmuls on a CPU are
    slower, not faster)."""
    if cfg.compute_dtype == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    return getattr(torch, cfg.compute_dtype)


def load_for_training(model_dir: str, cfg):
    """The pruned model, frozen (4-bit NF4 when cfg.quant), with fresh LoRA adapters attached."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    dtype = compute_dtype(cfg)
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


def pack(data: str, tokenizer, cfg) -> torch.Tensor:
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


class Blocks(torch.utils.data.Dataset):
    """The packed blocks as training examples (the model shifts the labels itself)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


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


def run_trainer(model, cfg, ckpt_dir: Path, dataset, last: Path | None,
                progress: Callable[[int, int], None] | None, trainer_cls=None,
                **trainer_kwargs) -> tuple[list[dict], float | None]:
    """Train `model` on `dataset` with `trainer_cls` (default: `transformers.Trainer`),
    checkpointing into `ckpt_dir` and resuming from `last`; returns (loss curve, train seconds).
    `trainer_kwargs` go to the trainer's constructor (a subclass's own arguments)."""
    from transformers import ProgressCallback, Trainer, TrainingArguments, default_data_collator

    dtype = compute_dtype(cfg)
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
    trainer = (trainer_cls or Trainer)(model=model, args=args, train_dataset=dataset,
                                       data_collator=default_data_collator, **trainer_kwargs)
    trainer.remove_callback(ProgressCallback)
    for callback in [marker_callback(), *_callbacks(progress)]:
        trainer.add_callback(callback)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history
             if "loss" in h]
    return curve, result.metrics.get("train_runtime")
