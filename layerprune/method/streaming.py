"""Layer-streamed hidden states: x^(l) for every layer without ever holding the whole model.

The model is built on the meta device (no weights). Its preamble (position embeddings, rotary
tables, attention masks per layer type) runs once per batch with every decoder layer swapped for
a recorder that keeps what the layer would be called with. Then layer by layer: that layer's
tensors are read from the checkpoint (safetensors, memory-mapped; GGUF, dequantized tensor by
tensor), every batch goes through it, and it goes back to the meta device. Each weight is read
once; memory is one layer + the running activations (N x T x d) + the embedding rows the samples
use. Batches, their order and the calls are the in-memory pass's (`layerprune.method.hidden_states`),
so the numbers are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.errors import LayerPruneError
from layerprune.method.batching import at_last_token, batches, length_buckets
from layerprune.method.hidden_states import Progress, check_finite, output_tensor
from layerprune.models.assets import resolve_ref
from layerprune.models.gguf import is_gguf
from layerprune.models.loading import base_model, decoder_layers, layer_list_owner, pinned_revision
from layerprune.models.placement import parse_size, resolve_device, resolve_dtype
from layerprune.models.tensor_files import checkpoint_files, skeleton


@dataclass
class StreamStep:
    """What the streaming loop holds while decoder layer `layer` runs (reported to `on_layer`)."""

    layer: int
    weight_bytes: int      # materialized (non-meta) parameters in the whole model, counted live
    activation_bytes: int  # the running activations of every batch


OnLayer = Callable[[StreamStep], None]


EXTRACTIONS = ("auto", "in-memory", "streamed")


@dataclass
class MemoryPlan:
    """Bytes each way of extracting needs at once (weights + activations), estimated before any
    weight is read from the parameter shapes, the compute dtype and the calibration batches."""

    in_memory: int    # every weight + one batch through a layer + the states
    streamed: int     # the largest layer (or the embedding rows) + every batch's activations
    largest_layer: int
    activations: int  # what streaming holds besides weights


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def memory_plan(model: nn.Module, ids: list[list[int]], batch_size: int) -> MemoryPlan:
    """Estimate, from a `skeleton` (its meta parameters carry shapes and the compute dtype)."""
    cfg = model.config.get_text_config()
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    ffn = getattr(cfg, "intermediate_size", None) or 4 * d  # GPT-2: n_inner None means 4d
    item = next(model.parameters()).element_size()
    layers = decoder_layers(model)
    shapes = [(len(rows), max(len(ids[r]) for r in rows))
              for rows in length_buckets(ids, batch_size)]
    # One batch inside a layer: the MLP's three ffn-wide tensors, a few d-wide ones (residual,
    # norm, q/k/v/out, cos/sin) and the attention scores (heads x T x T) of the math path.
    work = max(b * t * (3 * ffn + 8 * d) + b * heads * t * t for b, t in shapes) * item
    # Up to two attention masks (full and sliding window), as floats at worst, kept per batch.
    masks = [2 * b * t * t * item for b, t in shapes]
    running = sum(b * t for b, t in shapes) * d * item
    states = (len(layers) + 1) * len(ids) * d * 4
    largest = max(_nbytes(layer) for layer in layers)
    biggest_tensor = max(p.numel() for p in layers.parameters()) * 4
    body = base_model(model)
    vocab, _ = body.get_input_embeddings().weight.shape
    rows = min(vocab, sum(map(len, ids)) + 1) * d * item  # at most one row per token, + padding
    small = _nbytes(body) - _nbytes(layers) - _nbytes(body.get_input_embeddings())
    # A tensor is read (and, from GGUF, dequantized) before it is cast: two fp32 copies of the
    # largest one are in flight on top of the layer.
    activations = running + sum(masks) + work + states + small
    return MemoryPlan(in_memory=_nbytes(model) + max(masks) + work + states,
                      streamed=max(largest + 2 * biggest_tensor, rows) + activations,
                      largest_layer=largest, activations=activations)


def available_memory(device: str) -> int | None:
    """Free memory where the weights would go: the GPU's free memory, or the system's
    MemAvailable; None when it cannot be read."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def choose_extraction(mode: str, plan: MemoryPlan, max_memory: int | str | None = None,
                      device: str = "cpu") -> str:
    """The extraction to run, "in-memory" or "streamed": `mode` when forced, else in memory
    when it fits the budget (`max_memory`, default: the memory available on `device`). Fails,
    before any weight is read, when the choice cannot fit."""
    if mode not in EXTRACTIONS:
        raise LayerPruneError(f"extraction must be one of {list(EXTRACTIONS)}, got {mode!r}")
    budget = parse_size(max_memory, "max_memory (--max-memory)") if max_memory is not None \
        else None
    if mode == "auto":
        free = budget if budget is not None else available_memory(device)
        if free is None or plan.in_memory <= free:
            return "in-memory"
        mode = "streamed"
        budget = free
    need = plan.in_memory if mode == "in-memory" else plan.streamed
    if budget is not None and need > budget:
        detail = (f"the whole model and one batch, about {_size(need)}" if mode == "in-memory"
                  else f"about {_size(need)}: the largest layer {_size(plan.largest_layer)} + "
                       f"activations {_size(plan.activations)}")
        raise LayerPruneError(
            f"max_memory (--max-memory) {_size(budget)} is too small for {mode} extraction, "
            f"which needs {detail}; raise --max-memory, use fewer or shorter samples, or a "
            "smaller batch size")
    return mode


