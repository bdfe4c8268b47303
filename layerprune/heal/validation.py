"""Every check of a heal request that can fail on bad input, run before anything is written,
loaded or trained: the checkpoint, the data, the method's teacher, and whether checkpoints
already in the checkpoint directory belong to this very request (else: refuse to resume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from layerprune.errors import LayerPruneError
from layerprune.heal.checkpoints import newest_complete
from layerprune.heal.config import PATCHED, TEACHER_USED, TRAINED
from layerprune.method.data import check_source, read_records
from layerprune.method.layer_config import layer_config
from layerprune.method.prune import read_prune_record
from layerprune.models.assets import resolve_ref
from layerprune.models.loading import (
    check_architecture,
    check_context,
    check_model_ref,
    check_tokenizer,
    check_weights,
    decoder_layers,
    load_tokenizer,
    read_config,
)
from layerprune.store.files import check_output_dir


class PatchRequest(NamedTuple):
    """A checked linear patch request: the pruned checkpoint, its prune.json, the teacher whose
    activations are fitted, and the calibration texts."""

    path: Path
    record: dict
    teacher: str
    texts: list[str]
    teacher_revision: str | None = None  # the commit a hub teacher loads at (teacher_revision)


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
    patch: PatchRequest | None = None  # the linear patch's checked request (PATCHED methods)
    teacher_revision: str | None = None  # the commit a hub teacher loads at


def check_pruned_checkpoint(model: str) -> None:
    """`layerprune heal` heals what `layerprune prune` wrote: a checkpoint directory with its
    `prune.json`, whose layer count matches the config. (The library's `heal.heal` takes any
    checkpoint: fine-tuning an unpruned model is legitimate there, but on the command line it
    is almost always the wrong directory, e.g. the source model instead of the pruned one.)"""
    check_model_ref(model)
    check_weights(model)
    path = Path(model)
    if not path.is_dir():
        raise LayerPruneError(f"model: {model!r} is not a pruned checkpoint directory; heal "
                              "takes the --out directory of `layerprune prune`")
    doc = read_prune_record(path)
    if doc is None:
        raise LayerPruneError(f"model: {model!r} is not a pruned checkpoint (no prune.json); "
                              "heal takes the --out directory of `layerprune prune`")
    removed, after, record = doc["removed_layers"], doc.get("num_layers_after"), \
        path / "prune.json"
    layers = layer_config(read_config(model)).num_hidden_layers
    if after is not None and after != layers:
        raise LayerPruneError(f"model: {str(record)!r} says {after} layers remain after removing "
                              f"{len(removed)}, but the checkpoint's config has {layers}: "
                              "prune.json does not belong to these weights")
    check_tokenizer(model)


def resolve_model_dir(model_dir: str) -> str:
    check_model_ref(model_dir)
    path = resolve_ref(model_dir)
    if not (Path(path) / "config.json").is_file():
        raise LayerPruneError(f"model_dir: {model_dir!r} must be a Hugging Face checkpoint "
                              "directory (e.g. written by prune); GGUF files and hub ids are "
                              "not healed directly")
    return path


def teacher_revision(teacher: str | None, record: dict | None) -> str | None:
    """The commit the teacher loads at: prune.json's `source_revision` (the commit a hub source
    was loaded at when it was pruned) when the teacher is that source; None otherwise (a local
    model, or a teacher named on its own, loaded as named)."""
    record = record or {}
    return record.get("source_revision") if teacher in (None, record.get("source")) else None


def check_teacher(ref: str, record: dict | None, student_config, seq_len: int,
                  what: str = "teacher", revision: str | None = None) -> None:
    """The one check of a teacher (the unpruned model that distillation matches and whose
    activations the linear patch fits): a model with its weights and tokenizer, of the depth
    prune.json's `num_layers_before` says, with the student's width and vocabulary, and a
    context of `seq_len` tokens. `what` names where `ref` came from, for the message."""
    try:
        check_model_ref(ref)
    except LayerPruneError as e:
        raise LayerPruneError(f"{e} ({what}; --teacher SOURCE names another)") from None
    check_weights(ref)
    layers = check_architecture(ref, revision=revision)
    before = (record or {}).get("num_layers_before")
    if before is not None and layers != before:
        raise LayerPruneError(f"teacher: {ref!r} has {layers} decoder layers, but prune.json "
                              f"says the pruned model was cut from one of {before} "
                              "(num_layers_before); the teacher must be the unpruned source")
    theirs, ours = read_config(ref, revision=revision).get_text_config(decoder=True), \
        student_config.get_text_config(decoder=True)
    for field, why in (("vocab_size", "share the student's tokenizer"),
                       ("hidden_size", "be the model the checkpoint was pruned from")):
        if getattr(theirs, field, None) != getattr(ours, field, None):
            raise LayerPruneError(f"teacher: {ref!r} has {field}={getattr(theirs, field, None)}, "
                                  f"the pruned model {getattr(ours, field, None)}; the teacher "
                                  f"must {why}")
    check_context(ref, seq_len, "seq_len", revision=revision)
    check_tokenizer(ref, revision=revision)


def resolve_teacher(method: str, teacher: str | None, prune: dict | None, model_config,
                    seq_len: int) -> str | None:
    """The teacher `method` uses (None for lora): `teacher`, else prune.json's source, checked
    by `check_teacher`."""
    if method not in TEACHER_USED:
        return None
    if method in PATCHED and prune is None:
        raise LayerPruneError(f"model_dir: method {method!r} needs the pruned checkpoint's "
                              "prune.json (which layers were removed: the patch replaces them); "
                              "heal the --out directory of `layerprune prune`")
    ref = teacher if teacher is not None else (prune or {}).get("source")
    if not ref or not isinstance(ref, str):
        raise LayerPruneError(f"teacher: method {method!r} needs a teacher (the unpruned model); "
                              "give teacher (--teacher), or a model_dir whose prune.json names "
                              "its source")
    check_teacher(ref, prune, model_config, seq_len,
                  "teacher" if teacher is not None else "the source named in prune.json",
                  teacher_revision(teacher, prune))
    return ref


def check_patch_request(model_dir: str, data: str, out_dir: str | Path, samples: int, seq_len: int,
                        teacher: str | None, text_field: str) -> PatchRequest:
    """Every check of a linear patch request that can fail on bad input, before any model is
    loaded or anything written (`heal.linear_patch.patch_checkpoint` applies it)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.heal.linear_fit import check_runs, output_projection
    from layerprune.method.calibration import check_sizes, sample_texts

    check_model_ref(model_dir)
    path = Path(resolve_ref(model_dir))
    if not (path / "config.json").is_file():
        raise LayerPruneError(f"model_dir: {model_dir!r} must be a checkpoint directory written "
                              "by `layerprune prune`")
    record = read_prune_record(path, "model_dir")
    if record is None:
        raise LayerPruneError(f"model_dir: {model_dir!r} has no prune.json; the linear patch "
                              "needs a checkpoint written by `layerprune prune` (it names the "
                              "source model and the removed layers)")
    drop, before = record["removed_layers"], record["num_layers_before"]
    runs = check_runs(drop, before)
    check_output_dir(out_dir, "out_dir")
    if Path(out_dir).resolve() == path.resolve():
        raise LayerPruneError("out_dir must differ from model_dir (the pruned checkpoint is kept "
                              "as it was)")
    check_sizes(samples, seq_len)
    check_source(data)
    ref = teacher or record["source"]
    pruned = read_config(str(path))
    pruned_cfg = layer_config(pruned)
    if pruned_cfg.num_hidden_layers != before - len(drop):
        raise LayerPruneError(f"model_dir: {model_dir!r} has {pruned_cfg.num_hidden_layers} "
                              f"layers; prune.json says {before} minus {len(drop)} removed")
    revision = teacher_revision(teacher, record)
    check_teacher(ref, record, pruned, seq_len,
                  "teacher" if teacher else f"the source named in {model_dir}/prune.json",
                  revision)
    check_weights(str(path))
    with init_empty_weights():  # structure only: an MLP the patch cannot fold into fails here
        shell = AutoModelForCausalLM.from_config(pruned)
    for run in runs:
        new = run[0] - 1 - sum(1 for i in drop if i < run[0])
        output_projection(decoder_layers(shell)[new], pruned_cfg.hidden_size,
                          f"layer {run[0] - 1}")
    return PatchRequest(path, record, ref, sample_texts(data, samples, text_field=text_field),
                        revision)



def validate(model_dir: str, data: str, out_dir: Path, cfg, method: str, teacher: str | None,
             resume: bool, ckpt_dir: Path, keyed_config: dict) -> Plan:
    """Every check that can fail on bad input, before anything is written or trained.
    `keyed_config`: the config fields that change the result (what must match to resume)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.heal.training import pack, target_modules

    path = resolve_model_dir(model_dir)
    check_source(data)
    check_output_dir(out_dir, "out_dir")
    model_cfg = read_config(path)
    check_context(path, cfg.seq_len, "seq_len")
    patch = None
    if method in PATCHED:  # the patch's own checks, the teacher's among them: made once, here
        patch = check_patch_request(path, data, out_dir / "merged" if method == "linear"
                                    else ckpt_dir / "patched", cfg.linear_samples, cfg.seq_len,
                                    teacher, cfg.text_field)
        teacher, revision = patch.teacher, patch.teacher_revision
    else:
        revision = teacher_revision(teacher, read_prune_record(path, "model_dir"))
        teacher = resolve_teacher(method, teacher, read_prune_record(path, "model_dir"),
                                  model_cfg, cfg.seq_len)
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
    return Plan(path, tokenizer, blocks, targets, teacher, request, patch,
                revision if teacher else None)
