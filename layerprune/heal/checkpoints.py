"""Healing checkpoints that survive a kill at any moment: which are complete, which to resume.

transformers' Trainer (5.x, `Trainer._save_checkpoint`) writes `checkpoint-N` in place, file by
file, with no temporary directory and no rename: the adapter (`adapter_model.safetensors`,
`adapter_config.json`, a model card), `training_args.bin`, `optimizer.pt`, `scheduler.pt`,
`rng_state.pth`, then `trainer_state.json`, then it deletes the oldest checkpoints beyond
`save_total_limit` with `rmtree`. `get_last_checkpoint` returns the highest-numbered directory,
whatever it holds, so a SIGKILL mid-save (or mid-rotation, or a full disk) leaves a directory
that resume takes for a checkpoint and then crashes on (a missing `trainer_state.json`, a
truncated zip or safetensors file) or, worse, loads half of.

The commit point is ours: once the Trainer reports a checkpoint written (`on_save`, which it calls
after the whole `_save_checkpoint`, rotation included), `complete.json` is written into it
atomically, listing every file with its size and sha256. A checkpoint is complete when
- `complete.json` parses and lists every file resume reads (REQUIRED, plus the adapter weights);
- every listed file is present with its recorded size and sha256 (truncation, deletion and a
  damaged disk all show);
- `trainer_state.json` parses and its `global_step` is the N in the directory's name.
Anything else is incomplete. Resume takes the newest complete checkpoint and deletes the
incomplete ones first, with a log line each, so that the Trainer never writes a new
`checkpoint-N` on top of a leftover one. Checkpoints written before this marker existed count as
incomplete: healing restarts once, it never resumes from something unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from layerprune.store.files import write_json_atomic

log = logging.getLogger("layerprune.heal.run")

MARKER = "complete.json"
# What Trainer.train(resume_from_checkpoint=...) reads for a peft model on one process (bf16 or
# fp32: no fp16 grad scaler). Without rng_state.pth it only warns and resumes with other dropout
# masks, which would silently break "a resumed run equals an uninterrupted one".
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "adapter_config.json", "adapter_model.safetensors")
_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR naming


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def mark_complete(checkpoint: Path) -> None:
    """Write `complete.json` (every file's size and sha256) into a fully written checkpoint."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MARKER
             and not p.name.startswith(".")}  # a temp file of an interrupted marker write
    write_json_atomic(checkpoint / MARKER, {"files": files})


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    match = _NAME.match(checkpoint.name)
    if not match or not checkpoint.is_dir():
        return "not a checkpoint directory"
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER} (the Trainer had not finished writing it)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MARKER} unreadable ({e})"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"{MARKER} lacks {', '.join(missing)}"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    try:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json unreadable ({e})"
    if step != int(match.group(1)):
        return f"trainer_state.json says global_step {step}"
    return None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def newest_complete(ckpt_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint in `ckpt_dir`, or None. Reads only."""
    return next((p for p in _checkpoints(ckpt_dir) if problem(p) is None), None)


def discard_incomplete(ckpt_dir: Path) -> Path | None:
    """Delete every incomplete checkpoint in `ckpt_dir`, logging why; return the newest complete
    one (where training resumes), or None."""
    newest = None
    for path in _checkpoints(ckpt_dir):
        why = problem(path)
        if why is None:
            newest = newest or path
            continue
        log.warning("heal: %s is incomplete (%s), likely cut by a kill while it was written: "
                    "deleted", path, why)
        shutil.rmtree(path)
    if newest is not None:
        log.info("heal: resuming from %s", newest)
    return newest


def marker_callback():
    """A TrainerCallback that marks each checkpoint complete once the Trainer has written it."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # on_save runs after Trainer._save_checkpoint returns: every file is written and
            # rotation is done. checkpoint-<global_step> under output_dir is the Trainer's
            # documented layout (PREFIX_CHECKPOINT_DIR); no public API returns the path.
            if args.should_save:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return MarkComplete()


def logging_steps(steps: int, save_every: int | None) -> int:
    """About 100 loss points, at a step count that divides save_every.

    The Trainer logs the mean loss since its last log; resumed, it starts that mean afresh at the
    checkpoint's step. When every checkpoint falls on a log step, the resumed curve is the
    uninterrupted one; otherwise the first point after a resume would average fewer steps."""
    target = max(1, steps // 100)
    if not save_every:
        return target
    return max(d for d in range(1, min(target, save_every) + 1) if save_every % d == 0)


def prepare_checkpoint_dir(ckpt_dir: Path, request: dict, resume: bool) -> Path | None:
    """Make `ckpt_dir` hold only what this `request` may reuse; return the checkpoint to resume
    from (None: train from step 0).

    `request.json` names the run everything in `ckpt_dir` was made for (checkpoints, and the
    teacher's top-k cache and the patched checkpoint beside them). Resuming the same request
    keeps it all but the incomplete checkpoints; anything else starts from an empty directory.
    (A complete checkpoint of another request was refused before: `heal_validation`.)"""
    saved = ckpt_dir / "request.json"
    try:
        same = resume and json.loads(saved.read_text()) == request
    except (FileNotFoundError, ValueError):
        same = False
    # A kill mid-save leaves a checkpoint-N that the Trainer would resume from, or later write
    # its new checkpoint-N on top of: delete every incomplete one (logged).
    last = discard_incomplete(ckpt_dir) if same else None
    if not same and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    write_json_atomic(saved, request)
    return last
