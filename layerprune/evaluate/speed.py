"""Inference cost of a pruned variant: parameters, weight bytes, peak memory, prefill and decode
throughput of the base model and of the model without layers `drop`, measured side by side.

One loaded model serves both sides: the variant is the in-memory view
`prune.removed_layers(model, drop)`, so nothing is loaded twice and both sides run the same
kernels on the same weights. The sides are timed alternately (a warm-up round of each, then
base, variant, base, variant, ... for `repeats` rounds) so that drift of the machine (other
processes, turbo, thermal throttling, a cold cache on the first call) falls on both sides alike;
each figure is the median of its `repeats` calls.

What is timed, on fixed token ids that are the same for both sides (`fixed_ids`):
- prefill: one forward pass over `batch` rows of `prefill_tokens` tokens, the KV cache built as
  a server would, and logits for the last position only (`logits_to_keep=1` where the model's
  forward takes it: the LM head over every position is work no server does);
- decode: `model.generate` of exactly `decode_tokens` greedy tokens with the KV cache
  (min_new_tokens = max_new_tokens, so an early end-of-text cannot shorten the run) after a
  `DECODE_PROMPT_TOKENS`-token prompt, at batch 1 and at batch `batch`. The time includes the
  prompt's own prefill, as a plain `generate` timed from outside does.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time

import torch

from layerprune.errors import LayerPruneError
from layerprune.method.layer_config import kept_layers
from layerprune.method.prune import removed_layers
from layerprune.models.loading import check_fits, context_length, num_layers
from layerprune.models.placement import input_device

SPEED_FILE = "speed.json"
SIDES = ("base", "variant")
# A short chat-turn-sized prompt: decode throughput is about the tokens generated, and a long
# prompt would turn the decode figure into a second prefill figure.
DECODE_PROMPT_TOKENS = 16


def check_settings(batch: int, prefill_tokens: int, decode_tokens: int, repeats: int) -> None:
    for name, flag, value in (("batch", "--batch", batch),
                              ("prefill_tokens", "--prefill-tokens", prefill_tokens),
                              ("decode_tokens", "--decode-tokens", decode_tokens),
                              ("repeats", "--repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerPruneError(f"{name} ({flag}) must be a positive integer, got {value!r}")


def check_drop(drop: list[int], layers: int) -> list[int]:
    """The layers to drop, sorted: distinct indices in 0..layers-1 that leave at least one."""
    try:
        kept_layers(list(drop), layers)
    except LayerPruneError as e:
        raise LayerPruneError(f"drop (--drop): {e} (the model has {layers} layers)") from None
    return sorted(drop)


def check_lengths(prefill_tokens: int, decode_tokens: int, context: int | None) -> None:
    """Both timed sequences fit the model's context (None: the config does not say)."""
    check_fits("prefill_tokens (--prefill-tokens)", prefill_tokens, context)
    check_fits("decode_tokens (--decode-tokens)", decode_tokens, context,
               prompt=DECODE_PROMPT_TOKENS)


