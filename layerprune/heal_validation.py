"""Every check of a heal request that can fail on bad input, run before anything is written,
loaded or trained: the checkpoint, the data, the method's teacher, and whether checkpoints
already in the checkpoint directory belong to this very request (else: refuse to resume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layerprune.assets import resolve_ref
from layerprune.data import check_source, read_records
from layerprune.errors import LayerPruneError
from layerprune.heal_checkpoints import newest_complete
from layerprune.io import check_output_dir
from layerprune.models import (check_architecture, check_context, check_model_ref,
                               check_weights, load_tokenizer, read_config)
from layerprune.prune import read_prune_record

METHODS = ("lora", "distill", "linear", "linear+distill")
TRAINED = ("lora", "distill", "linear+distill")  # the methods with an adapter and `steps`
TEACHER_USED = ("distill", "linear", "linear+distill")
PATCHED = ("linear", "linear+distill")  # the methods that need prune.json's removed layers


@dataclass
class Plan:
    """What validation found: the checkpoint path, its tokenizer, the packed training blocks and
    LoRA targets (training methods), the teacher (None for lora) and the resume request."""

    path: str
    tokenizer: object
    blocks: object
    targets: list[str] | None
    teacher: str | None
    request: dict


def resolve_model_dir(model_dir: str) -> str:
    check_model_ref(model_dir)
    path = resolve_ref(model_dir)
    if not (Path(path) / "config.json").is_file():
        raise LayerPruneError(f"model_dir: {model_dir!r} must be a Hugging Face checkpoint "
                              "directory (e.g. written by prune); GGUF files and hub ids are "
                              "not healed directly")
    return path


def _vocab(config) -> int | None:
    return getattr(config.get_text_config(decoder=True), "vocab_size", None)


def resolve_teacher(method: str, teacher: str | None, prune: dict | None, model_config,
                    seq_len: int) -> str | None:
    """The teacher `method` uses (None for lora): `teacher`, else prune.json's source; checked
    to be the unpruned model (num_layers_before layers), with the student's vocabulary and a
    context of seq_len tokens."""
    if method not in TEACHER_USED:
        return None
    if method in PATCHED and prune is None:
        raise LayerPruneError(f"model_dir: method {method!r} needs the pruned checkpoint's "
                              "prune.json (which layers were removed: the patch replaces them); "
                              "heal the --out directory of `layerprune prune`")
    if method in PATCHED:  # refused here, before anything is written, not mid-run
        from layerprune.linear_fit import check_runs

        check_runs(prune["removed_layers"], prune["num_layers_before"])
    ref = teacher if teacher is not None else (prune or {}).get("source")
    if not ref or not isinstance(ref, str):
        raise LayerPruneError(f"teacher: method {method!r} needs a teacher (the unpruned model); "
                              "give teacher (--teacher), or a model_dir whose prune.json names "
                              "its source")
    check_model_ref(ref)
    check_weights(ref)
    layers = check_architecture(ref)
    before = (prune or {}).get("num_layers_before")
    if before is not None and layers != before:
        raise LayerPruneError(f"teacher: {ref!r} has {layers} decoder layers, but prune.json "
                              f"says the pruned model was cut from one of {before} "
                              "(num_layers_before); the teacher must be the unpruned source")
    theirs, ours = _vocab(read_config(ref)), _vocab(model_config)
    if theirs != ours:
        raise LayerPruneError(f"teacher: {ref!r} has a vocabulary of {theirs} tokens, the pruned "
                              f"model {ours}; the teacher must share the student's tokenizer")
    check_context(ref, seq_len, "seq_len")
    return ref


def validate(model_dir: str, data: str, out_dir: Path, cfg, method: str, teacher: str | None,
             resume: bool, ckpt_dir: Path, keyed_config: dict) -> Plan:
    """Every check that can fail on bad input, before anything is written or trained.
    `keyed_config`: the config fields that change the result (what must match to resume)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.heal_training import pack, target_modules

    path = resolve_model_dir(model_dir)
    check_source(data)
    check_output_dir(out_dir, "out_dir")
    model_cfg = read_config(path)
    max_pos = getattr(model_cfg, "max_position_embeddings", None) or getattr(
        model_cfg, "n_positions", None)
    if max_pos and cfg.seq_len > max_pos:
        raise LayerPruneError(f"seq_len must be <= {max_pos} (the model's context), "
                              f"got {cfg.seq_len}")
    teacher = resolve_teacher(method, teacher, read_prune_record(path, "model_dir"), model_cfg,
                              cfg.seq_len)
    tokenizer = load_tokenizer(path)
    targets = blocks = None
    if method in PATCHED and not read_records(data, limit=1, text_field=cfg.text_field):
        raise LayerPruneError(f"data: {data!r} holds no records to fit the linear patch on")
    if method in TRAINED:
        with init_empty_weights():  # structure only, no memory: finds the target modules now
            targets = target_modules(AutoModelForCausalLM.from_config(model_cfg), cfg.targets)
        blocks = pack(data, tokenizer, cfg)
    # What must match for a checkpoint to be resumed (checkpointing settings may change).
    request = {"model_dir": path, "data": data, "method": method, "teacher": teacher,
               "config": keyed_config}
    # Not transformers' get_last_checkpoint: it returns a checkpoint cut short by a kill.
    last = newest_complete(ckpt_dir) if resume and method in TRAINED else None
    saved = ckpt_dir / "request.json"
    if last and (not saved.is_file() or json.loads(saved.read_text()) != request):
        raise LayerPruneError(f"out_dir: {str(out_dir)!r} holds checkpoints of a different heal "
                              "run (model, data, method, teacher or config differ); use "
                              "resume=False or another out_dir")
    return Plan(path, tokenizer, blocks, targets, teacher, request)
