"""Heal method `linear`: patch a pruned checkpoint on disk with the least-squares map of
`layerprune.linear_fit`, fitted on the unpruned source's activations, and save a standard
checkpoint (the map folded into the last kept layer's weights) that plain transformers loads.

`check_request` makes every check that can fail on bad input before any model loads;
`patch_checkpoint` then loads the source (or `teacher`) and the pruned model, fits, folds and
writes `out_dir` atomically, with `linear_patch.json` saying what was fitted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from layerprune.batching import pad_token_id, resolve_batch_size
from layerprune.errors import LayerPruneError
from layerprune.io import atomic_output_dir, check_output_dir, write_json_atomic
from layerprune.linear_fit import check_runs, fit_linear_patch, fold_patches, output_projection
from layerprune.models import decoder_layers
from layerprune.prune import layer_config, read_prune_record

PATCH_FILE = "linear_patch.json"


def check_request(model_dir: str, data: str, out_dir: str, samples: int, seq_len: int,
                  teacher: str | None, text_field: str) -> tuple[Path, dict, str, list[str]]:
    """Every check that can fail on bad input, before any model is loaded or anything written;
    returns (model_dir path, prune.json, the reference model, the calibration texts)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.assets import resolve_ref
    from layerprune.calibration import check_sizes, sample_texts
    from layerprune.data import check_source
    from layerprune.models import (check_context, check_model_ref, check_tokenizer,
                                   check_weights, read_config)

    check_model_ref(model_dir)
    path = Path(resolve_ref(model_dir))
    if not (path / "config.json").is_file():
        raise LayerPruneError(f"model_dir: {model_dir!r} must be a checkpoint directory written "
                              "by `layerprune prune`")
    record = read_prune_record(path, "model_dir")
    if record is None:
        raise LayerPruneError(f"model_dir: {model_dir!r} has no prune.json; method linear needs "
                              "a checkpoint written by `layerprune prune` (it names the source "
                              "model and the removed layers)")
    drop, before = record["removed_layers"], record["num_layers_before"]
    runs = check_runs(drop, before)
    check_output_dir(out_dir, "out_dir")
    if Path(out_dir).resolve() == path.resolve():
        raise LayerPruneError("out_dir must differ from model_dir (the pruned checkpoint is kept "
                              "as it was)")
    check_sizes(samples, seq_len)
    check_source(data)
    ref = teacher or record["source"]
    what = "teacher" if teacher else f"the source named in {model_dir}/prune.json"
    try:
        check_model_ref(ref)
        source_cfg = layer_config(read_config(ref))
    except LayerPruneError as e:
        raise LayerPruneError(f"{e} ({what}; --teacher SOURCE names another)") from None
    pruned_cfg = layer_config(read_config(str(path)))
    if source_cfg.num_hidden_layers != before:
        raise LayerPruneError(f"teacher: {ref!r} has {source_cfg.num_hidden_layers} layers but "
                              f"prune.json says the source had num_layers_before={before}")
    if pruned_cfg.num_hidden_layers != before - len(drop):
        raise LayerPruneError(f"model_dir: {model_dir!r} has {pruned_cfg.num_hidden_layers} "
                              f"layers; prune.json says {before} minus {len(drop)} removed")
    for field in ("hidden_size", "vocab_size"):
        if getattr(source_cfg, field) != getattr(pruned_cfg, field):
            raise LayerPruneError(f"teacher: {ref!r} has {field}={getattr(source_cfg, field)}, "
                                  f"the pruned model {getattr(pruned_cfg, field)}; it must be "
                                  "the model the checkpoint was pruned from")
    check_context(ref, seq_len)
    check_weights(str(path))
    check_tokenizer(ref)
    with init_empty_weights():  # structure only: an MLP the patch cannot fold into fails here
        shell = AutoModelForCausalLM.from_config(read_config(str(path)))
    for run in runs:
        new = run[0] - 1 - sum(1 for i in drop if i < run[0])
        output_projection(decoder_layers(shell)[new], pruned_cfg.hidden_size,
                          f"layer {run[0] - 1}")
    return path, record, ref, sample_texts(data, samples, text_field=text_field)


def patch_checkpoint(model_dir: str, data: str, out_dir: str, samples: int, seq_len: int,
                     teacher: str | None = None, text_field: str = "text", batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Fit the patch of the pruned checkpoint `model_dir` (its source, or `teacher`, from
    prune.json) on the first `samples` records of `data` cut to `seq_len` tokens, fold it and
    save a standard checkpoint in `out_dir` (atomic) with `linear_patch.json`; returns that."""
    from transformers import AutoModelForCausalLM

    from layerprune.calibration import tokenize
    from layerprune.models import load_model, load_tokenizer

    batch_size = resolve_batch_size(batch_size)  # a positive int ("auto": the device's best)
    path, record, ref, texts = check_request(model_dir, data, out_dir, samples, seq_len, teacher,
                                         text_field)
    drop = record["removed_layers"]
    source = load_model(ref, "float32")
    ids = tokenize(texts, source.tokenizer, seq_len)
    start = time.perf_counter()
    patches = fit_linear_patch(source.model, drop, ids, batch_size,
                               pad_token_id(source.tokenizer), progress)
    fit_seconds = time.perf_counter() - start
    del source  # the teacher is not needed beside the pruned model
    pruned = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    fold_patches(pruned, drop, patches)
    result = {"method": "linear", "source": ref, "model_dir": str(model_dir), "data": data,
              "samples": len(ids), "seq_len": seq_len, "tokens": sum(map(len, ids)),
              "fit_seconds": round(fit_seconds, 3),
              "runs": [{"layer": p["layer"],
                        "layer_after_pruning": p["layer"] - sum(1 for i in drop if i < p["layer"]),
                        "removed": p["removed"], "rows": p["rows"],
                        "residual_before": p["residual_before"],
                        "residual_after": p["residual_after"]} for p in patches]}
    with atomic_output_dir(out_dir, "out_dir") as tmp:
        pruned.save_pretrained(tmp)
        load_tokenizer(str(path)).save_pretrained(tmp)
        shutil.copy(path / "prune.json", tmp / "prune.json")
        card = path / "README.md"
        text = card.read_text() if card.is_file() else "---\nlibrary_name: transformers\n---\n"
        (tmp / "README.md").write_text(text.rstrip("\n") + "\n\n" + patch_card(result))
        write_json_atomic(tmp / PATCH_FILE, result)
    return result


def patch_card(result: dict) -> str:
    lines = ["## Linear patch", "",
             "Training-free (ReplaceMe, NeurIPS 2025): for each removed run of layers, a d x d map "
             "fitted by least squares on the unpruned model's activations (the last kept layer's "
             "feed-forward output mapped onto what the removed layers would have added) and "
             "folded into that layer's feed-forward output projection.", "",
             f"- fitted on: `{result['data']}`, {result['samples']} records x up to "
             f"{result['seq_len']} tokens, activations of `{result['source']}` "
             f"({result['fit_seconds']:.1f} s)"]
    lines += [f"- layers {r['removed'][0]}..{r['removed'][-1]} removed: patch in layer "
              f"{r['layer']} (now {r['layer_after_pruning']}), {r['rows']:,} token rows, relative "
              f"fit residual {r['residual_before']:.3f} -> {r['residual_after']:.3f}"
              for r in result["runs"]]
    return "\n".join(lines) + "\n"
