"""How a model is held: dtype, device, bitsandbytes quantization, and accelerate's device map.

The one place that decides it: every stage loads through `models.load_model`, which asks
`placement_kwargs`; `layerprune.config.ModelSpec` validates the same options for the flow and the
CLI with `check_placement`. `auto` is the default for dtype and device: bfloat16 on a GPU that has
it, float32 on a CPU.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from layerprune.errors import LayerPruneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"
QUANTIZATIONS = ("none", "nf4", "int8")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


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
