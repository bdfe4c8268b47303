"""One typed function per CLI subcommand: refs and numbers in, files in an output directory out.

Each validates every argument first (cheap checks, no model loaded), then does the work in a
temporary directory that becomes `out` only when everything is written.
"""

from __future__ import annotations

from pathlib import Path

from layerprune import calibration, distances as dist, hidden_states, loss as loss_mod
from layerprune import prune as prune_mod
from layerprune.batching import PADDING_SIDES, pad_token_id
from layerprune.data import check_source
from layerprune.errors import LayerPruneError
from layerprune.io import atomic_output_dir, write_json_atomic
from layerprune.models import check_architecture, check_model_ref, load_model, resolve_dtype


def _check_common(model: str, dtype: str, batch_size: int) -> None:
    check_model_ref(model)
    resolve_dtype(dtype)
    if batch_size <= 0:
        raise LayerPruneError(f"batch_size must be a positive integer, got {batch_size}")


def distances(model: str, data: str, samples: int, seq_len: int, out: str,
              batch_size: int = 8, seed: int | None = None, padding_side: str = "right",
              text_field: str = "text", dtype: str = "float32", device: str = "cpu") -> dict:
    """Write `out/distances.json`, `out/heatmap.png` (and the calibration tokens)."""
    _check_common(model, dtype, batch_size)
    calibration.check_sizes(samples, seq_len)
    check_source(data)
    if padding_side not in PADDING_SIDES:
        raise LayerPruneError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    texts = calibration.sample_texts(data, samples, seed, text_field)
    check_architecture(model)
    loaded = load_model(model, dtype, device)
    with atomic_output_dir(out) as tmp:
        ids = calibration.tokenize(texts, loaded.tokenizer, seq_len)
        calibration.save_tokens(ids, tmp)
        states = hidden_states.last_token_states(
            loaded.model, ids, batch_size, padding_side,
            pad_token_id(loaded.tokenizer))
        doc = dist.compute(states, tmp, title=f"{Path(model).name}: {samples} samples")
    return doc


def prune(model: str, n: int, out: str, start: int | None = None, strategy: str | None = None,
          distances_dir: str | None = None, dtype: str = "float32") -> dict:
    """Remove a block of n layers and save a checkpoint in `out`; returns `prune.json`."""
    check_model_ref(model)
    resolve_dtype(dtype)
    if (start is None) == (strategy is None):
        raise LayerPruneError("give exactly one of start (--start) or strategy (--strategy)")
    num_layers = check_architecture(model)
    doc = None
    if strategy == "similarity":
        if distances_dir is None:
            raise LayerPruneError("strategy 'similarity' needs --distances DIR")
        if not (Path(distances_dir) / dist.DISTANCES_FILE).is_file():
            raise LayerPruneError(f"distances: no {dist.DISTANCES_FILE} in {distances_dir!r}")
        doc = dist.load(distances_dir)
    if strategy is not None:
        drop = prune_mod.choose_block(strategy, n, num_layers, doc["distance"] if doc else None)
    else:
        drop = prune_mod.block_from_start(start, n, num_layers)
    info = {"strategy": strategy or "manual", "block_size": n}
    if doc is not None:
        info["block_distance"] = doc["distance"][n - 1][drop[0]]
        info["calibration_samples"] = doc["n_samples"]
    loaded = load_model(model, dtype)
    return prune_mod.save_pruned(loaded, drop, out, info)


def loss(model: str, data: str, seq_len: int, out: str, samples: int | None = None,
         batch_size: int = 8, text_field: str = "text", dtype: str = "float32",
         device: str = "cpu") -> dict:
    """Write `out/loss.json` = {"loss": mean next-token cross-entropy, "tokens": k}."""
    _check_common(model, dtype, batch_size)
    calibration.check_sizes(samples if samples is not None else 1, seq_len)
    check_source(data)
    from layerprune.data import read_records

    texts = read_records(data, limit=samples, text_field=text_field)
    check_architecture(model)
    loaded = load_model(model, dtype, device)
    ids = calibration.tokenize(texts, loaded.tokenizer, seq_len)
    result = loss_mod.next_token_loss(loaded.model, loaded.tokenizer, ids, batch_size)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "loss.json", result)
    return result


def evaluate(model: str, tasks: list[str], out: str, data: str | None = None,
             seq_len: int = 256, limit: int | None = None, shots: int | None = None,
             samples: int | None = None, batch_size: int = 8, dtype: str = "float32",
             device: str = "cpu") -> dict:
    """Write `out/metrics.json` = {task: {"value", "stderr", "n", "metric", "baseline", ...}}."""
    from layerprune import benchmarks

    _check_common(model, dtype, batch_size)
    tasks = benchmarks.check_args(tasks, limit, shots, batch_size, data, seq_len, samples)
    check_architecture(model)
    loaded = load_model(model, dtype, device)
    metrics = benchmarks.evaluate(loaded.model, loaded.tokenizer, tasks, limit=limit, shots=shots,
                                  batch_size=batch_size, loss_data=data, loss_seq_len=seq_len,
                                  loss_samples=samples)
    Path(out).mkdir(parents=True, exist_ok=True)
    benchmarks.write_metrics(metrics, out)
    return metrics


def heal(model: str, data: str, out: str, steps: int, **config) -> dict:
    """QLoRA-heal a pruned checkpoint: `out/adapter/`, `out/merged/`, `out/heal.json`.

    `config` holds any other `layerprune.heal.HealConfig` field (rank, lr, targets, seq_len,
    batch_size, quant, ...); an interrupted run into the same `out` resumes.
    """
    from layerprune import heal as heal_mod

    return heal_mod.heal(model, data, out, {"steps": steps, **config})
