"""Healing by distillation: the LoRA adapters of `heal` trained to match the unpruned teacher's
next-token distribution instead of (or mixed with) the text's next tokens (Minitron heals by
logit distillation only).

    loss = kl_weight * T^2 * KL(p_teacher,T || p_student,T) + (1 - kl_weight) * LM loss

token-weighted over every position that has a next token (packed blocks have no padding), where
p_T = softmax(logits / T). The T^2 keeps the gradient's scale independent of T (Hinton et al.).
The loss lives in `DistillTrainer.compute_loss`, the extension point transformers documents
("subclass and override"); everything else (checkpoints, resume, schedule) is the plain Trainer's.

Teacher logits come one of two ways (`HealConfig.teacher_logits`):
- online: the teacher sits beside the student and runs on each batch (exact, full vocabulary);
- cached: before training the teacher runs once over the packed blocks and its top-k
  log-probabilities at temperature T (float32, int32 ids) and the log-probability of all other
  ids together (its "tail") are written as safetensors beside the checkpoints, then the teacher
  is freed. The KL is then over k + 1 outcomes, the k ids and the rest of the vocabulary as one,
  so a student equal to the teacher scores exactly 0 and k >= vocabulary is the online loss.
  Why the tail: renormalising both distributions over the k ids alone only teaches the order
  among them, not to put the mass there. Measured on SmolLM2 without layers 12..17 (20 steps of
  4 x 128 tokens, lr 2e-3, top-64; held-out loss 3.895 pruned, 3.190 base): renormalised only
  3.887 (1% of the gap closed), with the tail 3.722 (25%), online 3.723 (24%).
  The cache is complete or absent (written under a temporary name, renamed, then its sha256
  recorded in `teacher_topk.json`); a cache that fails the check is rebuilt.
- auto: online when the teacher and the student fit the device together, else cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import Trainer

from layerprune.heal.training import Blocks, compute_dtype, load_for_training, run_trainer
from layerprune.models.memory import release_memory
from layerprune.store.files import file_sha256, write_json_atomic

log = logging.getLogger("layerprune.heal.run")

CACHE, CACHE_RECORD = "teacher_topk.safetensors", "teacher_topk.json"
MODE_RECORD = "distill.json"  # the teacher_logits mode chosen, kept for a resumed run
# auto: online only when the estimate below takes at most this share of the free memory; the
# rest covers what the estimate leaves out (optimizer state, attention activations, allocator
# fragmentation, the CUDA context).
FIT_SHARE = 0.8
# fp32 copies of batch x seq x vocab held at the peak of a distillation step: student logits,
# their log-softmax and its gradient, teacher logits and their log-softmax, and the KL terms.
LOGIT_COPIES = 6


class TopK(NamedTuple):
    """A distribution kept as its k most likely ids: their log-probabilities [..., k], the ids
    [..., k] and the log-probability of every other id together [...] (-inf when k >= vocab)."""

    log_probs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor


def _tail(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability of every id but `ids` ([..., vocab] -> [...])."""
    if ids.shape[-1] >= log_probs.shape[-1]:
        return log_probs.new_full(log_probs.shape[:-1], float("-inf"))
    return log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def teacher_top_k(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The teacher's distribution at temperature T, kept as its top k (k >= vocab: all ids)."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    top = log_probs.topk(min(k, logits.shape[-1]), dim=-1)
    return TopK(top.values, top.indices.to(torch.int32), _tail(log_probs, top.indices))


def kl_to_teacher(student_logits: torch.Tensor, temperature: float,
                  teacher_logits: torch.Tensor | None = None,
                  topk: TopK | None = None) -> torch.Tensor:
    """KL(teacher_T || student_T) at each position ([..., vocab] -> [...]), from the teacher's
    full logits or from its `TopK`: then over k + 1 outcomes, the k ids and all others as one."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if topk is None:
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        # p * (log p - log q): exactly 0 where log_q == log_p
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ids = topk.ids.long()
    log_p = topk.log_probs.float()
    kl = (log_p.exp() * (log_p - log_q.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < log_q.shape[-1]:  # else there is no tail (and -inf - -inf is nan)
        tail = topk.tail.float()
        kl = kl + tail.exp() * (tail - _tail(log_q, ids))
    return kl


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                      kl_weight: float, teacher_logits: torch.Tensor | None = None,
                      topk: TopK | None = None,
                      num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """kl_weight * T^2 * KL + (1 - kl_weight) * LM loss, both summed over the positions whose
    next token is a label (labels[:, 1:] != -100) and divided by `num_items` (the Trainer's count
    over the whole accumulated batch) or, when None, by this batch's count."""
    mask = labels[:, 1:] != -100
    count = num_items if num_items is not None else mask.sum()
    logits = student_logits[:, :-1]
    loss = logits.new_zeros((), dtype=torch.float32)
    if kl_weight > 0:
        kl = kl_to_teacher(logits, temperature,
                           None if teacher_logits is None else teacher_logits[:, :-1],
                           None if topk is None else TopK(*(t[:, :-1] for t in topk)))
        loss = loss + kl_weight * temperature**2 * kl[mask].sum()
    if kl_weight < 1:
        lm = F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(),
                             ignore_index=-100, reduction="sum")
        loss = loss + (1 - kl_weight) * lm
    return loss / count


