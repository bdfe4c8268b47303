"""What removing decoder layers does to a model's config, decided in one place.

`config_updates` is a pure function of the config's values: the in-memory view
(`prune.removed_layers`) and checkpoint surgery (`surgery.prune_checkpoint`) both apply it, so
the two paths agree on every per-layer field (NOTES.md: transformers v5 refuses to save a config
whose per-layer lists disagree with num_hidden_layers). A field that looks layer-indexed and
that no rule here remaps is refused by name rather than written silently wrong.
"""

from __future__ import annotations

import reprlib

from layerprune.errors import LayerPruneError

# Config entries that hold one value per layer, besides any list named *layer_types.
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "activation_sparsity_pattern",
                  "sliding_window_layers", "layers_block_type", "layer_rope_theta",
                  "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
                  "attention_layers", "indexer_types")
# Config entries that list layer indices ("these layers are of kind A"): Qwen-MoE's dense layers,
# Llama-4's MoE layers, Mllama's cross-attention layers, LFM2's and Bamba's attention layers.
LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers", "cross_attention_layers", "full_attn_idxs",
                    "attn_layer_indices")
# Config entries that count layers from the bottom: "layers below k are of kind A".
LAYER_THRESHOLD_KEYS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")
# Entries whose names say "layer" but that index nothing a deletion changes: the config's
# __init__ reads them only to build a list above when that list is absent (and the pruned config
# always writes the list), or they describe multi-token-prediction layers outside the decoder
# stack (num_mtp_layers, num_nextn_predict_layers, mtp_*). decoder_sparse_step: see below.
LAYER_KEYS_INDEXING_NOTHING = ("num_hidden_layers", "decoder_sparse_step", "sliding_window_pattern",
                               "_sliding_window_pattern", "prefix_dense_sliding_window_pattern",
                               "no_rope_layer_interval", "interleave_moe_layer_step",
                               "global_attn_every_n_layers", "layer_group_size", "num_mtp_layers",
                               "num_nextn_predict_layers", "vocab_size_per_layer_input")
# Layer-indexed entries no config edit can remap; a model using them (value truthy) is refused.
UNSUPPORTED_KEYS = {
    "hidden_size_per_layer_input": "per-layer input embeddings (Gemma-3n, Gemma-4) are one tensor "
    "of width num_hidden_layers x hidden_size_per_layer_input; removing layers would need "
    "slicing it",
    "num_kv_shared_layers": "the last num_kv_shared_layers layers reuse the KV cache of earlier "
    "ones, a plan the model fixes when it is built",
}


def kept_layers(drop: list[int], num_layers: int) -> list[int]:
    """The layers that remain, in order; `drop` must be distinct indices leaving at least one."""
    if not drop or len(set(drop)) != len(drop) or not all(0 <= i < num_layers for i in drop):
        raise LayerPruneError(f"layers to drop must be distinct indices in 0..{num_layers - 1}, "
                              f"got {drop}")
    if len(drop) >= num_layers:
        raise LayerPruneError("cannot drop every layer")
    return [i for i in range(num_layers) if i not in set(drop)]


def layer_config(config):
    """The (sub-)config that describes the decoder stack: `text_config` of a multimodal wrapper
    (Gemma-3 4B+, Mistral-3, Llama-4), the config itself otherwise."""
    return config.get_text_config(decoder=True)


def config_values(config) -> dict:
    """The config's entries by their standard names (GPT-2's `n_layer` is `num_hidden_layers`)."""
    values = config.to_dict()
    for standard, own in getattr(config, "attribute_map", {}).items():
        values.pop(own, None)
        values[standard] = getattr(config, standard, None)
    return values


def _looks_layer_indexed(key: str, value, num_layers: int) -> bool:
    if value is None or isinstance(value, (bool, float, str, dict)):
        return False
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and ("layer" in key or (len(value) == num_layers
                                                      and not key.endswith("token_id")))
    return isinstance(value, int) and "layer" in key


def _sparse_step_updates(values: dict, keep: list[int]) -> dict:
    """Qwen2/3-MoE: layer i is sparse iff i is not in mlp_only_layers and (i+1) % step == 0 (the
    modeling code reads both when it builds each layer). Kept layers are no longer periodic, so
    the same choice is written out explicitly: step 1 and every kept dense layer listed."""
    step = values.get("decoder_sparse_step")
    if step in (None, 1) or not values.get("num_experts"):
        return {}  # step 1: only mlp_only_layers decides, renumbered as an index list
    if not isinstance(step, int) or step < 1 or "mlp_only_layers" not in values:
        raise LayerPruneError(f"config field decoder_sparse_step={step!r}: cannot be remapped "
                              "without mlp_only_layers (unknown model family)")
    dense = set(values["mlp_only_layers"] or [])
    return {"decoder_sparse_step": 1,
            "mlp_only_layers": [new for new, old in enumerate(keep)
                                if old in dense or (old + 1) % step != 0]}


def config_updates(values: dict, drop: list[int], num_layers: int) -> dict:
    """{config field: new value} after removing layers `drop` of `num_layers`, from the decoder
    config's `values` (`config_values`). Refuses, naming the field, anything that looks
    layer-indexed and that it cannot remap, rather than write a silently wrong config."""
    keep = kept_layers(drop, num_layers)
    new_index = {old: new for new, old in enumerate(keep)}
    for key, why in UNSUPPORTED_KEYS.items():
        if values.get(key):
            raise LayerPruneError(f"config field {key}={values[key]!r}: cannot remove layers "
                                  f"from this model: {why}")
    updates: dict = {}
    for key, value in values.items():
        if key in LAYER_KEYS_INDEXING_NOTHING or key.startswith("mtp_"):
            continue
        if (key in PER_LAYER_KEYS or key.endswith("layer_types")) and value is not None:
            if len(value) != num_layers:
                raise LayerPruneError(f"config field {key} has {len(value)} entries but the model "
                                      f"has {num_layers} layers")
            updates[key] = type(value)(value[i] for i in keep)
        elif key in LAYER_INDEX_KEYS and value is not None:
            updates[key] = type(value)(new_index[i] for i in value if i in new_index)
        elif key in LAYER_THRESHOLD_KEYS and isinstance(value, int):
            updates[key] = sum(1 for i in keep if i < value)
        elif key not in UNSUPPORTED_KEYS and _looks_layer_indexed(key, value, num_layers):
            raise LayerPruneError(f"config field {key}={reprlib.repr(value)} looks "
                                  "layer-indexed and layerprune does not know how to remap it "
                                  "when layers are removed; refusing rather than writing a wrong "
                                  "checkpoint")
    updates.update(_sparse_step_updates(values, keep))  # may replace mlp_only_layers
    updates["num_hidden_layers"] = len(keep)
    return updates


def apply_config_updates(config, updates: dict) -> dict:
    """Set `updates` on `config`; returns the previous values (to restore them)."""
    saved = {key: getattr(config, key, None) for key in updates}
    for key, value in updates.items():
        setattr(config, key, value)
    return saved
