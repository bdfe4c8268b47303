"""What a heal is asked to do: the methods and their hyperparameters (`HealConfig`, also the
`heal.config` part of the flow's parameter schema), checked before any work, and which of them
can change a result (`method_config`, the cache key's share).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerprune.errors import LayerPruneError

METHODS = ("lora", "distill", "linear", "linear+distill")
TRAINED = ("lora", "distill", "linear+distill")  # the methods with an adapter and `steps`
TEACHER_USED = ("distill", "linear", "linear+distill")
PATCHED = ("linear", "linear+distill")  # the methods that need prune.json's removed layers


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