class DistillTrainer(Trainer):
    """A Trainer whose loss is `distillation_loss`. Batches carry the teacher's cached top-k
    (`teacher_log_probs`, `teacher_ids`, `teacher_tail`), or `teacher` (a frozen model) runs on
    them."""

    def __init__(self, *args, teacher=None, temperature: float = 1.0, kl_weight: float = 1.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature, self.kl_weight = teacher, temperature, kl_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached = [inputs.pop(f"teacher_{name}", None) for name in TopK._fields]
        topk = TopK(*cached) if cached[0] is not None else None
        labels = inputs.pop("labels")
        outputs = model(**inputs)  # no labels: the model computes no loss of its own
        teacher_logits = None
        if topk is None:
            with torch.no_grad():
                device = self.teacher.get_input_embeddings().weight.device
                teacher_logits = self.teacher(
                    **{k: v.to(device) for k, v in inputs.items()}).logits
            teacher_logits = teacher_logits.to(outputs.logits.device)
        # The documented switch (Trainer.loss_is_scaled_for_ga): normalised by the count over
        # the whole accumulated batch, the loss must not be divided by the accumulation steps.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        loss = distillation_loss(outputs.logits, labels, self.temperature, self.kl_weight,
                                 teacher_logits, topk, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class TeacherTopK(torch.utils.data.Dataset):
    """The packed blocks with the teacher's top-k logits of each, read lazily from the cache."""

    def __init__(self, blocks: torch.Tensor, cache: Path):
        from safetensors import safe_open

        self.blocks, self.file = blocks, safe_open(str(cache), framework="pt")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i],
                **{f"teacher_{name}": self.file.get_slice(name)[i] for name in TopK._fields}}


def load_teacher(ref: str, cfg, revision: str | None = None):
    """The teacher in the compute dtype, frozen, in eval mode (on the student's device), at
    `revision` (heal.validation.teacher_revision: a hub source's pruned commit)."""
    from layerprune.models.loading import load_model

    dtype = str(compute_dtype(cfg)).removeprefix("torch.")
    model = load_model(ref, dtype=dtype, device_map=cfg.device_map, revision=revision).model
    return model.requires_grad_(False).eval()


def cache_identity(teacher: str, top_k: int, temperature: float, blocks: torch.Tensor) -> dict:
    """What a cache must have been built from to be used: the teacher, k, T and these blocks."""
    digest = hashlib.sha256(blocks.numpy().astype("<i8").tobytes()).hexdigest()
    return {"teacher": teacher, "top_k": top_k, "temperature": temperature,
            "shape": list(blocks.shape), "blocks_sha256": digest}


def cache_problem(ckpt_dir: Path, identity: dict) -> str | None:
    """Why the cache in ckpt_dir cannot be used, or None when it is complete and matches."""
    try:
        record = json.loads((ckpt_dir / CACHE_RECORD).read_text())
    except FileNotFoundError:
        return "absent"
    except ValueError as e:
        return f"{CACHE_RECORD} unreadable ({e})"
    if not isinstance(record, dict) or record.get("identity") != identity:
        return "built from another teacher, top_k, temperature or data"
    path = ckpt_dir / CACHE
    if not path.is_file() or file_sha256(path) != record.get("sha256"):
        return f"{CACHE} missing or damaged (sha256 differs)"
    return None


