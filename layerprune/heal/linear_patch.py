"""Heal method `linear`: patch a pruned checkpoint on disk with the least-squares map of
`layerprune.heal.linear_fit`, fitted on the unpruned source's activations, and save a standard
checkpoint (the map folded into the last kept layer's weights) that plain transformers loads.

`heal.validation.check_patch_request` makes every check that can fail on bad input before any
model loads (heal() makes it once, in its own validation, and hands the result on);
`patch_checkpoint` then loads the source (or `teacher`) and the pruned model, fits, folds and
writes `out_dir` atomically, with `linear_patch.json` saying what was fitted.
"""

from __future__ import annotations

import shutil
import time
from typing import Callable

from layerprune.heal.linear_fit import fit_linear_patch, fold_patches
from layerprune.heal.validation import PatchRequest, check_patch_request
from layerprune.method.batching import pad_token_id, resolve_batch_size
from layerprune.store.files import atomic_output_dir, write_json_atomic

PATCH_FILE = "linear_patch.json"


def patch_checkpoint(model_dir: str, data: str, out_dir: str, samples: int, seq_len: int,
                     teacher: str | None = None, text_field: str = "text", batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None,
                     request: PatchRequest | None = None) -> dict:
    """Fit the patch of the pruned checkpoint `model_dir` (its source, or `teacher`, from
    prune.json) on the first `samples` records of `data` cut to `seq_len` tokens, fold it and
    save a standard checkpoint in `out_dir` (atomic) with `linear_patch.json`; returns that.
    `request`: the result of `check_patch_request` for these very arguments, when the caller
    has checked them already (heal's validation); None: checked here."""
    from transformers import AutoModelForCausalLM

    from layerprune.method.calibration import tokenize
    from layerprune.models.loading import load_model, load_tokenizer

    batch_size = resolve_batch_size(batch_size)  # a positive int ("auto": the device's best)
    path, record, ref, texts, revision = request or check_patch_request(
        model_dir, data, out_dir, samples, seq_len, teacher, text_field)
    drop = record["removed_layers"]
    source = load_model(ref, "float32", revision=revision)  # a hub source: its pruned commit
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