def extraction_for(spec, n_samples: int, seq_len: int, batch_size: int, mode: str = "auto",
                   max_memory: int | str | None = None) -> str:
    """What `mode` resolves to for a model held as `spec` (`layerprune.config.ModelSpec`),
    decided before any weight is read, for the worst case of every sample seq_len tokens long.
    "auto" streams a GGUF file whenever streaming fits (it reads the file once, not twice)."""
    if mode not in EXTRACTIONS:
        raise LayerPruneError(f"extraction must be one of {list(EXTRACTIONS)}, got {mode!r}")
    if max_memory is not None:
        parse_size(max_memory, "max_memory (--max-memory)")
    if getattr(spec, "quantization", "none") != "none" or getattr(spec, "device_map", None):
        if mode == "streamed":
            raise LayerPruneError("extraction 'streamed' holds one plain layer at a time; it does "
                                  "not combine with quantization or device_map")
        return "in-memory"
    if mode == "in-memory" and max_memory is None:
        return mode
    device = resolve_device(spec.device)
    if mode == "auto" and max_memory is None and _fits_easily(spec, device):
        return "in-memory"
    model = skeleton(spec.ref, resolve_dtype(spec.dtype, device), spec.revision,
                     spec.trust_remote_code)
    plan = memory_plan(model, [[0] * seq_len] * n_samples, batch_size)
    if mode == "auto" and is_gguf(resolve_ref(spec.ref)):
        # A GGUF file is dequantized tensor by tensor either way; from_pretrained's loader
        # parses the whole file once more first (metadata and vocabulary: about 5 s for the
        # 98 MB SmolLM2 file on 2 cores), streaming reads it once. The same numbers to 1e-5
        # (tests/test_streaming.py).
        free = max_memory if max_memory is not None else available_memory(device)
        return choose_extraction("streamed", plan, free, device)
    return choose_extraction(mode, plan, max_memory, device)


def _fits_easily(spec, device: str) -> bool:
    """Whether the weights, at the compute dtype, take under half of the memory available: then
    the model is held in memory without planning, read from the safetensors headers alone
    (building the skeleton to plan costs about a second, 2% of a small model's whole run)."""
    from layerprune.models.checkpoint_files import read_header, shard_files

    path, free = Path(resolve_ref(spec.ref)), available_memory(device)
    files = shard_files(path) if path.is_dir() else []
    if not files or free is None:
        return False
    numel = sum(math.prod(entry["shape"]) for name in files
                for entry in read_header(path / name)[0].values())
    return numel * resolve_dtype(spec.dtype, device).itemsize < free / 2


def streamed_options(spec) -> dict:
    """`last_token_states_streamed` keyword arguments for a `layerprune.config.ModelSpec`."""
    return {"dtype": spec.dtype, "device": spec.device, "revision": spec.revision,
            "trust_remote_code": spec.trust_remote_code}


def _key(files, name: str, prefix: str) -> str:
    """The checkpoint's name for parameter `name` (some checkpoints omit the base prefix)."""
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if candidate in files.where:
            return candidate
    raise LayerPruneError(f"extraction 'streamed': the checkpoint has no tensor for {name!r}; "
                          "use extraction 'in-memory'")


def _materialize(module: nn.Module, module_name: str, files, prefix: str, device,
                 skip: tuple[str, ...] = ()) -> None:
    """Read `module`'s meta parameters from the checkpoint (documented `load_state_dict(assign=
    True)`: the loaded tensors replace the meta ones), cast to the dtype the skeleton chose."""
    state = {}
    for name, p in module.named_parameters():
        if p.is_meta and not name.startswith(skip):
            full = f"{module_name}.{name}" if module_name else name
            state[name] = files.read(_key(files, full, prefix)).to(device=device, dtype=p.dtype)
    module.load_state_dict(state, strict=False, assign=True)


def materialized_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


