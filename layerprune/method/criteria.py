"""Per-layer scores for the data-driven block criteria: they run the model on calibration tokens.

- `block_influence` (ShortGPT, Men et al. 2024): BI_l = 1 - mean cos(x^(l), y^(l)) between the
  input and the output of layer l, over every real token of the calibration samples. A layer
  that barely turns its input matters little; the n smallest are dropped, contiguous or not.
- `greedy_loss_order` (SLEB, Song et al. 2024; BlockPruner, Zhong et al. 2024): remove one layer
  at a time, each time the one whose removal raises the calibration next-token loss least given
  those already removed. The order is nested, so one run serves every n up to `n_max`.

`layerprune.method.prune.choose_layers` turns these scores into the layers to drop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from layerprune.errors import LayerPruneError
from layerprune.method import prune
from layerprune.method.batching import batches, pad_token_id
from layerprune.method.distances import DISTANCES_FILE
from layerprune.method.hidden_states import layer_input, output_tensor
from layerprune.method.loss import next_token_loss
from layerprune.models.loading import base_model, decoder_layers
from layerprune.models.placement import input_device

Progress = Callable[[int, int], None]  # (units done, units total)
# The strategies of layerprune.method.prune that run the model on calibration text (the rest read
# distances, a seed, or nothing).
DATA_STRATEGIES = ("block-influence", "greedy-loss")


@torch.inference_mode()
def block_influence(model, ids: list[list[int]], batch_size: int = 8, pad_id: int = 0,
                    progress: Progress | None = None) -> list[float]:
    """BI_l for every decoder layer l, from one forward pass over `ids` (one list per sample).

    The input of layer l is read by a forward pre-hook, its output by a forward hook (before the
    final norm for the last layer, as `hidden_states` reads x^(L)). Cosines are computed and
    summed in float64 over the real tokens only: batches are right-padded
    (`batching.batches`) and padded positions are masked out, so the batch size does not
    change the result. Every token counts once, so longer samples weigh more."""
    if not ids:
        raise LayerPruneError("block influence needs at least one calibration sample")
    layers = decoder_layers(model)
    n_layers = len(layers)
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    tokens = 0
    current: dict = {}

    def keep_input(index: int, hidden: torch.Tensor) -> None:
        current[index] = hidden

    def add_cosines(index: int, out: torch.Tensor) -> None:
        x = current.pop(index).to(torch.float64)
        y = output_tensor(out).to(torch.float64)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # (b, t)
        # .to: with a device_map the layers (and so the cosines) sit on several devices
        cos_sum[index] += cos[current["real"].to(cos.device)].sum().cpu()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: keep_input(i, layer_input(args, kwargs)),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: add_cosines(i, out)))
    body = base_model(model)
    done = 0
    try:
        for batch in batches(ids, batch_size, pad_id, "right", input_device(model)):
            current["real"] = batch.attention_mask.bool()
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False)
            tokens += int(batch.attention_mask.sum())
            done += len(batch.rows)
            if progress:
                progress(done, len(ids))
    finally:
        for h in handles:
            h.remove()
    influence = (1.0 - cos_sum / tokens).tolist()
    bad = [i for i, v in enumerate(influence) if v != v]  # NaN: an overflowed layer
    if bad:
        raise LayerPruneError(f"block influence is NaN for layers {bad}: hidden states were not "
                              "finite (most likely a float16 overflow); use dtype float32 or "
                              "bfloat16")
    return influence


def greedy_loss_order(model, tokenizer, ids: list[list[int]], n_max: int, batch_size: int = 8,
                      progress: Progress | None = None) -> dict:
    """{"order": layers in removal order, "losses": calibration loss after each removal,
    "base_loss": loss of the whole model, "forward_passes": passes over `ids`}.

    Step k (k = 0..n_max-1) scores each of the L-k remaining layers by the loss of the model
    without it and the k already removed (`prune.removed_layers`, an in-memory view; the loss
    is `loss.next_token_loss`) and removes the lowest (ties: the shallower layer). The drop for
    any n <= n_max is sorted(order[:n]).

    Cost: 1 + sum_{k<n_max} (L-k) passes over `ids`, each a little cheaper than the last as
    layers go. Measured: SmolLM2-135M (L=30), n_max=8, 32 records x 128 tokens (3,444 tokens),
    batch 1, one CPU thread: 213 passes in 45 minutes (13 s a pass; block_influence on the
    same records: one pass, 11 s). Hence a subset of the calibration records (the flow's
    `greedy_samples`)."""
    num_layers = len(decoder_layers(model))
    prune.check_block_size(n_max, num_layers)
    total = 1 + sum(num_layers - k for k in range(n_max))
    passes = 0

    def loss_without(drop: list[int]) -> float:
        nonlocal passes
        with prune.removed_layers(model, drop) if drop else contextlib.nullcontext():
            value = next_token_loss(model, tokenizer, ids, batch_size, show_bar=False)["loss"]
        passes += 1
        if progress:
            progress(passes, total)
        return value

    base_loss = loss_without([])
    order: list[int] = []
    losses: list[float] = []
    for _ in range(n_max):
        scored = [(loss_without(order + [layer]), layer)
                  for layer in range(num_layers) if layer not in order]
        best_loss, best = min(scored)
        order.append(best)
        losses.append(best_loss)
    return {"order": order, "losses": losses, "base_loss": base_loss, "forward_passes": passes}


def scores(strategy: str, model, tokenizer, ids: list[list[int]], n: int,
           batch_size: int) -> dict:
    """What a data strategy (`DATA_STRATEGIES`) reads from the model, as prune.json records it:
    block influence per layer, or the greedy removal order with its losses."""
    if strategy == "block-influence":
        return {"block_influence": block_influence(model, ids, batch_size,
                                                   pad_token_id(tokenizer))}
    found = greedy_loss_order(model, tokenizer, ids, n, batch_size)
    return {"greedy_order": found["order"], "greedy_losses": found["losses"],
            "greedy_base_loss": found["base_loss"], "forward_passes": found["forward_passes"]}


def check_strategy_inputs(strategy: str | None, distances_dir: str | None, data: str | None,
                          samples: int | None, seq_len: int | None, seed: int | None) -> None:
    """Each strategy's inputs are there, and none it would ignore (a --data or --seed that
    changes nothing is a mistake to point out, not to drop silently)."""
    if strategy == "similarity":  # before the model's config is read: this needs no model
        if distances_dir is None:
            raise LayerPruneError("strategy 'similarity' needs --distances DIR")
        if not (Path(distances_dir) / DISTANCES_FILE).is_file():
            raise LayerPruneError(f"distances: no {DISTANCES_FILE} in {distances_dir!r}")
    elif distances_dir is not None:
        raise LayerPruneError("distances (--distances) is read only by strategy 'similarity'")
    if strategy in DATA_STRATEGIES:
        missing = [name for name, value in (("--data FILE", data), ("--samples N", samples),
                                            ("--seq-len T", seq_len)) if value is None]
        if missing:
            raise LayerPruneError(f"strategy {strategy!r} needs calibration text: "
                                  f"{' '.join(missing)} missing")
    elif any(v is not None for v in (data, samples, seq_len)):
        raise LayerPruneError(f"data, samples, seq_len (--data, --samples, --seq-len) are read "
                              f"only by strategies {', '.join(DATA_STRATEGIES)}")
    if seed is not None and strategy != "random":
        raise LayerPruneError("seed (--seed) is read only by strategy 'random'")
