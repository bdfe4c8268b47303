"""Load causal LMs from a hub id, a local Hugging Face directory or a .gguf file, find their
decoder-layer list, and fingerprint their weights.

Everything that needs to know "where are the layers of this architecture" asks `decoder_layers`,
so supporting a new family is one entry in `LAYER_PATHS`.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import LayerPruneError
from layerprune.models.assets import check_bundled, resolve_ref
from layerprune.models.checkpoint_files import TOKENIZER_FILES, check_weight_files, gguf_keys
from layerprune.models.description import kept_on_disk, remember, source
from layerprune.models.gguf import is_gguf, mark_dequantized
from layerprune.models.placement import placement_kwargs, resolve_device
from layerprune.store.files import files_hash

# Attribute paths (from the *ForCausalLM object) to the ModuleList of decoder layers.
# Llama, Mistral, Qwen2/3, Gemma 2/3 (text), Phi-3 keep them at model.layers; GPT-2 at
# transformer.h; GPT-NeoX at gpt_neox.layers.
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model with its tokenizer, where it came from (`ref`, at `revision`: the commit a hub id
    was loaded at, None for a local model) and what it is (`fingerprint`)."""

    model: nn.Module
    tokenizer: object
    ref: str
    fingerprint: str
    revision: str | None = None


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
        gguf_keys(path)  # a truncated or foreign file fails here, not mid-load
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


def check_weights(ref: str, require: bool = True) -> None:
    """Fail before loading when a local model's weights are missing (`require`) or visibly
    truncated (headers only: milliseconds however large the model). Separate from
    `check_model_ref`: reading a config or planning memory needs no weights, loading does (and
    a plan reads the headers of whatever weights are there: `require=False` checks those). A
    GGUF file is checked whole by `check_model_ref`, since even its config is read from it."""
    if ref.startswith("bundled:") or is_gguf(ref):
        return
    path = Path(ref)
    if path.is_dir():
        check_weight_files(path, ref, require)


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


def pinned_revision(ref: str, revision: str | None = None) -> str | None:
    """The commit a hub id loads at (`hub_commit`); None for a local model or a bundled one."""
    return None if Path(resolve_ref(ref)).exists() else hub_commit(ref, revision)


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


