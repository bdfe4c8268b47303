"""Load causal LMs from a hub id, a local Hugging Face directory or a .gguf file, find their
decoder-layer list, and fingerprint their weights.

Everything that needs to know "where are the layers of this architecture" asks `decoder_layers`,
so supporting a new family is one entry in `LAYER_PATHS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerprune.assets import check_bundled, resolve_ref
from layerprune.errors import LayerPruneError
from layerprune.io import files_hash

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Attribute paths (from the *ForCausalLM object) to the ModuleList of decoder layers.
# Llama, Mistral, Qwen2/3, Gemma 2/3 (text), Phi-3 keep them at model.layers; GPT-2 at
# transformer.h; GPT-NeoX at gpt_neox.layers.
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from (`ref`) and what it is (`fingerprint`)."""

    model: nn.Module
    tokenizer: object
    ref: str
    fingerprint: str


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LayerPruneError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def is_gguf(ref: str) -> bool:
    return str(ref).endswith(".gguf")


def check_model_ref(ref: str) -> None:
    """Fail fast, before anything heavy, when `ref` cannot name a model.

    A local path must be a .gguf file or a directory with a config.json; anything else that does
    not exist locally is taken as a hub id ("org/name"), which transformers resolves later.
    """
    if ref.startswith("bundled:"):
        check_bundled(ref)
        return
    path = Path(ref)
    if is_gguf(ref):
        if not path.is_file():
            raise LayerPruneError(f"model: GGUF file {ref!r} does not exist")
        return
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise LayerPruneError(
                f"model: {ref!r} is not a model (expected a directory with config.json, "
                "a .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M')"
            )
        return
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        raise LayerPruneError(
            f"model: {ref!r} is neither a local path nor a hub id of the form 'org/name'"
        )


def fingerprint(ref: str) -> str:
    """A content hash of a model: config and weight files, not their names or location.

    A renamed copy of the same weights gets the same fingerprint. Hub ids not present locally are
    fingerprinted by id (and `@revision` when given), since their content is not here to hash.
    """
    path = Path(resolve_ref(ref))
    if not path.exists():
        return "hub-" + hashlib.sha256(ref.encode()).hexdigest()[:32]
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.name in _CONFIG_FILES or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    return files_hash(path, files)


def read_config(ref: str, trust_remote_code: bool = False):
    """The model's config alone (cheap: no weights), e.g. to validate n against its depth."""
    from transformers import AutoConfig

    check_model_ref(ref)
    ref = resolve_ref(ref)
    if is_gguf(ref):
        p = Path(ref)
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)


def check_architecture(ref: str, trust_remote_code: bool = False) -> int:
    """Number of decoder layers, found by building the model on the meta device (no weights, no
    memory), so an unknown architecture fails before any weights are read."""
    from transformers import AutoModelForCausalLM

    config = read_config(ref, trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise LayerPruneError(f"model: {ref!r} is not a causal LM transformers can build: {e}")
    return num_layers(model)


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    ref = resolve_ref(ref)

    if is_gguf(ref):
        p = Path(ref)
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)


def load_model(
    ref: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """Load model + tokenizer. GGUF weights are dequantized by transformers to `dtype`."""
    from transformers import AutoModelForCausalLM

    check_model_ref(ref)
    source, ref = ref, resolve_ref(ref)
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if is_gguf(ref):
        p = Path(ref)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
        # The weights are dequantized already, but the model still says it is GGUF-quantized and
        # save_pretrained refuses; it is a plain float model now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    else:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    model.to(device).eval()
    tokenizer = load_tokenizer(ref, trust_remote_code)
    decoder_layers(model)  # unknown architectures fail here, at load, with a clear message
    return LoadedModel(model, tokenizer, source, fingerprint(ref))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers, or a clear error naming what was looked for."""
    parent, name = layer_list_owner(model)
    return getattr(parent, name)


def layer_list_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the decoder-layer ModuleList, so it can be replaced."""
    for path in LAYER_PATHS:
        obj: object = model
        parts = path.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and isinstance(getattr(obj, parts[-1], None), nn.ModuleList):
            return obj, parts[-1]  # type: ignore[return-value]
    raise LayerPruneError(
        f"unknown architecture {type(model).__name__}: no decoder-layer list found at any of "
        f"{', '.join(LAYER_PATHS)}"
    )


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (e.g. LlamaModel inside LlamaForCausalLM)."""
    return getattr(model, model.base_model_prefix, model)


def model_summary(loaded: LoadedModel) -> dict:
    cfg = loaded.model.config
    return {
        "ref": loaded.ref,
        "fingerprint": loaded.fingerprint,
        "architecture": type(loaded.model).__name__,
        "num_layers": num_layers(loaded.model),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }
