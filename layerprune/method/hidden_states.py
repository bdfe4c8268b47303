"""Capture the residual stream entering every decoder layer, at the last real token of each sample.

x^(l) (l = 0..L-1) is the input of decoder layer l, read by a forward pre-hook; x^(L) is the
output of the last decoder layer, read by a forward hook, i.e. *before* the final norm. This is
why `output_hidden_states` is not used: its last entry is after the final norm (NOTES.md).

Only the last-token vectors are kept, (L+1) x N x d in fp32, never every position of every layer;
the forward runs the bare transformer (no LM head, no logits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from layerprune.errors import LayerPruneError
from layerprune.method.batching import at_last_token, batches, pad_token_id
from layerprune.models.loading import base_model, decoder_layers
from layerprune.models.placement import input_device

STATES_FILE = "states.safetensors"
Progress = Callable[[int, int], None]  # (samples done, samples total)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer receives (positional, or the `hidden_states` keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def output_tensor(out) -> torch.Tensor:
    """A decoder layer's hidden-state output (some families return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(states: torch.Tensor, index: int, n_layers: int) -> None:
    """Stop on x^(index) that is inf or NaN (float16 overflows at 65504): the distances would be
    NaN and the block choice arbitrary."""
    bad = int((~torch.isfinite(states)).any(-1).sum())
    if bad:
        where = ("the embeddings (input of layer 0)" if index == 0 else
                 f"the output of layer {index - 1}" + (f" (input of layer {index})"
                                                       if index < n_layers else ""))
        raise LayerPruneError(
            f"hidden states are not finite (inf/NaN) at {where} for {bad} sample(s), most "
            "likely a float16 overflow; use dtype float32 or bfloat16")


@torch.inference_mode()
def last_token_states(model, ids: list[list[int]], batch_size: int = 8, padding_side: str = "right",
                      pad_id: int = 0, progress: Progress | None = None,
                      show_bar: bool = True) -> torch.Tensor:
    """(L+1, N, d) fp32 tensor: x^(l) at the last real token of each of the N samples."""
    layers = decoder_layers(model)
    n_layers, n = len(layers), len(ids)
    device = input_device(model)
    states: torch.Tensor | None = None
    current: dict = {}

    def store(index: int, hidden: torch.Tensor) -> None:
        nonlocal states
        if states is None:
            states = torch.empty(n_layers + 1, n, hidden.shape[-1], dtype=torch.float32)
        b = current["batch"]
        states[index, b.rows] = at_last_token(hidden, b).float().cpu()

    handles = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: store(i, layer_input(args, kwargs)), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(
        lambda mod, args, out: store(n_layers, output_tensor(out))))
    body = base_model(model)
    done = 0
    bar = tqdm(total=n, desc="hidden states", unit="sample", disable=not show_bar)
    try:
        for batch in batches(ids, batch_size, pad_id, padding_side, device):
            current["batch"] = batch
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False)
            # Checked once a batch, not in every hook (6,000 hook calls cost 0.5 s of 60 here).
            finite = torch.isfinite(states[:, batch.rows]).flatten(1).all(1)
            if not finite.all():  # name the first layer that overflowed
                index = int((~finite).nonzero()[0])
                check_finite(states[index, batch.rows], index, n_layers)
            done += len(batch.rows)
            bar.update(len(batch.rows))
            if progress:
                progress(done, n)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    assert states is not None
    return states


def extract(loaded, ids: list[list[int]], out_dir: str | Path, batch_size: int = 8,
            padding_side: str = "right", progress: Progress | None = None) -> dict:
    """Capture states for the calibration ids and save them as `states.safetensors`."""
    return save_states(last_token_states(loaded.model, ids, batch_size, padding_side,
                                         pad_token_id(loaded.tokenizer), progress), out_dir)


def save_states(states: torch.Tensor, out_dir: str | Path) -> dict:
    """Write `states.safetensors` in `out_dir`; return its shape as metadata."""
    save_file({"states": states.contiguous()}, str(Path(out_dir) / STATES_FILE))
    return {"num_layers": states.shape[0] - 1, "n_samples": states.shape[1],
            "hidden_size": states.shape[2]}


def load_states(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if path.is_dir():
        path = path / STATES_FILE
    return load_file(str(path))["states"]