def fixed_ids(tokenizer, vocab_size: int, rows: int, length: int) -> torch.Tensor:
    """(rows, length) token ids, the same on every call: ordinary (non-special) tokens visited
    with a stride coprime to their count, so rows differ and nothing is an end-of-text or pad
    token. Which tokens they are does not change the work of a dense transformer."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(vocab_size) if i not in special]
    stride = 7919  # a prime: coprime to len(ordinary) unless that is a multiple of it
    if len(ordinary) % stride == 0:
        stride = 1
    index = (torch.arange(rows * length) * stride) % len(ordinary)
    return torch.tensor(ordinary)[index].view(rows, length)


def weight_count(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model as it stands (tied weights counted once, as
    `parameters()` yields them); bytes are the stored ones (a 4-bit tensor's packed bytes)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are queued: the clock must wait for them
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _timed(call, device: torch.device) -> tuple[float, float]:
    """(seconds, peak MiB) of one call. Peak: see `peak_memory_kind`."""
    from layerprune.models.memory import PeakMemory

    rss_before = None
    if not torch.cuda.is_available():
        import psutil

        rss_before = psutil.Process().memory_info().rss
    with PeakMemory() as peak:
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        seconds = time.perf_counter() - start
    if rss_before is None:
        return seconds, peak.mb
    return seconds, max(0.0, peak.mb - rss_before / 2**20)  # RSS may shrink meanwhile


def peak_memory_kind() -> str:
    # PeakMemory measures CUDA whenever CUDA is available; the text says which one this is.
    if torch.cuda.is_available():
        return ("CUDA max_memory_allocated after a reset, every visible GPU summed: weights + "
                "activations + KV cache (tensors only, not the allocator's cache)")
    return ("CPU: peak RSS of the process during the call minus its RSS just before, sampled "
            "every 20 ms: activations + KV cache, not the weights (resident before the call); "
            "freed memory the allocator keeps can hide part of it")


def measure(model, tokenizer, drop: list[int], batch: int = 4, prefill_tokens: int = 128,
            decode_tokens: int = 64, repeats: int = 5) -> dict:
    """Time the base model and the variant without layers `drop` (see the module docstring);
    `{"base": side, "variant": side, "speedup": {...}, "settings": {...}}`, each side with
    layers, params, bytes, peak_memory_mb, prefill_tokens_per_s, decode_tokens_per_s (batch 1),
    decode_tokens_per_s_batch (batch `batch`) and the seconds of every kept call. `model` is
    left as it was."""
    check_settings(batch, prefill_tokens, decode_tokens, repeats)
    total_layers = num_layers(model)
    drop = check_drop(drop, total_layers)
    check_lengths(prefill_tokens, decode_tokens, context_length(model.config))
    device = input_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    prefill_ids = fixed_ids(tokenizer, vocab, batch, prefill_tokens).to(device)
    prompt = fixed_ids(tokenizer, vocab, batch, DECODE_PROMPT_TOKENS).to(device)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    from layerprune.method.batching import pad_token_id

    pad = pad_token_id(tokenizer)

    def prefill():
        model(input_ids=prefill_ids, attention_mask=torch.ones_like(prefill_ids), use_cache=True,
              **({"logits_to_keep": 1} if keep_last else {}))

    def decode(rows: int):
        ids = prompt[:rows]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             min_new_tokens=decode_tokens, max_new_tokens=decode_tokens,
                             do_sample=False, pad_token_id=pad)
        if out.shape[1] - ids.shape[1] != decode_tokens:  # the tokens/s below would be wrong
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, "
                               f"asked for {decode_tokens}")

    calls = {"prefill": (prefill, batch * prefill_tokens),
             "decode": (lambda: decode(1), decode_tokens),
             "decode_batch": (lambda: decode(batch), batch * decode_tokens)}
    if batch == 1:  # the batched decode would repeat the batch-1 one: 40% of the time, no news
        del calls["decode_batch"]
    seconds = {side: {kind: [] for kind in calls} for side in SIDES}
    peaks = {side: [] for side in SIDES}
    sizes = {}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms both sides up and is not kept
            for side in SIDES:
                view = removed_layers(model, drop) if side == "variant" \
                    else contextlib.nullcontext(model)
                with view:
                    sizes[side] = (num_layers(model), *weight_count(model))
                    for kind, (call, _) in calls.items():
                        took, peak = _timed(call, device)
                        if round_:
                            seconds[side][kind].append(took)
                            peaks[side].append(peak)
    result = {}
    for side in SIDES:
        layers, params, nbytes = sizes[side]
        rate = {kind: tokens / statistics.median(seconds[side][kind])
                for kind, (_, tokens) in calls.items()}
        rate.setdefault("decode_batch", rate["decode"])
        seconds[side].setdefault("decode_batch", seconds[side]["decode"])
        result[side] = {"layers": layers, "params": params, "bytes": nbytes,
                        "peak_memory_mb": max(peaks[side]),
                        "prefill_tokens_per_s": rate["prefill"],
                        "decode_tokens_per_s": rate["decode"],
                        "decode_tokens_per_s_batch": rate["decode_batch"],
                        "seconds": seconds[side]}
    base, variant = result["base"], result["variant"]
    result["speedup"] = {
        "prefill": variant["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
        "decode": variant["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        "decode_batch": variant["decode_tokens_per_s_batch"] / base["decode_tokens_per_s_batch"],
    }
    result["settings"] = {
        "drop": drop, "num_layers": total_layers, "batch": batch,
        "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens,
        "decode_prompt_tokens": DECODE_PROMPT_TOKENS, "repeats": repeats,
        "order": "a warm-up call of each kind per side, then base and variant alternately, "
                 f"{repeats} rounds; medians",
        "logits_to_keep": keep_last, "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "peak_memory_kind": peak_memory_kind(),
    }
    return result
