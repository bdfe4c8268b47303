"""Calibration sampling: text records -> a fixed set of token-id sequences, stored as safetensors.

Every later stage reads these ids, not the text, so a rerun (or another worker) sees exactly the
same tokens. Each record is tokenized on its own with the tokenizer's defaults (`tokenizer(text)`)
and truncated to its first `seq_len` tokens. Without a seed the first `samples` records are used;
with a seed, `samples` records drawn without replacement in a seeded order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from layerprune.errors import LayerPruneError
from layerprune.method.data import read_records

TOKENS_FILE = "tokens.safetensors"


def check_sizes(samples: int, seq_len: int) -> None:
    if samples <= 0:
        raise LayerPruneError(f"samples must be a positive integer, got {samples}")
    if seq_len <= 1:
        raise LayerPruneError(f"seq_len must be an integer >= 2, got {seq_len}")


def sample_texts(source: str, samples: int, seed: int | None = None,
                 text_field: str = "text") -> list[str]:
    check_sizes(samples, 2)
    if seed is None:
        texts = read_records(source, limit=samples, text_field=text_field)
    else:
        pool = read_records(source, text_field=text_field)
        order = np.random.default_rng(seed).permutation(len(pool))
        texts = [pool[i] for i in order[:samples]]
    if len(texts) < samples:
        raise LayerPruneError(
            f"samples={samples} but data {source!r} has only {len(texts)} records"
        )
    return texts


def tokenize(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    ids = []
    for i, text in enumerate(texts):
        row = tokenizer(text)["input_ids"][:seq_len]
        if not row:
            raise LayerPruneError(f"data: record {i + 1} tokenizes to no tokens")
        ids.append(list(row))
    return ids


def save_tokens(ids: list[list[int]], out_dir: str | Path) -> Path:
    """Ragged sequences as one flat int64 tensor plus offsets (safetensors has no ragged type)."""
    lengths = torch.tensor([len(r) for r in ids], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    flat = torch.tensor([t for r in ids for t in r], dtype=torch.int64)
    path = Path(out_dir) / TOKENS_FILE
    save_file({"input_ids": flat, "offsets": offsets}, str(path))
    return path


def load_tokens(path: str | Path) -> list[list[int]]:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENS_FILE
    t = load_file(str(path))
    flat, offsets = t["input_ids"].tolist(), t["offsets"].tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def build(source: str, tokenizer, samples: int, seq_len: int, out_dir: str | Path,
          seed: int | None = None, text_field: str = "text") -> dict:
    """Sample, tokenize and store calibration tokens in `out_dir`; returns small metadata."""
    check_sizes(samples, seq_len)
    ids = tokenize(sample_texts(source, samples, seed, text_field), tokenizer, seq_len)
    save_tokens(ids, out_dir)
    lengths = [len(r) for r in ids]
    return {"samples": len(ids), "tokens": sum(lengths), "max_len": max(lengths),
            "min_len": min(lengths)}
