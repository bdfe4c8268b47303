"""A model's description (config, layer count, tokenizer) is read once per process
(`layerprune.models.description`): counted on a tiny GGUF file, where every read is a parse of
the whole file by transformers, and on a tiny checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerprune.models import description

VOCAB = 258  # the 256 byte symbols of a byte-level BPE, one merge (" t") and end-of-text


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (what a byte-level BPE vocabulary holds)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, context: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Llama (hidden 32, `layers` layers) as a float32 GGUF file with its byte-level BPE
    tokenizer in the metadata: what llama.cpp's converter writes, small enough to parse fast."""
    import gguf

    rng = np.random.default_rng(seed)
    d, ffn, heads, kv = 32, 64, 4, 2

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(context)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(d // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*_byte_symbols(), "\u0120t", "<|endoftext|>"])  # \u0120: a space
    writer.add_token_types([1] * 257 + [3])  # normal, then control
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    writer.add_tensor("token_embd.weight", w(VOCAB, d))
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (d // heads * kv, d)),
                            ("attn_v", (d // heads * kv, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ffn, d)), ("ffn_up", (ffn, d)),
                            ("ffn_down", (d, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    writer.add_tensor("output.weight", w(VOCAB, d))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def fresh():
    description.forget()
    yield
    description.forget()


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """Every whole-file parse of a GGUF file, by what asked: transformers' `load_gguf_checkpoint`
    (which each AutoConfig, AutoTokenizer and model load of a llama GGUF calls), "weights" when
    it read the tensors, "metadata" otherwise; "tensors" for a gguf `GGUFReader` opened outside
    it (the streamed pass's `GGUFFiles`)."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    calls: list[str] = []
    inside = []
    original, reader_init = gguf_utils.load_gguf_checkpoint, gguf.GGUFReader.__init__

    def counted(*args, **kwargs):
        calls.append("weights" if kwargs.get("return_tensors") else "metadata")
        inside.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            inside.pop()

    def counted_reader(self, *args, **kwargs):
        if not inside:
            calls.append("tensors")
        return reader_init(self, *args, **kwargs)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", counted)
    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted_reader)
    return calls


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("extraction, expected", [
    # config once (architecture, tokenizer, context checks, memory plan and model load share it),
    # the tokenizer once (AutoTokenizer re-reads a GGUF's config: no public way around), the
    # weights once (handed the config, from_pretrained does not parse it again)
    ("in-memory", ["metadata", "metadata", "weights"]),
    # the same, the tensors read by gguf's reader, tensor by tensor (`GGUFFiles`)
    ("streamed", ["metadata", "metadata", "tensors"]),
    # what "auto" picks for a GGUF file that fits: streamed
    ("auto", ["metadata", "metadata", "tensors"]),
])
def test_one_distances_call_parses_the_gguf_the_fewest_times(tiny_gguf, texts_jsonl, tmp_path,
                                                              parses, extraction, expected):
    """Before: 7 parses (the config alone 4 times, once per check and once inside from_pretrained).
    Catches any check or load that bypasses the one cache, a key that differs between callers
    (the ref as given against the resolved path, or the revision pinned against None), and a
    model load that is not handed the config."""
    from layerprune import api

    result = api.distances(str(tiny_gguf), texts_jsonl, samples=4, seq_len=16,
                           out=str(tmp_path / "out"), extraction=extraction, folds=2,
                           bootstrap=0)
    assert result["extraction"] == ("streamed" if extraction == "auto" else extraction)
    assert sorted(parses) == expected


def test_the_cli_distances_default_path_parses_the_gguf_three_times(tiny_gguf, texts_jsonl,
                                                                     tmp_path, parses, capsys):
    from layerprune.cli import main

    assert main(["distances", "--model", str(tiny_gguf), "--data", texts_jsonl, "--samples", "4",
                 "--seq-len", "16", "--out", str(tmp_path / "out")]) == 0
    assert '"extraction": "streamed"' in capsys.readouterr().out
    assert sorted(parses) == ["metadata", "metadata", "tensors"]


def test_streamed_and_in_memory_agree_on_a_gguf(tiny_gguf, texts_jsonl, tmp_path):
    """"auto" streams a GGUF file: the distances are those of the model loaded whole."""
    from layerprune import api

    docs = [api.distances(str(tiny_gguf), texts_jsonl, samples=6, seq_len=16,
                          out=str(tmp_path / mode), extraction=mode, folds=2, bootstrap=0)
            for mode in ("auto", "in-memory")]
    for a, b in zip(docs[0]["distance"], docs[1]["distance"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_a_rewritten_gguf_is_read_again(tiny_gguf, parses):
    """A cache keyed by the path alone would keep answering 128 after the file changed."""
    from layerprune.models.loading import check_architecture, read_config

    assert read_config(str(tiny_gguf)).max_position_embeddings == 128
    (tiny_gguf.parent / "sub").mkdir()
    another_name = str(tiny_gguf.parent / "sub" / ".." / tiny_gguf.name)  # the same file
    assert read_config(another_name).max_position_embeddings == 128
    assert check_architecture(str(tiny_gguf)) == 2
    assert parses == ["metadata"]  # keyed by the file, not by how the caller spelled it
    write_tiny_gguf(tiny_gguf, context=64, layers=3)
    assert read_config(str(tiny_gguf)).max_position_embeddings == 64
    assert check_architecture(str(tiny_gguf)) == 3
    assert parses == ["metadata", "metadata"]


def test_a_config_rewritten_in_place_at_the_same_size_is_read_again(tiny_models, tmp_path):
    """Rewritten within the same clock tick at the same size, a config.json keeps its size,
    inode and mtime (the file system's clock is coarse): a stamp of those alone would serve
    the old config. The mtime is set back to show that case for certain."""
    import os
    import shutil

    from layerprune.models.loading import check_context, read_config

    model = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], model)
    assert read_config(str(model)).max_position_embeddings == 512
    config = model / "config.json"
    before = config.stat()
    config.write_text(config.read_text().replace('"max_position_embeddings": 512',
                                                 '"max_position_embeddings": 256'))
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (config.stat().st_size, config.stat().st_ino) == (before.st_size, before.st_ino)
    assert read_config(str(model)).max_position_embeddings == 256
    with pytest.raises(Exception, match="must be <= 256"):
        check_context(str(model), 300)


def test_a_caller_editing_its_config_or_tokenizer_does_not_change_the_next_callers(tiny_gguf,
                                                                                   parses):
    """Pruning edits the config it read and callers set the tokenizer's padding: the kept
    objects must not be the ones handed out."""
    from layerprune.models.loading import check_architecture, load_tokenizer, read_config

    config = read_config(str(tiny_gguf))
    config.num_hidden_layers = 1
    config.max_position_embeddings = 7
    del config.rms_norm_eps
    again = read_config(str(tiny_gguf))
    assert (again.num_hidden_layers, again.max_position_embeddings) == (2, 128)
    assert again.rms_norm_eps == pytest.approx(1e-5)
    assert check_architecture(str(tiny_gguf)) == 2

    tokenizer = load_tokenizer(str(tiny_gguf))
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_tokens(["<extra>"])
    fresh = load_tokenizer(str(tiny_gguf))
    assert fresh.padding_side == "right" and len(fresh) == VOCAB
    assert fresh("ab t")["input_ids"] == [ord("a"), ord("b"), 256]
    assert sorted(parses) == ["metadata", "metadata"]  # one config, one tokenizer


def test_a_model_loaded_with_the_kept_config_equals_a_plain_transformers_load(tiny_gguf):
    """`load_model` hands from_pretrained the config the checks read (`config=`, documented):
    the model must be the one transformers builds when it reads the config itself."""
    from transformers import AutoModelForCausalLM

    from layerprune.models.loading import load_model

    ours = load_model(str(tiny_gguf), dtype="float32", device="cpu").model
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mine, plain = ours.config.to_dict(), theirs.config.to_dict()
    plain.pop("quantization_config", None)  # `gguf.mark_dequantized` removes it from ours
    assert {k: v for k, v in mine.items() if k != "_name_or_path"} == \
        {k: v for k, v in plain.items() if k != "_name_or_path"}


def test_a_hub_id_is_stamped_by_its_name_and_kept_per_revision():
    """A hub id has no local files to stamp: its revision (pinned to a commit by the loads) is
    what tells one version from another."""
    reads = []
    assert description.stamp("org/name") == ("org/name",)
    for revision in ("a" * 40, "a" * 40, "b" * 40):
        description.remember("config", "org/name", revision, False,
                             lambda: reads.append(revision))
    assert reads == ["a" * 40, "b" * 40]


def test_one_distances_call_reads_a_checkpoint_directorys_config_once(tiny_models, texts_jsonl,
                                                                       tmp_path, monkeypatch):
    """The same on a directory: one AutoConfig read, shared by the checks, the plan, the model
    (`config=`) and the tokenizer (`config=`), which would each read it again."""
    from transformers import AutoConfig

    from layerprune import api

    reads = []
    original = AutoConfig.from_pretrained

    def counted(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", counted)
    api.distances(tiny_models["llama"], texts_jsonl, samples=4, seq_len=16,
                  out=str(tmp_path / "out"), folds=2, bootstrap=0)
    assert reads == [tiny_models["llama"]]


def test_the_next_process_reads_a_ggufs_config_and_tokenizer_from_disk(tiny_gguf, texts_jsonl,
                                                                        tmp_path, parses):
    """The first process converts the GGUF's config and tokenizer once and keeps them in the
    cache; the next (forget(): a new process's memory) parses the file only for its tensors,
    with the same tokens and distances. Catches a cache that is written but never read, one
    keyed so that it never matches, and a converted tokenizer that tokenizes differently."""
    from layerprune import api
    from layerprune.models import description
    from layerprune.models.loading import load_tokenizer, read_config

    def run(name):
        return api.distances(str(tiny_gguf), texts_jsonl, samples=4, seq_len=16,
                             out=str(tmp_path / name), folds=2, bootstrap=0)

    first = run("first")
    assert sorted(parses) == ["metadata", "metadata", "tensors"]
    parsed_tokenizer, parsed_config = load_tokenizer(str(tiny_gguf)), read_config(str(tiny_gguf))
    description.forget()
    parses.clear()
    second = run("second")
    assert parses == ["tensors"]  # no metadata parse: config and tokenizer came from disk
    assert second["distance"] == first["distance"]
    kept_tokenizer, kept_config = load_tokenizer(str(tiny_gguf)), read_config(str(tiny_gguf))
    text = "The capital of France is Paris, said the 3 models."
    assert kept_tokenizer(text)["input_ids"] == parsed_tokenizer(text)["input_ids"]
    assert (kept_tokenizer.bos_token_id, kept_tokenizer.eos_token_id) == \
        (parsed_tokenizer.bos_token_id, parsed_tokenizer.eos_token_id)
    skip = {"transformers_version", "_name_or_path"}
    assert {k: v for k, v in kept_config.to_dict().items() if k not in skip} == \
        {k: v for k, v in parsed_config.to_dict().items() if k not in skip}
    write_tiny_gguf(tiny_gguf, context=64, layers=3)  # a rewritten file: converted again
    description.forget()
    parses.clear()
    assert read_config(str(tiny_gguf)).num_hidden_layers == 3 and parses == ["metadata"]