def read_config(ref: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config alone (cheap: no weights), e.g. to validate n against its depth.
    Read once per process (`models.description`); each caller gets its own copy to edit."""
    check_model_ref(ref)
    return copy.deepcopy(remember("config", ref, revision, trust_remote_code,
                                  lambda: _read_config(ref, trust_remote_code, revision)))


def _read_config(ref: str, trust_remote_code: bool, revision: str | None):
    from transformers import AutoConfig

    path, kwargs = source(ref, revision, trust_remote_code)
    try:  # a GGUF file's config converted once, kept on disk (models.description)
        return kept_on_disk("config", ref, lambda: AutoConfig.from_pretrained(path, **kwargs),
                            lambda config, d: config.save_pretrained(d),
                            lambda d: AutoConfig.from_pretrained(str(d)))
    except (OSError, ValueError, KeyError, TypeError) as e:  # bad JSON, an unknown model_type,
        # GGUF metadata transformers cannot map: the first line names it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerPruneError(f"model: cannot read the config of {ref!r}: {first}") from None


def check_architecture(ref: str, trust_remote_code: bool = False,
                       revision: str | None = None) -> int:
    """Number of decoder layers, found by building the model on the meta device (no weights, no
    memory), so an unknown architecture fails before any weights are read. Once per process."""
    from transformers import AutoModelForCausalLM

    def build() -> int:
        config = read_config(ref, trust_remote_code, revision)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config,
                                                         trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise LayerPruneError(f"model: {ref!r} is not a causal LM transformers can build: "
                                  f"{e}") from None
        return num_layers(model)

    check_model_ref(ref)
    return remember("layers", ref, revision, trust_remote_code, build)


def load_tokenizer(ref: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's tokenizer, read once per process; each caller gets its own copy (callers set
    its padding side and pad token). A deep copy costs 0.1 s for a 49k-token vocabulary.

    From a GGUF file, transformers' AutoTokenizer re-reads the config from the file whatever
    `config=` says (its GGUF branch ignores that argument), and it has no public way to name the
    tokenizer class instead: that parse stays, once per process and, with the converted
    tokenizer kept on disk, once per file."""
    return copy.deepcopy(remember("tokenizer", ref, revision, trust_remote_code,
                                  lambda: _read_tokenizer(ref, trust_remote_code, revision)))


def _read_tokenizer(ref: str, trust_remote_code: bool, revision: str | None):
    from transformers import AutoTokenizer

    path, kwargs = source(ref, revision, trust_remote_code)
    try:  # `config=` (documented) picks the class without reading the config again; a GGUF
        # file's tokenizer is converted once and kept on disk (models.description)
        return kept_on_disk("tokenizer", ref, lambda: AutoTokenizer.from_pretrained(
            path, **kwargs, config=read_config(ref, trust_remote_code, revision)),
            lambda tokenizer, d: tokenizer.save_pretrained(d),
            lambda d: AutoTokenizer.from_pretrained(str(d)))
    except (OSError, ValueError, TypeError) as e:  # what transformers raises for a missing or
        # unusable tokenizer; the first line says which (the rest is a long how-to)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerPruneError(f"model: cannot load the tokenizer of {ref!r}: {first}") from None


def check_tokenizer(ref: str, trust_remote_code: bool = False,
                    revision: str | None = None) -> None:
    """Fail before any weights load when a local model has no tokenizer: every subcommand
    tokenizes text or writes a checkpoint that must load with its tokenizer. A directory passes
    when it holds a vocabulary file (cheap); otherwise only if the tokenizer really loads
    (byte-level tokenizers need no file). A GGUF file carries its tokenizer in its metadata."""
    if ref.startswith("bundled:"):
        return
    path = Path(ref)
    if is_gguf(ref) and path.is_file():
        if "tokenizer.ggml.model" not in gguf_keys(path):
            raise LayerPruneError(f"model: GGUF file {ref!r} has no tokenizer in its metadata "
                                  "(no tokenizer.ggml.model key)")
        return
    if path.is_dir() and not any((path / n).is_file() for n in TOKENIZER_FILES):
        try:
            load_tokenizer(ref, trust_remote_code, revision)
        except LayerPruneError:
            raise LayerPruneError(
                f"model: {ref!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "save it beside the weights with tokenizer.save_pretrained(DIR)") from None


def context_length(config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings or its
    family's name for it), or None when its config does not say."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
        else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits(name: str, tokens: int, context: int | None, ref: str | None = None,
               prompt: int = 0) -> None:
    """The one context rule: `tokens` (after a `prompt` of that many tokens the caller adds) fit
    `context` (None: the config does not say, nothing to check). `name` is the parameter."""
    if context is None or tokens + prompt <= context:
        return
    if prompt:
        why = f"the model's context of {context} less the {prompt}-token prompt"
    elif ref:
        why = f"the context of model {ref!r}, max_position_embeddings"
    else:
        why = "the model's context"
    raise LayerPruneError(f"{name} must be <= {context - prompt} ({why}), got {tokens}")


def check_context(ref: str, seq_len: int, name: str = "seq_len",
                  trust_remote_code: bool = False, revision: str | None = None) -> None:
    """Refuse `seq_len` beyond the model's context. Records longer than `seq_len` are cut to
    their first `seq_len` tokens (the documented contract); a `seq_len` past the context would
    feed positions the model never saw: an index error for learned position embeddings, silently
    wrong scores for rotary ones."""
    check_fits(name, seq_len, context_length(read_config(ref, trust_remote_code, revision)), ref)


def load_model(ref: str, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, quantization: str = "none",
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load model + tokenizer, held as `placement_kwargs` decides. GGUF weights are dequantized
    by transformers to `dtype`. A hub id loads the commit `revision` resolves to."""
    from transformers import AutoModelForCausalLM

    check_model_ref(ref)
    check_weights(ref)
    check_tokenizer(ref, trust_remote_code, revision)  # before the weights, not after them
    if quantization != "none" and is_gguf(resolve_ref(ref)):
        raise LayerPruneError("quantization: a .gguf model is dequantized as it loads and cannot "
                              "be re-quantized on load; save it as a checkpoint first, or use "
                              "quantization 'none'")
    kwargs = placement_kwargs(dtype, device, quantization, device_map, max_memory, offload_folder)
    revision = pinned_revision(ref, revision)
    path, where = source(ref, revision, trust_remote_code)
    # The config read by the checks (documented `config=`): from_pretrained would parse it again.
    config = read_config(ref, trust_remote_code, revision)
    model = AutoModelForCausalLM.from_pretrained(path, **where, config=config, **kwargs)
    if is_gguf(resolve_ref(ref)):
        mark_dequantized(model)
    if "device_map" not in kwargs:
        model.to(resolve_device(device))
    elif set(getattr(model, "hf_device_map", {}).values()) == {"disk"}:
        raise LayerPruneError(f"max_memory: {max_memory} leaves no device room for any block of "
                              "the model (everything went to disk); give the GPUs or the CPU more")
    model.eval()
    tokenizer = load_tokenizer(ref, trust_remote_code, revision)
    decoder_layers(model)  # unknown architectures fail here, at load, with a clear message
    return LoadedModel(model, tokenizer, ref, fingerprint(ref, revision), revision)


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