@torch.no_grad()
def build_cache(teacher, blocks: torch.Tensor, top_k: int, temperature: float, batch_size: int,
                ckpt_dir: Path, identity: dict) -> Path:
    """Run the teacher over `blocks` once and write its `TopK` at T (atomically). Held in
    memory until written: tokens x (8 k + 4) bytes (64 MiB per million tokens at k = 64)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    device = teacher.get_input_embeddings().weight.device
    parts = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="teacher top-k", unit="batch"):
        logits = teacher(input_ids=blocks[start:start + batch_size].to(device)).logits
        parts.append([t.cpu() for t in teacher_top_k(logits, top_k, temperature)])
    tensors = {name: torch.cat([p[i] for p in parts]).contiguous()
               for i, name in enumerate(TopK._fields)}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = ckpt_dir / CACHE, ckpt_dir / f".{CACHE}.tmp"
    save_file(tensors, str(tmp))
    (ckpt_dir / CACHE_RECORD).unlink(missing_ok=True)  # an older cache's record: now void
    os.replace(tmp, path)  # complete or absent: the record below is what makes it count
    write_json_atomic(ckpt_dir / CACHE_RECORD, {"identity": identity,
                                                "sha256": file_sha256(path)})
    return path


def estimate_bytes(teacher: str, student_dir: str, cfg, vocab: int) -> int:
    """Teacher + student parameter bytes in the compute dtype (the student's decoder Linear
    weights at 0.5 byte when 4-bit) + the logits of one step (LOGIT_COPIES fp32 copies). Built on
    the meta device: no weights read."""
    from transformers import AutoModelForCausalLM

    from layerprune.models.loading import decoder_layers, read_config

    width = torch.finfo(compute_dtype(cfg)).bits // 8

    def parameter_bytes(ref: str, quant: bool) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(read_config(ref))
        total = sum(p.numel() for p in model.parameters()) * width
        if quant:  # NF4 stores 4 bits per weight of each decoder Linear (+ ~3% of scales)
            linear = sum(m.weight.numel() for m in decoder_layers(model).modules()
                         if isinstance(m, torch.nn.Linear))
            total -= int(linear * (width - 0.5))
        return total

    logits = LOGIT_COPIES * cfg.batch_size * cfg.seq_len * vocab * 4
    return parameter_bytes(teacher, False) + parameter_bytes(student_dir, cfg.quant) + logits


def free_bytes(cfg) -> int:
    """Free memory where training runs: the GPUs' (all of them with a device_map, else the
    first), else the RAM psutil calls available."""
    if torch.cuda.is_available():
        gpus = range(torch.cuda.device_count()) if cfg.device_map else [0]
        return sum(torch.cuda.mem_get_info(i)[0] for i in gpus)
    import psutil

    return psutil.virtual_memory().available


def choose_teacher_logits(mode: str, need: int, free: int) -> str:
    """online or cached: `mode` itself unless auto; auto is online when `need` bytes fit in
    FIT_SHARE of `free`."""
    if mode != "auto":
        return mode
    return "online" if need <= FIT_SHARE * free else "cached"


def train_distilled(student_dir: str, teacher: str, blocks: torch.Tensor, cfg, ckpt_dir: Path,
                    last: Path | None, progress, teacher_revision: str | None = None) -> tuple:
    """Distil `teacher` into LoRA adapters on `student_dir`; returns (peft model, loss curve,
    train seconds, {"teacher_logits": mode, ...}). Resumes from `last` like `lora`; the mode
    chosen by auto and a complete top-k cache in `ckpt_dir` are reused."""
    saved = ckpt_dir / MODE_RECORD
    if saved.is_file() and cfg.teacher_logits == "auto":
        choice = json.loads(saved.read_text())  # resumed: keep what this run chose before
    else:
        from layerprune.models.loading import read_config

        vocab = read_config(teacher).get_text_config(decoder=True).vocab_size
        need, free = estimate_bytes(teacher, student_dir, cfg, vocab), free_bytes(cfg)
        choice = {"teacher_logits": choose_teacher_logits(cfg.teacher_logits, need, free),
                  "estimated_mb": round(need / 2**20), "free_mb": round(free / 2**20)}
        write_json_atomic(saved, choice)
    teacher_model = None
    if choice["teacher_logits"] == "cached":
        identity = cache_identity(teacher, cfg.top_k, cfg.temperature, blocks)
        why = cache_problem(ckpt_dir, identity)
        if why is None:
            log.info("heal: reusing the teacher's top-k logits in %s", ckpt_dir / CACHE)
            cache = ckpt_dir / CACHE
        else:
            if why != "absent":
                log.warning("heal: teacher top-k cache not used (%s): rebuilt", why)
            loaded = load_teacher(teacher, cfg, teacher_revision)
            cache = build_cache(loaded, blocks, cfg.top_k, cfg.temperature, cfg.batch_size,
                                ckpt_dir, identity)
            del loaded  # freed before the student loads: the point of caching
            release_memory()
        dataset = TeacherTopK(blocks, cache)
    else:
        teacher_model, dataset = load_teacher(teacher, cfg, teacher_revision), Blocks(blocks)
    model = load_for_training(student_dir, cfg)
    curve, seconds = run_trainer(model, cfg, ckpt_dir, dataset, last, progress,
                                 trainer_cls=DistillTrainer, teacher=teacher_model,
                                 temperature=cfg.temperature, kl_weight=cfg.kl_weight)
    del teacher_model
    release_memory()
    return model, curve, seconds, choice
