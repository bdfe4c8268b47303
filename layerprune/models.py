"""Load causal LMs from a hub id, a local Hugging Face directory or a .gguf file, find their
decoder-layer list, and fingerprint their weights.

Everything that needs to know "where are the layers of this architecture" asks `decoder_layers`,
so supporting a new family is one entry in `LAYER_PATHS`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerprune.assets import check_bundled, resolve_ref
from layerprune.errors import LayerPruneError
from layerprune.io import files_hash

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"
QUANTIZATIONS = ("none", "nf4", "int8")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

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


def resolve_device(name: str = "auto") -> str:
    """`auto`: the first GPU when there is one, else the CPU."""
    if not re.match(DEVICE_PATTERN, str(name)):
        raise LayerPruneError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def dtype_name(name: str = "auto", device: str = "auto") -> str:
    """The concrete dtype `name` stands for on `device`. `auto`: bfloat16 on a GPU that has it
    (float16 on older ones), float32 on a CPU, where bf16 matmuls are slower, not faster."""
    if name not in DTYPE_CHOICES:
        raise LayerPruneError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return name
    if resolve_device(device).startswith("cuda") and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def resolve_dtype(name: str = "auto", device: str = "auto") -> torch.dtype:
    return DTYPES[dtype_name(name, device)]


def check_placement(dtype: str = "auto", device: str = "auto", quantization: str = "none",
                    device_map: str | dict | None = None, max_memory: dict | None = None,
                    offload_folder: str | None = None) -> None:
    """Cheap checks of how a model is to be held, before anything is loaded."""
    dtype_name(dtype, device)
    if quantization not in QUANTIZATIONS:
        raise LayerPruneError(f"quantization must be one of {list(QUANTIZATIONS)}, "
                              f"got {quantization!r}")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise LayerPruneError(f"device_map must be one of {list(DEVICE_MAPS)} or a mapping of "
                              f"module names to devices, got {device_map!r}")
    if (max_memory or offload_folder) and device_map is None:
        raise LayerPruneError("max_memory and offload_folder need a device_map (e.g. 'auto')")
    for dev, size in (max_memory or {}).items():
        parse_size(size, f"max_memory[{dev!r}]")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in '700MB', '40GB', '1.5GiB' or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise LayerPruneError(f"{what}: expected a size such as 700MB, 40GB or 1.5GiB, "
                              f"got {text!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


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


def hub_commit(ref: str, revision: str | None = None) -> str:
    """The commit a hub id (at `revision`: a branch, tag or commit; default main) resolves to now.

    Pinning it is what makes a hub model a fixed thing: the fingerprint includes it and every
    stage loads that commit, so a new upstream commit is a new model, never a stale cache hit.
    Offline, a copy in the local hub cache answers instead.
    """
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download

    try:
        return HfApi().model_info(ref, revision=revision).sha
    except Exception as online_error:  # offline, unknown repo, gated: try the local cache
        try:
            return Path(snapshot_download(ref, revision=revision, local_files_only=True)).name
        except Exception:
            raise LayerPruneError(
                f"model: cannot resolve the commit of hub model {ref!r} (revision "
                f"{revision or 'main'}): {online_error}; pass a local directory or a commit as "
                "revision") from None


def fingerprint(ref: str, revision: str | None = None) -> str:
    """A content hash of a model: config and weight files, not their names or location.

    A renamed copy of the same weights gets the same fingerprint. A hub id not present locally is
    fingerprinted by id and the commit `revision` resolves to, since its content is not here.
    """
    path = Path(resolve_ref(ref))
    if not path.exists():
        commit = hub_commit(ref, revision)
        return "hub-" + hashlib.sha256(f"{ref}@{commit}".encode()).hexdigest()[:32]
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.name in _CONFIG_FILES or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    return files_hash(path, files)


def _source_kwargs(ref: str, revision: str | None, trust_remote_code: bool) -> tuple[str, dict]:
    """(path or id, from_pretrained kwargs) that name the files of `ref` for any Auto* class."""
    ref = resolve_ref(ref)
    if is_gguf(ref):
        p = Path(ref)
        return str(p.parent), {"gguf_file": p.name}
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if revision is not None and not Path(ref).exists():
        kwargs["revision"] = revision
    return ref, kwargs


def read_config(ref: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config alone (cheap: no weights), e.g. to validate n against its depth."""
    from transformers import AutoConfig

    check_model_ref(ref)
    path, kwargs = _source_kwargs(ref, revision, trust_remote_code)
    return AutoConfig.from_pretrained(path, **kwargs)


