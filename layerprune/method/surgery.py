"""Checkpoint surgery: prune a safetensors checkpoint on disk without loading the model.

Each kept tensor's bytes are copied from the source file to the output file through a fixed
buffer, its name renumbered (`model.layers.7.` becomes `model.layers.5.`), the removed layers'
tensors skipped. Peak memory is the buffer, not the model; time is about a disk copy; dtypes and
values stay bit-identical. The config is rewritten by `layer_config.config_updates`, the same function
the in-memory view applies, so both paths agree on every per-layer field.

Why raw bytes rather than `safetensors.torch.save_file`: the library has no incremental writer
(`save_file` takes every tensor of a shard in memory at once). The file format is documented
(https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}} and the tensors' bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import struct
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.method import layer_config, prune
from layerprune.models.assets import resolve_ref
from layerprune.models.checkpoint_files import (
    INDEX_FILE,
    SINGLE_FILE,
    disk_dtype,
    read_header,
    shard_files,
)
from layerprune.models.loading import LAYER_PATHS, fingerprint, read_config
from layerprune.store.files import atomic_output_dir, write_json_atomic

# Files the output gets from elsewhere (rewritten config, new card and record, new index) or
# must not get (weights of other formats, e.g. Llama's original/*.pth, hold the unpruned model).
_REWRITTEN = ("config.json", "README.md", "prune.json", INDEX_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_COPY_CHUNK = 16 << 20  # bytes per read: large enough for disk speed, small next to any model
_INDEXED_NAME = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def applies(source: str, dtype: str | None = "auto") -> bool:
    """Whether `source` can be pruned by surgery: a local safetensors checkpoint, written in the
    dtype asked (`auto`/None: whatever is on disk)."""
    path = Path(resolve_ref(source))
    if not (path.is_dir() and (path / "config.json").is_file() and shard_files(path)):
        return False
    return dtype in (None, "auto") or disk_dtype(path) == dtype


def layer_prefix(names: list[str], num_layers: int) -> str:
    """The name prefix of the decoder layers' tensors (`model.layers`, `transformer.h`, `h`,
    `language_model.model.layers`, ...): the indexed prefix that is a path of
    `models.LAYER_PATHS`, its tail (a base model saved alone) or its components reordered (the
    legacy names transformers keeps on disk for multimodal wrappers)."""
    indices: dict[str, set[int]] = {}
    for name in names:
        m = _INDEXED_NAME.match(name)
        if m:
            indices.setdefault(m[1], set()).add(int(m[2]))

    def is_layer_path(prefix: str) -> bool:
        return any(prefix == path or path.endswith("." + prefix)
                   or sorted(prefix.split(".")) == sorted(path.split(".")) for path in LAYER_PATHS)

    found = [p for p in indices if is_layer_path(p)]
    if len(found) != 1:
        raise LayerPruneError(f"checkpoint: expected the decoder layers' tensors under one of "
                              f"{', '.join(LAYER_PATHS)}; found {found or 'none'} among "
                              f"{sorted(indices)}")
    if indices[found[0]] != set(range(num_layers)):
        raise LayerPruneError(f"checkpoint: tensors under {found[0]} are for layers "
                              f"{sorted(indices[found[0]])} but the config has {num_layers} layers")
    return found[0]


def _copy_shard(src: Path, dst: Path, entries: list[tuple[str, str]], header: dict,
                metadata: dict, data_start: int) -> tuple[int, int]:
    """Write `entries` [(new name, source name)] of `src` to `dst`; returns (bytes, parameters)."""
    out_header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for new, old in entries:
        begin, end = header[old]["data_offsets"]
        out_header[new] = {"dtype": header[old]["dtype"], "shape": header[old]["shape"],
                           "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so tensor data stays aligned
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(blob)) + blob)
        for _, old in entries:
            begin, end = header[old]["data_offsets"]
            fin.seek(data_start + begin)
            left = end - begin
            while left:
                chunk = fin.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise LayerPruneError(f"checkpoint: {src.name} is truncated (tensor {old})")
                fout.write(chunk)
                left -= len(chunk)
    return offset, sum(math.prod(header[old]["shape"]) for _, old in entries)


def prune_checkpoint(source: str, drop: list[int], out: str | Path,
                     info: dict | None = None) -> dict:
    """Write `source` (a local safetensors checkpoint) without layers `drop` to `out`, as
    `prune.save_pruned` would from the loaded model; returns `prune.json`. Atomic."""
    path = Path(resolve_ref(source))
    files = shard_files(path)
    if not files:
        raise LayerPruneError(f"model: {source!r} is not a safetensors checkpoint directory")
    config = read_config(str(path))
    text_config = layer_config.layer_config(config)
    num_layers = text_config.num_hidden_layers
    # Every check (drop, config fields, tensor names) happens before anything is written.
    updates = layer_config.config_updates(layer_config.config_values(text_config), drop, num_layers)
    headers = {name: read_header(path / name) for name in files}
    prefix = layer_prefix([n for h, _, _ in headers.values() for n in h], num_layers)
    new_index = {old: new for new, old in enumerate(layer_config.kept_layers(drop, num_layers))}
    record = prune.prune_record(source, fingerprint(source), num_layers, drop, info)
    weight_map: dict[str, str] = {}
    total_size = total_parameters = 0
    with atomic_output_dir(out) as tmp:
        shards = []
        for name in files:
            header, metadata, data_start = headers[name]
            entries = []
            for old in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
                m = _INDEXED_NAME.match(old)
                if m and m[1] == prefix:
                    if int(m[2]) not in new_index:
                        continue
                    entries.append((f"{prefix}.{new_index[int(m[2])]}.{m[3]}", old))
                else:
                    entries.append((old, old))
            if entries:  # a shard holding only removed layers disappears
                shards.append((name, entries, header, metadata, data_start))
        for k, (name, entries, header, metadata, data_start) in enumerate(shards, 1):
            out_name = (SINGLE_FILE if len(files) == 1
                        else f"model-{k:05d}-of-{len(shards):05d}.safetensors")
            size, parameters = _copy_shard(path / name, tmp / out_name, entries, header,
                                           metadata, data_start)
            total_size, total_parameters = total_size + size, total_parameters + parameters
            weight_map.update({new: out_name for new, _ in entries})
        if len(files) > 1:
            write_json_atomic(tmp / INDEX_FILE, {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items()))})
        layer_config.apply_config_updates(text_config, updates)
        _record_dtype(config, disk_dtype(path))
        config.save_pretrained(tmp)
        _copy_other_files(path, tmp, config)
        prune.write_card_and_record(tmp, record)
    return record


def _record_dtype(config, dtype: str | None) -> None:
    """Say `dtype` in the config and its sub-configs (text, vision), as `save_pretrained` does
    for a model loaded in that dtype; a checkpoint mixing dtypes keeps what its config says."""
    if dtype is None:
        return
    config.dtype = dtype
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if hasattr(sub, "to_dict"):
            sub.dtype = dtype


def _copy_other_files(path: Path, tmp: Path, config) -> None:
    """Tokenizer, generation config, chat template, ...: every top-level file but weights and
    the files written anew. A checkpoint without a generation config gets the one
    `save_pretrained` would write, derived from the model config."""
    for item in path.iterdir():
        if (item.is_file() and not item.name.startswith(".") and item.name not in _REWRITTEN
                and not item.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(item, tmp / item.name)
    if not (tmp / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(tmp)


def write_pruned(source: str, drop: list[int], out: str | Path, info: dict | None = None,
                 dtype: str | None = "auto", load=None, lock=None) -> dict:
    """Write the checkpoint of `source` without layers `drop` to `out`; returns `prune.json`.

    A local safetensors checkpoint is pruned by surgery (`prune_checkpoint`: tensors copied
    on disk, the model never loaded, its dtype kept) when `dtype` is `auto`/None or the dtype on
    disk. Otherwise (a GGUF file, a hub id, another dtype asked for) the model is loaded (`load()`,
    e.g. a model already in memory, by default `models.load_model(source, dtype)`) and saved,
    holding `lock` (a context manager) while its layer list is changed.
    """
    if applies(source, dtype):
        return prune_checkpoint(source, drop, out, info)
    if load is None:
        from layerprune.models.loading import load_model

        def load():
            return load_model(source, dtype or "auto")
    with lock or contextlib.nullcontext():
        return prune.save_pruned(load(), drop, out, info)
