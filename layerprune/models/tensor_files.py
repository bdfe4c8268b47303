"""A checkpoint on disk, read one tensor at a time, never the whole model at once.

`skeleton` is the model with no weights (meta device); `checkpoint_files` its tensors: safetensors
(one file or shards) are memory-mapped, so reading a tensor touches only its pages; a GGUF file is
dequantized tensor by tensor, under the names transformers gives its tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from layerprune.errors import LayerPruneError
from layerprune.models.assets import resolve_ref
from layerprune.models.loading import decoder_layers, is_gguf, read_config


def skeleton(ref: str, dtype: torch.dtype, revision: str | None = None,
             trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (no memory) and its buffers real.

    accelerate's `init_empty_weights(include_buffers=False)` is the documented way: buffers such
    as the rotary frequencies or Gemma's embedding scale are computed from the config, not stored
    in checkpoints, and are tiny, so they are built for real on the CPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_config(ref, trust_remote_code, revision)  # a copy: read once per process
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise LayerPruneError(f"model: {ref!r} is not a causal LM transformers can build: {e}")
    decoder_layers(model)  # an unknown layout fails here, before any weight is read
    return model.eval()


class SafetensorsFiles:
    """The tensors of a safetensors checkpoint (one file or shards), read on demand."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.handles = {f: safe_open(str(f), framework="pt") for f in files}  # memory-mapped
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

    def read(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (sorted, unique) of a 2-D tensor: contiguous runs are sliced, so only
        the pages of the rows used are touched."""
        sliced = self.handles[self.where[key]].get_slice(key)
        runs, start = [], 0
        values = rows.tolist()
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[i - 1] + 1:
                runs.append(sliced[values[start]:values[i - 1] + 1])
                start = i
        return torch.cat(runs)


class GGUFFiles:
    """The tensors of a GGUF file under their transformers names, dequantized one at a time.

    transformers has no public per-tensor GGUF reader; this uses the same pieces its loader
    (`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`) applies to every tensor:
    the gguf -> HF name map, the architecture's tensor processor (e.g. Llama's q/k un-permute)
    and `gguf.quants.dequantize`. tests/test_streaming.py checks the result equals the loader's.
    """

    def __init__(self, path: Path, skeleton: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        reader = GGUFReader(str(path))  # memory-mapped: nothing is read until asked
        arch = read_field(reader, "general.architecture")[0]
        # The processors read HF-named config fields (e.g. num_key_value_heads): the skeleton's.
        config = skeleton.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        self.parsed = {"config": config, "tensors": {}}
        self.to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        self.tensors = {self.to_hf[t.name]: t for t in reader.tensors if t.name in self.to_hf}
        self.where = self.tensors

    def _convert(self, key: str, data) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors[key]
        weights = dequantize(data, t.tensor_type)
        weights = self.processor.process(weights=weights, name=t.name,
                                         parsed_parameters=self.parsed,
                                         tensor_key_mapping=self.to_hf).weights
        return torch.from_numpy(weights.copy())

    def read(self, key: str) -> torch.Tensor:
        return self._convert(key, self.tensors[key].data)

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        # Quantized rows are whole blocks of bytes: dequantizing only the rows used is exact.
        return self._convert(key, self.tensors[key].data[rows.numpy()])


def checkpoint_files(ref: str, skeleton: nn.Module, revision: str | None = None):
    """The tensors of `ref` on disk: a local directory, a .gguf file, or a hub id (its
    safetensors files are downloaded to the hub cache, on disk, never into memory)."""
    path = Path(resolve_ref(ref))
    if is_gguf(str(path)):
        return GGUFFiles(path, skeleton)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors"]))
    from layerprune.models.checkpoint_files import shard_files

    files = [path / name for name in shard_files(path)]
    if not files:
        raise LayerPruneError(f"extraction 'streamed' reads safetensors or GGUF checkpoints; "
                              f"{ref!r} has neither (use extraction 'in-memory')")
    return SafetensorsFiles(files)