def check_architecture(ref: str, trust_remote_code: bool = False,
                       revision: str | None = None) -> int:
    """Number of decoder layers, found by building the model on the meta device (no weights, no
    memory), so an unknown architecture fails before any weights are read."""
    from transformers import AutoModelForCausalLM

    config = read_config(ref, trust_remote_code, revision)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise LayerPruneError(f"model: {ref!r} is not a causal LM transformers can build: {e}")
    return num_layers(model)


def load_tokenizer(ref: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    path, kwargs = _source_kwargs(ref, revision, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def placement_kwargs(dtype: str = "auto", device: str = "auto", quantization: str = "none",
                     device_map: str | dict | None = None, max_memory: dict | None = None,
                     offload_folder: str | None = None) -> dict:
    """from_pretrained kwargs that hold a model as asked: the one place that decides it.

    - no device_map and no quantization: loaded whole, then moved to `device`;
    - quantization (bitsandbytes; `nf4` is QLoRA's 4-bit NormalFloat with double quantization,
      `int8` LLM.int8()): weights are quantized as they load, onto `device` unless a device_map
      says otherwise;
    - device_map (`auto`, `balanced`, `sequential` or explicit {module: device}): accelerate
      places whole layers on the GPUs, then the CPU, then `offload_folder` on disk, within
      `max_memory` per device ({"0": "70GiB", "cpu": "200GiB"}).
    """
    check_placement(dtype, device, quantization, device_map, max_memory, offload_folder)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": torch_dtype}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)
            if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = device_map if device_map is not None else {"": resolve_device(device)}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory:
        kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v
                                for k, v in max_memory.items()}
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    return kwargs


def load_model(ref: str, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, quantization: str = "none",
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load model + tokenizer, held as `placement_kwargs` decides. GGUF weights are dequantized
    by transformers to `dtype`. A hub id loads the commit `revision` resolves to."""
    from transformers import AutoModelForCausalLM

    check_model_ref(ref)
    if quantization != "none" and is_gguf(resolve_ref(ref)):
        raise LayerPruneError("quantization: a .gguf model is dequantized as it loads and cannot "
                              "be re-quantized on load; save it as a checkpoint first, or use "
                              "quantization 'none'")
    kwargs = placement_kwargs(dtype, device, quantization, device_map, max_memory, offload_folder)
    if revision is None and not Path(resolve_ref(ref)).exists():
        revision = hub_commit(ref)
    path, source = _source_kwargs(ref, revision, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, **source, **kwargs)
    if is_gguf(resolve_ref(ref)):
        # The weights are dequantized already, but the model still says it is GGUF-quantized and
        # save_pretrained refuses; it is a plain float model now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if "device_map" not in kwargs:
        model.to(resolve_device(device))
    elif set(getattr(model, "hf_device_map", {}).values()) == {"disk"}:
        raise LayerPruneError(f"max_memory: {max_memory} leaves no device room for any block of "
                              "the model (everything went to disk); give the GPUs or the CPU more")
    model.eval()
    tokenizer = load_tokenizer(ref, trust_remote_code, revision)
    decoder_layers(model)  # unknown architectures fail here, at load, with a clear message
    return LoadedModel(model, tokenizer, ref, fingerprint(ref, revision))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device, or for a model placed by a
    device_map, the device of its first block (the embeddings); accelerate moves activations
    between blocks, and onto the GPU for blocks offloaded to the CPU or disk."""
    placed = getattr(model, "hf_device_map", None)  # set by from_pretrained(device_map=...)
    if placed:
        first = next(iter(placed.values()))
        if first in ("cpu", "disk"):
            return torch.device("cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return next(model.parameters()).device


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
