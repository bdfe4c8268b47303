"""Choose a block of n layers and remove it, fixing everything a deletion touches.

Strategies (Gromov et al. 2024):
- `similarity`: l*(n) = argmin_l d(x^(l), x^(l+n)); drop layers l*..l*+n-1.
- `heuristic`:  drop the n deepest layers but keep the last one: layers L-1-n..L-2.

Removing layers touches more than the ModuleList (NOTES.md): each attention module's `layer_idx`
(the KV cache is indexed by it; a stale one breaks `generate`), `num_hidden_layers`, every
per-layer list in the config (`layer_types`, ...; transformers v5 refuses to save when their
length differs), and thresholds counted in layers (`max_window_layers` in Qwen2).
`removed_layers` does all of it and can undo it, so one loaded model serves every variant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.models import layer_list_owner

STRATEGIES = ("similarity", "heuristic")
# Config entries that hold one value per layer, besides any list named *layer_types.
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "activation_sparsity_pattern",
                  "sliding_window_layers", "attn_layer_indices")
# Config entries that count layers from the bottom: "layers below k are of kind A".
LAYER_THRESHOLD_KEYS = ("max_window_layers", "first_k_dense_replace")


def check_block_size(n: int, num_layers: int) -> None:
    if not 1 <= n < num_layers:
        raise LayerPruneError(f"n must be in 1..{num_layers - 1} (the model has {num_layers} "
                              f"layers and at least one must remain), got {n}")


def similarity_start(distance: list[list[float]], n: int) -> int:
    check_block_size(n, len(distance))
    row = distance[n - 1]
    return min(range(len(row)), key=row.__getitem__)


def heuristic_start(num_layers: int, n: int) -> int:
    check_block_size(n, num_layers)
    return max(num_layers - 1 - n, 0)


def choose_block(strategy: str, n: int, num_layers: int,
                 distance: list[list[float]] | None = None) -> list[int]:
    """The layer indices to drop for block size n under `strategy`."""
    if strategy not in STRATEGIES:
        raise LayerPruneError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "similarity":
        if distance is None:
            raise LayerPruneError("strategy 'similarity' needs distances (--distances DIR)")
        if len(distance) != num_layers:
            raise LayerPruneError(f"distances are for {len(distance)} layers but the model has "
                                  f"{num_layers}")
        start = similarity_start(distance, n)
    else:
        start = heuristic_start(num_layers, n)
    return list(range(start, start + n))


def block_from_start(start: int, n: int, num_layers: int) -> list[int]:
    check_block_size(n, num_layers)
    if not 0 <= start <= num_layers - n:
        raise LayerPruneError(f"start must be in 0..{num_layers - n} for n={n}, got {start}")
    return list(range(start, start + n))


def _per_layer_keys(config, num_layers: int) -> list[str]:
    keys = []
    for key, value in vars(config).items():
        is_list = isinstance(value, (list, tuple)) and len(value) == num_layers
        if is_list and (key in PER_LAYER_KEYS or key.endswith("layer_types")):
            keys.append(key)
    return keys


@contextlib.contextmanager
def removed_layers(model, drop: list[int]):
    """Within the block, `model` is the pruned model; on exit it is the original again."""
    restore = remove_layers(model, drop)
    try:
        yield model
    finally:
        restore()


def remove_layers(model, drop: list[int]):
    """Remove layers `drop` in place; returns a function that puts them back."""
    import torch.nn as nn

    owner, attr = layer_list_owner(model)
    layers = getattr(owner, attr)
    total = len(layers)
    if not drop or len(set(drop)) != len(drop) or not all(0 <= i < total for i in drop):
        raise LayerPruneError(f"layers to drop must be distinct indices in 0..{total - 1}, "
                              f"got {drop}")
    if len(drop) >= total:
        raise LayerPruneError("cannot drop every layer")
    keep = [i for i in range(total) if i not in set(drop)]
    config = model.config
    saved = {"num_hidden_layers": config.num_hidden_layers}
    for key in _per_layer_keys(config, total):
        saved[key] = getattr(config, key)
        setattr(config, key, type(saved[key])(saved[key][i] for i in keep))
    for key in LAYER_THRESHOLD_KEYS:
        if isinstance(getattr(config, key, None), int):
            saved[key] = getattr(config, key)
            setattr(config, key, sum(1 for i in keep if i < saved[key]))
    config.num_hidden_layers = len(keep)
    old_idx = _set_layer_idx(layers, {old: new for new, old in enumerate(keep)})
    setattr(owner, attr, nn.ModuleList([layers[i] for i in keep]))

    def restore() -> None:
        setattr(owner, attr, layers)
        for key, value in saved.items():
            setattr(config, key, value)
        for module, idx in old_idx:
            module.layer_idx = idx

    return restore


def _set_layer_idx(layers, new_index: dict[int, int]) -> list:
    """Renumber `layer_idx` on every submodule of the kept layers; return (module, old) pairs."""
    changed = []
    for old, layer in enumerate(layers):
        if old not in new_index:
            continue
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                changed.append((module, module.layer_idx))
                module.layer_idx = new_index[old]
    return changed


def model_card(source: str, drop: list[int], num_layers: int, info: dict) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, layer-pruning, prune-and-heal]",
        "---",
        f"# {Path(str(source)).name} with layers {drop[0]}..{drop[-1]} removed",
        "",
        "Pruned with [prune-and-heal](https://arxiv.org/abs/2403.17887) "
        "(Gromov et al. 2024, *The Unreasonable Ineffectiveness of the Deeper Layers*).",
        "",
        f"- source model: `{source}`",
        f"- removed layers: {drop} ({len(drop)} of {num_layers}, "
        f"{len(drop) / num_layers:.1%})",
    ]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def save_pruned(loaded, drop: list[int], out_dir: str | Path, info: dict | None = None) -> dict:
    """Save the pruned model as a standard checkpoint: safetensors, config, generation config,
    tokenizer, a model card (README.md) and `prune.json`. The write is atomic."""
    from layerprune.io import atomic_output_dir, write_json_atomic

    num_layers = loaded.model.config.num_hidden_layers
    record = {"source": loaded.ref, "source_fingerprint": loaded.fingerprint,
              "num_layers_before": num_layers, "removed_layers": drop,
              "num_layers_after": num_layers - len(drop), **(info or {})}
    with atomic_output_dir(out_dir) as tmp, removed_layers(loaded.model, drop):
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        extra = {k: v for k, v in record.items()
                 if k not in ("source", "removed_layers", "num_layers_before")}
        (Path(tmp) / "README.md").write_text(model_card(loaded.ref, drop, num_layers, extra))
        write_json_atomic(Path(tmp) / "prune.json", record)
    return record