class _Recorder(nn.Module):
    """Stands in for a decoder layer in the preamble pass: keeps the call, returns its input."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_calls"] = layer, calls  # not submodules

    def __getattr__(self, name):  # a model reading e.g. `layer.attention_type` gets the real one
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.__dict__["_calls"].append((hidden, args[1:], kwargs))
        return hidden


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@torch.inference_mode()
def last_token_states_streamed(ref: str, ids: list[list[int]], batch_size: int = 1,
                               padding_side: str = "right", pad_id: int = 0,
                               dtype: str = "float32", device: str = "cpu",
                               revision: str | None = None, trust_remote_code: bool = False,
                               max_memory: int | str | None = None,
                               on_layer: OnLayer | None = None, progress: Progress | None = None,
                               show_bar: bool = True) -> torch.Tensor:
    """(L+1, N, d) fp32 tensor, equal to `hidden_states.last_token_states` on the loaded model,
    reading one decoder layer at a time from the checkpoint `ref` (a local directory of
    safetensors, a .gguf file, a hub id or bundled:NAME). `max_memory` (bytes or "700MB"): fail
    before reading any weight when streaming needs more (`memory_plan`)."""
    device = resolve_device(device)
    revision = pinned_revision(ref, revision)  # as `models.load_model` does
    model = skeleton(ref, resolve_dtype(dtype, device), revision, trust_remote_code)
    if max_memory is not None:
        choose_extraction("streamed", memory_plan(model, ids, batch_size), max_memory)
    files = checkpoint_files(ref, model, revision)
    prefix, body, layers = model.base_model_prefix, base_model(model), decoder_layers(model)
    body_name = _name_of(model, body)
    layers_owner, layers_attr = layer_list_owner(model)
    layers_name = f"{_name_of(model, layers_owner)}.{layers_attr}".lstrip(".")
    embed = body.get_input_embeddings()
    embed_name = _name_of(model, embed)

    # Small non-layer parameters (final norm, GPT-2's position table) are read whole; the input
    # embedding is read only at the rows the samples use.
    skip = (f"{layers_name}.".removeprefix(f"{body_name}.").lstrip("."),
            f"{embed_name}.".removeprefix(f"{body_name}.").lstrip("."))
    _materialize(body, body_name, files, prefix, device, skip)
    for child_name, child in body.named_children():
        if child is not layers and child is not embed:
            child.to(device)  # its buffers (rotary tables) to where the activations are
    used = torch.tensor(sorted({t for row in ids for t in row} | {pad_id}))
    rows = files.read_rows(_key(files, f"{embed_name}.weight", prefix), used)
    # Only the rows used, renumbered by searchsorted below: the embedding's own forward (with
    # e.g. Gemma's scale) still computes the inputs.
    embed.weight = nn.Parameter(rows.to(device=device, dtype=embed.weight.dtype),
                                requires_grad=False)
    if isinstance(embed, nn.Embedding):
        embed.padding_idx = None  # only zeroes that row's gradient; out of range in the rows
    embed.to(device)

    plan = list(batches(ids, batch_size, pad_id, padding_side, device))
    hidden: list[torch.Tensor] = []
    calls: list[list] = []
    originals = list(layers)
    for batch in plan:
        batch_calls: list = []
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, batch_calls)
        inputs = embed(torch.searchsorted(used.to(device), batch.input_ids))
        body(inputs_embeds=inputs, attention_mask=batch.attention_mask,
             position_ids=batch.position_ids, use_cache=False)
        hidden.append(batch_calls[0][0])  # what layer 0 receives (GPT-2: + positions)
        # Every recorder saw that same tensor; keep only the calls' other arguments.
        batch_calls[:] = [(args, kwargs) for _, args, kwargs in batch_calls]
        calls.append(batch_calls)
    for i, layer in enumerate(originals):
        layers[i] = layer
    embed.to("meta")  # the rows are no longer needed

    n_layers, n = len(layers), len(ids)
    states = torch.empty(n_layers + 1, n, hidden[0].shape[-1], dtype=torch.float32)

    def record(index: int) -> None:
        for batch, h in zip(plan, hidden):
            states[index, batch.rows] = at_last_token(h, batch).float().cpu()
        check_finite(states[index], index, n_layers)

    bar = tqdm(total=n_layers, desc="hidden states (streamed)", unit="layer",
               disable=not show_bar)
    try:
        for index, layer in enumerate(layers):
            record(index)
            _materialize(layer, f"{layers_name}.{index}", files, prefix, device)
            if on_layer:
                on_layer(StreamStep(index, materialized_bytes(model),
                                    sum(h.numel() * h.element_size() for h in hidden)))
            for j, h in enumerate(hidden):
                args, kwargs = calls[j][index]
                hidden[j] = output_tensor(layer(h, *args, **kwargs))
            layer.to("meta")  # frees its tensors
            bar.update(1)
            if progress:
                progress(index + 1, n_layers)
        record(n_layers)
    finally:
        bar.close()
    return states
