"""Choose n layers and remove them, fixing everything a deletion touches.

Strategies (`choose_layers`; the scores they read come from `layerprune.method.criteria`):
- `similarity` (Gromov et al. 2024): l*(n) = argmin_l d(x^(l), x^(l+n)); drop l*..l*+n-1.
- `heuristic`:  drop the n deepest layers but keep the last one: layers L-1-n..L-2.
- `block-influence` (ShortGPT): the n layers of least influence, contiguous or not.
- `greedy-loss` (SLEB, BlockPruner): the first n layers of the greedy removal order.
- `random`: a seeded contiguous block, the baseline (`random_blocks`).

Removing layers touches more than the ModuleList (NOTES.md): each attention module's `layer_idx`
(the KV cache is indexed by it; a stale one breaks `generate`) and the config. What a deletion
does to a config is decided in one place, `layer_config.config_updates` (a pure function of the config's
values), which both the in-memory view (`removed_layers`, so one loaded model serves every
variant) and checkpoint surgery (`layerprune.method.surgery`, tensors on disk to tensors on disk) apply.
`surgery.write_pruned` writes a pruned checkpoint by whichever of the two fits the source.
"""

from __future__ import annotations

import contextlib
import math
import random
import reprlib
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.method.layer_config import (
    apply_config_updates,
    config_updates,
    config_values,
    kept_layers,
    layer_config,
)
from layerprune.models.loading import decoder_layers, layer_list_owner

STRATEGIES = ("similarity", "heuristic", "block-influence", "greedy-loss", "random")
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


# Seeds name blocks of a short baseline list (the flow draws 2..100); the bound keeps
# `random_blocks(L, n, seed + 1)` small whatever the input.
MAX_SEED = 9999


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LayerPruneError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")


def random_blocks(num_layers: int, n: int, k: int, seed: int = 0) -> list[list[int]]:
    """k contiguous blocks of n layers, their starts drawn uniformly from 0..L-n without
    replacement (distinct while k <= L-n+1; past that the draw starts over), in a seeded order.
    The first k blocks of a seed do not depend on k, so `k` more blocks extend the same list."""
    check_block_size(n, num_layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SEED + 1:
        raise LayerPruneError(f"k (number of random blocks) must be an integer in "
                              f"1..{MAX_SEED + 1}, got {k!r}")
    check_seed(seed)
    rng, starts = random.Random(seed), []
    while len(starts) < k:
        draw = list(range(num_layers - n + 1))
        rng.shuffle(draw)
        starts += draw
    return [list(range(start, start + n)) for start in starts[:k]]


def least_influential(influence: list[float], n: int) -> list[int]:
    """The n layers of smallest block influence (ties: the shallower one), sorted."""
    check_block_size(n, len(influence))
    return sorted(sorted(range(len(influence)), key=lambda i: (influence[i], i))[:n])


def choose_layers(strategy: str, n: int, num_layers: int, *,
                  distance: list[list[float]] | None = None, influence: list[float] | None = None,
                  greedy_order: list[int] | None = None, seed: int = 0) -> list[int]:
    """The layer indices (sorted) to drop for n under `strategy`; each strategy reads one input
    and ignores the others: similarity `distance` (distances.json), block-influence
    `influence` (`criteria.block_influence`), greedy-loss `greedy_order` (the "order" of
    `criteria.greedy_loss_order`, at least n long), random `seed`: seed s is the s-th block of
    `random_blocks(L, n, s + 1)`, so seeds 0..k-1 are k distinct blocks (while k <= L-n+1)."""
    if strategy not in STRATEGIES:
        raise LayerPruneError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_block_size(n, num_layers)
    if strategy == "similarity":
        if distance is None:
            raise LayerPruneError("strategy 'similarity' needs distances (--distances DIR)")
        if len(distance) != num_layers:
            raise LayerPruneError(f"strategy 'similarity': distances are for {len(distance)} "
                                  f"layers but the model has {num_layers}")
        start = similarity_start(distance, n)
        return list(range(start, start + n))
    if strategy == "heuristic":
        start = heuristic_start(num_layers, n)
        return list(range(start, start + n))
    if strategy == "block-influence":
        if (influence is None or len(influence) != num_layers
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in influence)):
            got = "none" if influence is None else f"{len(influence)} values"
            raise LayerPruneError(f"strategy 'block-influence' needs influence scores, one "
                                  f"finite number per layer ({num_layers}), got {got}")
        return least_influential(list(influence), n)
    if strategy == "greedy-loss":
        if greedy_order is None or len(greedy_order) < n:
            got = "none" if greedy_order is None else f"{len(greedy_order)} layers"
            raise LayerPruneError(f"strategy 'greedy-loss' needs a greedy removal order of at "
                                  f"least n={n} layers, got {got}")
        if (len(set(greedy_order)) != len(greedy_order)
                or not all(isinstance(i, int) and 0 <= i < num_layers for i in greedy_order)):
            raise LayerPruneError(f"strategy 'greedy-loss': the removal order must hold distinct "
                                  f"layer indices in 0..{num_layers - 1}, got {greedy_order}")
        return sorted(greedy_order[:n])
    check_seed(seed)
    return random_blocks(num_layers, n, seed + 1)[seed]


def runs_of(drop: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive layers in `drop`, in order: [3, 7, 8] -> [[3], [7, 8]]."""
    runs: list[list[int]] = []
    for i in sorted(drop):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def describe_layers(drop: list[int]) -> str:
    """Layers as runs: [12..17] -> "12-17", [3, 7, 9] -> "3,7,9", [3, 4, 5, 9] -> "3-5,9"."""
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs_of(drop))


def block_from_start(start: int, n: int, num_layers: int) -> list[int]:
    check_block_size(n, num_layers)
    if not 0 <= start <= num_layers - n:
        raise LayerPruneError(f"start must be in 0..{num_layers - n} for n={n}, got {start}")
    return list(range(start, start + n))


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
    keep = kept_layers(drop, len(layers))
    config = layer_config(model.config)
    if config.num_hidden_layers != len(layers):  # e.g. multi-token-prediction layers appended
        raise LayerPruneError(f"the model holds {len(layers)} layers in its decoder list but its "
                              f"config says num_hidden_layers={config.num_hidden_layers}")
    updates = config_updates(config_values(config), drop, len(layers))
    saved = apply_config_updates(config, updates)
    old_idx = _set_layer_idx(layers, {old: new for new, old in enumerate(keep)})
    setattr(owner, attr, nn.ModuleList([layers[i] for i in keep]))

    def restore() -> None:
        setattr(owner, attr, layers)
        apply_config_updates(config, saved)
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
        f"# {Path(str(source)).name} with layers {describe_layers(drop)} removed",
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


def prune_record(source: str, source_fingerprint: str, num_layers: int, drop: list[int],
                 info: dict | None = None, source_revision: str | None = None) -> dict:
    """What `prune.json` says about a pruned checkpoint. `source_revision`: the commit a hub
    source was loaded at, so that its teacher is loaded at that very commit (heal.validation)."""
    return {"source": source, "source_fingerprint": source_fingerprint,
            **({"source_revision": source_revision} if source_revision else {}),
            "num_layers_before": num_layers, "removed_layers": drop,
            "num_layers_after": num_layers - len(drop), **(info or {})}


def read_prune_record(checkpoint: str | Path, name: str = "model") -> dict | None:
    """A pruned checkpoint's `prune.json`, checked to hold what every reader needs (`source`,
    `num_layers_before`, a non-empty `removed_layers`); None when the directory has none.
    `name`: the parameter the checkpoint came in as, for the error message."""
    from layerprune.store.files import read_json

    file = Path(checkpoint) / "prune.json"
    if not file.is_file():
        return None
    try:
        record = read_json(file)
    except ValueError as e:
        raise LayerPruneError(f"{name}: {str(file)!r} is not a valid prune record (not JSON: "
                              f"{e})") from None
    if not (isinstance(record, dict) and isinstance(record.get("source"), str)
            and isinstance(record.get("num_layers_before"), int)
            and isinstance(record.get("removed_layers"), list) and record["removed_layers"]
            and all(isinstance(i, int) for i in record["removed_layers"])):
        raise LayerPruneError(f"{name}: {str(file)!r} is not a valid prune record: it must hold "
                              "'source' (a model), 'num_layers_before' (an integer) and "
                              "'removed_layers' (a non-empty list of layer indices); got "
                              f"{reprlib.repr(record)}")
    return record


def write_card_and_record(out_dir: str | Path, record: dict) -> None:
    """The model card (README.md) and `prune.json` of a pruned checkpoint."""
    from layerprune.store.files import write_json_atomic

    extra = {k: v for k, v in record.items()
             if k not in ("source", "removed_layers", "num_layers_before")}
    card = model_card(record["source"], record["removed_layers"], record["num_layers_before"],
                      extra)
    (Path(out_dir) / "README.md").write_text(card)
    write_json_atomic(Path(out_dir) / "prune.json", record)


def save_pruned(loaded, drop: list[int], out_dir: str | Path, info: dict | None = None) -> dict:
    """Save the in-memory model, pruned, as a standard checkpoint: safetensors, config,
    generation config, tokenizer, a model card (README.md) and `prune.json`. Atomic."""
    from layerprune.store.files import atomic_output_dir

    num_layers = len(decoder_layers(loaded.model))
    record = prune_record(loaded.ref, loaded.fingerprint, num_layers, drop, info,
                          getattr(loaded, "revision", None))
    with atomic_output_dir(out_dir) as tmp, removed_layers(loaded.model, drop):
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_card_and_record(tmp, record)
    return record
