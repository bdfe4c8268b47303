"""What a heal run leaves in its output directory: the adapter, the merged checkpoint (a standard
one that plain transformers loads) with `prune.json` and a model card saying how it was healed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from layerprune.heal.config import method_config
from layerprune.store.files import atomic_output_dir

# Files of the pruned (or patched) checkpoint's own records that travel into merged/.
RECORDS = ("prune.json", "linear_patch.json")
_NO_CARD = "---\nlibrary_name: transformers\n---\n"


def save_adapter(model, adapter_dir: Path) -> None:
    """The peft adapter alone (adapter_model.safetensors + adapter_config.json), atomically."""
    with atomic_output_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp)


def merge(student_dir: str, adapter_dir: Path, merged_dir: Path, tokenizer, record: dict,
          pruned_dir: str) -> None:
    """Merge the adapter into a full-precision reload of the student base (the pruned, or the
    patched, checkpoint) and save it with the tokenizer, records and card of `pruned_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The checkpoint's own dtype (fp32 for prune's output): merging into the 4-bit weights
    # instead would round the base and the update together.
    base = AutoModelForCausalLM.from_pretrained(student_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_output_dir(merged_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for directory in (pruned_dir, student_dir):  # the patch's record is the student's
            for name in RECORDS:
                if (Path(directory) / name).is_file():
                    shutil.copy(Path(directory) / name, tmp / name)
        # the student's card: the pruned one's, plus the patch's section when it was patched
        (tmp / "README.md").write_text(card_text(student_dir, record))


def write_card(merged_dir: Path, record: dict) -> None:
    """Add the healing section to the card of a merged/ that the linear patch wrote (which has
    prune.json and its own section already); the file is replaced atomically."""
    text = card_text(merged_dir, record)
    fd, tmp = tempfile.mkstemp(dir=merged_dir, prefix=".README.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a model card is an ordinary file
    os.replace(tmp, Path(merged_dir) / "README.md")


def card_text(card_dir: str | Path, record: dict) -> str:
    """The card in `card_dir` (else a bare header) followed by the healing section."""
    card = Path(card_dir) / "README.md"
    text = card.read_text() if card.is_file() else _NO_CARD
    return text.rstrip("\n") + "\n\n" + healing_card(record)


def healing_card(record: dict) -> str:
    """The "## Healing" section: which method, from which teacher, on what, with which figures."""
    cfg, method = record["config"], record.get("method", "lora")
    lines = ["## Healing", ""]
    if method in ("linear", "linear+distill"):
        lines += [f"Linear patch (ReplaceMe, NeurIPS 2025; see \"Linear patch\" above): fitted "
                  f"on the activations of `{record['teacher']}` over the first "
                  f"{cfg['linear_samples']} records of `{record['data']}` "
                  f"({record['fit_tokens']:,} tokens), no training"
                  + (", then:" if method == "linear+distill" else "."), ""]
    if method != "linear":
        adapters = 'QLoRA (4-bit NF4 base)' if cfg['quant'] else 'LoRA'
        into = "patched" if method == "linear+distill" else "pruned"
        if method == "lora":
            lines += [f"{adapters} on `{record['data']}`, merged into the full-precision pruned "
                      "weights (Gromov et al. 2024, Sec. 3).", ""]
        else:
            logits = record.get("teacher_logits")
            source = (f"cached top-{cfg['top_k']} logits" if logits == "cached"
                      else f"{logits} logits")
            lines += [f"Distillation from `{record['teacher']}` at temperature "
                      f"{cfg['temperature']:g} (KL weight {cfg['kl_weight']:g}, teacher "
                      f"{source}): {adapters} adapters trained on `{record['data']}`, merged "
                      f"into the full-precision {into} weights.", ""]
        lines += [f"- steps: {record['steps']} ({record['tokens_seen']:,} tokens)",
                  f"- train loss: {record['initial_train_loss']:.4f} -> "
                  f"{record['final_train_loss']:.4f}",
                  f"- LoRA: rank {cfg['rank']}, alpha {record['lora_alpha']:g}, dropout "
                  f"{cfg['dropout']}, on {', '.join(record['target_modules'])}"]
    shown = {"rank", "alpha", "dropout", "steps"}
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in method_config(cfg, method).items()
              if k not in shown]
    return "\n".join(lines) + "\n"
