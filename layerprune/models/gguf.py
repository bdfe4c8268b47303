"""GGUF files (llama.cpp's format) as transformers reads them: dequantized to a float model.

transformers parses a GGUF file whole each time any Auto* class is pointed at it (config,
tokenizer, weights); `models/description.py` reads a model's description once per process.
"""

from __future__ import annotations

from pathlib import Path


def is_gguf(ref: str | Path) -> bool:
    return str(ref).endswith(".gguf")


def mark_dequantized(model) -> None:
    """A model loaded from GGUF holds dequantized float weights but still says it is
    GGUF-quantized, and `save_pretrained` refuses it ("quantized with gguf and is not
    serializable"). It is a plain float model now: say so. transformers offers no public call
    for this; the attributes cleared are the ones its own save check reads, and
    tests/test_loading.py checks that a GGUF-loaded model saves and reloads."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_dequantized(path: Path, dtype: str):
    """(model, tokenizer) of the GGUF file `path`, dequantized to `dtype` on the CPU, ready to
    save as a standard checkpoint (the bundled assets' one-time conversion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype)
    mark_dequantized(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer
