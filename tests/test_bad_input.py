"""Bad input, everywhere: every subcommand refuses it with one line naming the parameter, exit
status 2, nothing written, and (where the input allows) before any weights load.

The model is a tiny random Llama (tests/conftest.py) pruned once by `layerprune prune`, so the
same broken copies serve every subcommand, `heal` included. `weights_must_not_load` is a
tripwire, not a mock: it makes reaching `from_pretrained` fail the test, which is how "refused
before heavy work" is checked. Unreadable files: the tests run as root, which chmod 000 does not
stop, so "unreadable" is a directory where a file is expected, a FIFO, and binary or non-UTF-8
bytes under a text name. A full disk is a 64 KiB tmpfs mounted in the test (skipped, saying
why, where mounting is not permitted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerprune.cli import main

# Past the 512-token context of the tiny models: every record is longer than any of them hold.
LONG_TEXT = " ".join(f"word{i}" for i in range(700))


@pytest.fixture(scope="module")
def broken(pruned, tmp_path_factory) -> dict[str, Path]:
    """Copies of `pruned`, each broken in one way (all keep prune.json, so heal reaches the
    same check as the others)."""
    root = tmp_path_factory.mktemp("broken")
    made = {}
    for kind in ("truncated", "garbage", "no-weights", "no-tokenizer", "unknown-type"):
        made[kind] = root / kind
        shutil.copytree(pruned, made[kind])
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (made["garbage"] / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header" * 50)
    (made["no-weights"] / "model.safetensors").unlink()
    for f in made["no-tokenizer"].glob("tokenizer*"):
        f.unlink()
    config = json.loads((made["unknown-type"] / "config.json").read_text())
    (made["unknown-type"] / "config.json").write_text(json.dumps({**config,
                                                                  "model_type": "nonsense"}))
    return made


# bitsandbytes logs this once per process, when it is first imported on a CPU without the
# optional `kernels` package (heal imports it with the Trainer): an environment notice, not
# part of the error, so it is the one line the tests do not count.
IMPORT_NOTICES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


# A tqdm bar (loading, scoring, training): only where the failure comes after the work.
PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|[^|]*\| *\d+/\d+ \[")


def _refused(argv: list[str], capsys, *phrases: str, after_work: bool = False) -> str:
    """Run the CLI in-process: exit status 2 and exactly one line on stderr, the error, which
    contains every phrase. Returns that line. `after_work`: progress bars may come first (a
    bar left open by the failure may even share the error's line, as on a terminal)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    if after_work:
        err = re.sub(r"(?<=\])(layerprune \S+: error: )", r"\n\1", err.replace("\r", "\n"))
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(IMPORT_NOTICES)
             and not (after_work and PROGRESS_BAR.match(line))]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"layerprune {argv[0]}: error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def _command(name: str, model: str, data: str, out: Path) -> list[str]:
    """The smallest complete command line of each model-taking subcommand."""
    return {
        "distances": ["distances", "--model", model, "--data", data, "--samples", "2",
                      "--seq-len", "8"],
        "prune": ["prune", "--model", model, "--n", "1", "--start", "0"],
        "loss": ["loss", "--model", model, "--data", data, "--seq-len", "8"],
        "eval": ["eval", "--model", model, "--tasks", "loss", "--data", data, "--seq-len", "8"],
        "heal": ["heal", "--model", model, "--data", data, "--steps", "1", "--seq-len", "8",
                 "--no-quant"],
    }[name] + ["--out", str(out)]


COMMANDS = ["distances", "prune", "loss", "eval", "heal"]


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("kind, phrase", [
    ("truncated", "is truncated or corrupt: its header describes"),
    ("garbage", "is not a valid safetensors file"),
    ("no-weights", "has a config.json but no weights (expected model.safetensors"),
    ("no-tokenizer", "has no tokenizer (none of tokenizer.json"),
    ("unknown-type", "cannot read the config of"),
])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_broken_model_directory_is_refused_before_loading(command, kind, phrase, broken,
                                                            texts_jsonl, tmp_path, capsys,
                                                            weights_must_not_load):
    out = tmp_path / "out"
    line = _refused(_command(command, str(broken[kind]), texts_jsonl, out), capsys, "model: ",
                    phrase)
    assert str(broken[kind]) in line
    assert not out.exists()


def _tiny_gguf(path: Path, tokenizer: bool = True) -> Path:
    """A small, structurally valid GGUF file (two tensors, F32 and F16)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((8, 16), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_structure_check_accepts_whole_files_and_finds_every_cut(tmp_path):
    """Cut anywhere (inside the metadata, inside the tensor records, by one byte of tensor
    data) and the file is refused; the whole file passes. A check of the magic bytes alone, or
    one that never compares the tensors' extent with the file size, passes the cut files."""
    from layerprune.errors import LayerPruneError
    from layerprune.models.checkpoint_files import gguf_keys
    from layerprune.models.loading import check_tokenizer

    whole = _tiny_gguf(tmp_path / "whole.gguf")
    data = whole.read_bytes()
    assert {"tokenizer.ggml.model", "llama.block_count"} <= gguf_keys(whole)
    for cut in (30, len(data) // 3, len(data) - 1):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(LayerPruneError, match="truncated or corrupt GGUF"):
            gguf_keys(part)
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(LayerPruneError, match="not a GGUF file"):
        gguf_keys(tmp_path / "foreign.gguf")
    bare = _tiny_gguf(tmp_path / "bare.gguf", tokenizer=False)
    with pytest.raises(LayerPruneError, match="has no tokenizer in its metadata"):
        check_tokenizer(str(bare))
    check_tokenizer(str(whole))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bare_corrupt_gguf_path_is_refused(command, tmp_path, texts_jsonl, capsys,
                                             weights_must_not_load):
    data = _tiny_gguf(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-8])
    _refused(_command(command, str(cut), texts_jsonl, tmp_path / "out"), capsys,
             f"model: {str(cut)!r} is a truncated or corrupt GGUF file (its tensors need")
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_real_gguf_passes_and_a_truncated_copy_fails_as_a_process(real_assets, tmp_path):
    """The real SmolLM2 GGUF (Q4_1, 49k-token vocabulary) passes the structure check, so the
    check has no false alarm on a real file; a copy cut at 90% is refused by the installed
    command as a process: exit status 2, one stderr line, no traceback, nothing written."""
    from layerprune.models import assets
    from layerprune.models.checkpoint_files import gguf_keys

    real = assets.resolve("bundled:SmolLM2-135M-Instruct-gguf")
    assert "tokenizer.ggml.model" in gguf_keys(real)
    cut = tmp_path / "smollm2-cut.gguf"
    with open(real, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(real.stat().st_size * 0.9)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "layerprune.cli", "loss", "--model", str(cut),
                           "--data", "bundled:wiki-heldout", "--seq-len", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"layerprune loss: error: model: {str(cut)!r} is a truncated or corrupt GGUF file "
        f"(its tensors need {real.stat().st_size:,} bytes, the file has "
        f"{cut.stat().st_size:,})"]
    assert not out.exists()


# ----------------------------------------------------------------------------- data files

def _bad_data(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(path, phrase of the error) for a data file that cannot be read as text records."""
    if kind == "directory":
        path = tmp_path / "records.jsonl"
        path.mkdir()
        return str(path), "is not a saved Hugging Face dataset"
    if kind == "fifo":
        path = tmp_path / "records.jsonl"
        os.mkfifo(path)

        # Were the FIFO opened, this writer lets the read end (the test fails; it never hangs).
        def feed():
            with open(path, "w") as f:
                f.write(json.dumps({"text": "fed through the FIFO"}) + "\n")

        threading.Thread(target=feed, daemon=True).start()
        return str(path), "is not a regular file or directory (a FIFO)"
    if kind == "binary":
        path = tmp_path / "records.jsonl"
        path.write_bytes(bytes(range(256)) * 4)
        return str(path), "is not UTF-8 text (byte 0x80 at offset 128)"
    if kind == "latin-1-late":  # past the 64 KiB the early check reads: found by the reader
        path = tmp_path / "records.txt"
        path.write_bytes(("plain ascii text\n\n" * 5000).encode() + "café".encode("latin-1"))
        return str(path), "is not UTF-8 text (byte 0xe9 at offset"
    if kind == "jsonl-late":  # the bad line is reported by number, wherever it is
        path = tmp_path / "records.jsonl"
        good = json.dumps({"text": "a fine record"}).encode() + b"\n"
        path.write_bytes(good * 8000 + b'{"text": "caf\xe9"}\n')
        return str(path), "line 8001 of 'PATH' is not UTF-8 text (byte 0xe9 at column 14)"
    if kind == "parquet-cut":
        import pandas as pd

        whole = tmp_path / "whole.parquet"
        pd.DataFrame({"text": ["one record", "another"]}).to_parquet(whole)
        path = tmp_path / "records.parquet"
        path.write_bytes(whole.read_bytes()[:-20])
        return str(path), "is not a complete Parquet file"
    raise AssertionError(kind)


# jsonl-late only where every record is read: distances (no seed) and heal read only the
# records they use, and a bad line beyond them is no error of theirs.
@pytest.mark.parametrize("command, kind", [
    (command, kind) for command in ("distances", "loss", "eval", "heal")
    for kind in ("directory", "fifo", "binary", "latin-1-late", "jsonl-late", "parquet-cut")
    if kind != "jsonl-late" or command in ("loss", "eval")])
def test_unreadable_data_is_refused_before_loading(command, kind, pruned, tmp_path, capsys,
                                                   weights_must_not_load):
    data, phrase = _bad_data(kind, tmp_path)
    phrase = phrase.replace("'PATH'", repr(data))
    line = _refused(_command(command, str(pruned), data, tmp_path / "out"), capsys, phrase)
    assert line.split(": error: ")[1].startswith("data: ") and repr(data) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["distances", "loss", "eval", "heal"])
def test_seq_len_beyond_the_context_is_refused(command, pruned, tmp_path, capsys,
                                               weights_must_not_load):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": LONG_TEXT}) + "\n" + json.dumps({"text": "x y"}) + "\n")
    argv = _command(command, str(pruned), str(data), tmp_path / "out")
    argv[argv.index("--seq-len") + 1] = "600"
    _refused(argv, capsys, "seq_len must be <= 512 (the context of model", "got 600")
    assert not (tmp_path / "out").exists()


def test_records_longer_than_the_context_are_truncated_and_counted(tiny_models, tmp_path,
                                                                   capsys, tokenizer):
    """What users expect of text longer than any context: scored on its first seq_len tokens
    (the documented contract, as the paper's calibration does), and the result says how many
    records were cut. Two of four records are longer than the model's 512 positions; one is
    exactly seq_len tokens long, which is not a cut."""
    exact = "Paris is the capital and most populous city of France."
    seq_len = len(tokenizer(exact)["input_ids"])
    texts = [LONG_TEXT, exact, LONG_TEXT.upper(), "short"]
    assert all(len(tokenizer(t)["input_ids"]) > 512 for t in (texts[0], texts[2]))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    assert main(["loss", "--model", tiny_models["llama"], "--data", str(data), "--seq-len",
                 str(seq_len), "--out", str(out)]) == 0
    record = json.loads((out / "loss.json").read_text())
    assert (record["records"], record["truncated"], record["seq_len"]) == (4, 2, seq_len)
    short = len(tokenizer(texts[3])["input_ids"])
    assert record["tokens"] == 3 * (seq_len - 1) + (short - 1)


# ----------------------------------------------------------------------------- eval, heal

@pytest.mark.parametrize("extra, phrases", [
    (["--tasks", "loss,mmlux"], ["tasks: unknown ['mmlux']; valid tasks are ['mmlu', 'boolq'"]),
    (["--tasks", "boolq", "--limit", "0"], ["limit must be a positive integer", "got 0"]),
    (["--tasks", "boolq", "--limit", "-3"], ["limit must be a positive integer", "got -3"]),
    (["--tasks", "loss", "--samples", "0"], ["loss_samples must be a positive integer"]),
    (["--tasks", "boolq", "--shots", "-1"], ["shots must be an integer >= 0"]),
    (["--tasks", "loss", "--seq-len", "1"], ["loss_seq_len must be an integer >= 2"]),
    (["--tasks", "boolq", "--batch-size", "0"], ["batch_size must be a positive integer"]),
])
def test_eval_arguments(extra, phrases, pruned, tmp_path, capsys, weights_must_not_load):
    _refused(["eval", "--model", str(pruned), *extra, "--out", str(tmp_path / "out")], capsys,
             *phrases)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, phrases", [
    (["--steps", "0"], ["steps: Input should be greater than or equal to 1 (got 0)"]),
    (["--steps", "1", "--rank", "65"], ["rank: Input should be less than or equal to 64"]),
    (["--steps", "1", "--lr", "0"], ["lr: Input should be greater than 0"]),
    (["--steps", "1", "--batch-size", "0"], ["batch_size: Input should be greater than"]),
    (["--steps", "1", "--save-every", "0"], ["save_every: Input should be greater than"]),
    (["--steps", "1", "--seq-len", "1"], ["seq_len: Input should be greater than or equal"]),
])
def test_heal_arguments(extra, phrases, pruned, texts_jsonl, tmp_path, capsys,
                        weights_must_not_load):
    _refused(["heal", "--model", str(pruned), "--data", texts_jsonl, *extra, "--out",
              str(tmp_path / "out")], capsys, "heal config: ", *phrases)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, phrases", [
    (["--method", "distill"], ["steps (--steps) is required for method 'distill'"]),
    (["--method", "linear+distill"], ["steps (--steps) is required for method 'linear+distill'"]),
    (["--method", "distill", "--steps", "1", "--kl-weight", "2"],
     ["heal config: kl_weight: Input should be less than or equal to 1"]),
    (["--method", "distill", "--steps", "1", "--temperature", "0"],
     ["heal config: temperature: Input should be greater than 0"]),
    (["--method", "linear", "--samples", "0"],
     ["heal config: linear_samples: Input should be greater than or equal to 1"]),
])
def test_heal_method_arguments(extra, phrases, pruned, texts_jsonl, tmp_path, capsys,
                               weights_must_not_load):
    _refused(["heal", "--model", str(pruned), "--data", texts_jsonl, *extra, "--out",
              str(tmp_path / "out")], capsys, *phrases)
    assert not (tmp_path / "out").exists()


def test_heal_teacher_must_be_the_unpruned_source(pruned, texts_jsonl, tmp_path, capsys,
                                                  weights_must_not_load):
    """The pruned checkpoint given as its own teacher: 3 layers where prune.json says 4."""
    _refused(["heal", "--model", str(pruned), "--data", texts_jsonl, "--method", "distill",
              "--steps", "1", "--teacher", str(pruned), "--out", str(tmp_path / "out")], capsys,
             "teacher: ", "has 3 decoder layers", "num_layers_before")
    assert not (tmp_path / "out").exists()


def test_heal_takes_only_a_pruned_checkpoint(tiny_models, pruned, texts_jsonl, tmp_path, capsys,
                                             weights_must_not_load):
    """The unpruned source model, a prune.json that is not JSON, and a prune.json copied onto
    other weights (its layer count disagrees with the config) are each refused."""
    out = tmp_path / "out"
    base = ["--data", texts_jsonl, "--steps", "1", "--out", str(out)]
    _refused(["heal", "--model", tiny_models["llama"], *base], capsys,
             "is not a pruned checkpoint (no prune.json)", "layerprune prune")
    bad_json = tmp_path / "bad-json"
    shutil.copytree(pruned, bad_json)
    (bad_json / "prune.json").write_text("{not json")
    _refused(["heal", "--model", str(bad_json), *base], capsys, "is not a valid prune record")
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_models["llama"], foreign)
    shutil.copy(pruned / "prune.json", foreign / "prune.json")
    _refused(["heal", "--model", str(foreign), *base], capsys,
             "says 3 layers remain after removing 1, but the checkpoint's config has 4")
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    _refused(["heal", "--model", str(gguf), *base], capsys, "is not a pruned checkpoint directory")
    assert not out.exists()


# ----------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("below", [False, True])
def test_heal_out_that_is_a_file(below, pruned, texts_jsonl, tmp_path, capsys,
                                 weights_must_not_load):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    out = taken / "below" if below else taken
    _refused(["heal", "--model", str(pruned), "--data", texts_jsonl, "--steps", "1", "--out",
              str(out)], capsys,
             f"out: {str(out)!r} cannot be a directory: {str(taken)!r} is a file")
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("below", [False, True])
def test_fetch_cache_that_is_a_file(below, tmp_path, monkeypatch, capsys):
    """fetch writes into LAYERPRUNE_CACHE (it has no --out): a file there is refused before any
    download starts (the asset named is one that would download 1.1 GB)."""
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(taken / "cache" if below else taken))
    _refused(["fetch", "--model", "Qwen2.5-Coder-1.5B-Instruct"], capsys,
             "LAYERPRUNE_CACHE: ", f"{str(taken)!r} is a file")
    assert taken.read_text() == "keep me"


def test_argument_errors_are_one_line_too(capsys):
    """argparse's own refusals (not an int, a bad JSON device map) print one line, not the
    usage block, and exit 2 like every other input error."""
    for argv, phrase in [
        (["distances", "--model", "m", "--data", "d", "--samples", "x", "--seq-len", "8",
          "--out", "o"], "argument --samples: invalid int value: 'x'"),
        (["loss", "--model", "m", "--data", "d", "--seq-len", "8", "--device-map", "{bad",
          "--out", "o"], "argument --device-map: not a JSON object"),
        (["nosuch"], "argument command: invalid choice: 'nosuch'"),
        (["heal", "--model", "m", "--data", "d", "--method", "foo", "--out", "o"],
         "argument --method: invalid choice: 'foo'"),
        (["heal", "--model", "m", "--data", "d", "--method", "distill", "--steps", "1",
          "--teacher-logits", "disk", "--out", "o"],
         "argument --teacher-logits: invalid choice: 'disk'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0] and "--help" in lines[0], lines


# ----------------------------------------------------------------------------- full disk

@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: far too small for any checkpoint. Skipped where mounting is not
    permitted (not root, or a container without CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root with CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Leave no byte free: a write of even a small JSON file fails."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} | \
        {str(p.relative_to(root)) for p in root.rglob(".*")}


def test_a_full_disk_leaves_the_old_json_and_no_temporary_file(tiny_disk):
    """write_json_atomic: temp file + rename, the temp removed on error: after a failed rewrite
    the previous version is intact and nothing else is on the disk."""
    from layerprune.store.files import NoSpaceLeft, write_json_atomic

    target = tiny_disk / "record.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(NoSpaceLeft, match="no space left on device writing .*record.json"):
        write_json_atomic(target, {"version": 2, "pad": "x" * 200_000})
    assert json.loads(target.read_text()) == {"version": 1}
    assert _listing(tiny_disk) == {"record.json"}


@pytest.mark.parametrize("command, out_name", [
    (["prune", "--n", "1", "--start", "0"], None),              # surgery: 12 MB of tensors
    (["prune", "--n", "1", "--start", "0", "--dtype", "bfloat16"], None),  # load + save
    (["distances", "--data", "TEXTS", "--samples", "2", "--seq-len", "8"], "FILL"),
    (["loss", "--data", "TEXTS", "--seq-len", "8"], "loss.json"),
    (["eval", "--tasks", "loss", "--data", "TEXTS", "--seq-len", "8"], "metrics.json"),
])
def test_a_full_disk_fails_in_one_line_and_leaves_nothing(command, out_name, tiny_models,
                                                          texts_jsonl, tiny_disk, capsys):
    """One line naming out and what was written, exit 2; no out directory, no temporary
    directory, not even the parents of out that the run created."""
    if out_name is not None:
        _fill(tiny_disk)
    before = _listing(tiny_disk)
    out = tiny_disk / "new" / "parents" / "out"
    argv = [command[0], "--model", tiny_models["llama"],
            *[texts_jsonl if a == "TEXTS" else a for a in command[1:]], "--out", str(out)]
    line = _refused(argv, capsys, "out: no space left on device writing ", after_work=True)
    if out_name not in (None, "FILL"):
        assert line.endswith(f"{str(out / out_name)!r}"), line
    assert _listing(tiny_disk) == before


def test_a_full_disk_while_healing_is_one_line(pruned, texts_jsonl, tiny_disk, capsys):
    """The Trainer's checkpoint writer (torch's zip writer) hides the errno; still one line.
    What healing keeps in out for a resume is heal_checkpoints.py's business, not checked here."""
    out = tiny_disk / "healed"
    _refused(["heal", "--model", str(pruned), "--data", texts_jsonl, "--steps", "2",
              "--seq-len", "8", "--batch-size", "1", "--save-every", "1", "--no-quant",
              "--out", str(out)], capsys, f"out: no space left on device writing {str(out)!r}",
             after_work=True)
    assert not (out / "heal.json").exists() and not (out / "merged").exists()


@pytest.mark.real
def test_a_full_disk_while_fetching_leaves_no_half_file(real_assets, tiny_disk, monkeypatch,
                                                        capsys):
    """fetch builds the wiki text sets from the saved datasets (linked in, nothing downloaded)
    into a cache on the full disk: one line naming LAYERPRUNE_CACHE, no .tmp file left."""
    from layerprune.models import assets

    (tiny_disk / "data").mkdir()
    (tiny_disk / "data" / "hf_datasets").symlink_to(assets.resolve("bundled:hf_datasets"))
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tiny_disk))
    _refused(["fetch", "--model", "wiki-heal"], capsys,
             "LAYERPRUNE_CACHE: no space left on device writing the assets into")
    assert _listing(tiny_disk) == {"data", "data/hf_datasets", "data/wiki"}


# ----------------------------------------------------------------------------- flow parameters

@pytest.mark.parametrize("flow_name", ["prune_and_heal", "sweep"])
@pytest.mark.parametrize("via_env", [False, True])
def test_an_artifact_root_that_is_a_file_is_refused_when_the_run_starts(flow_name, via_env,
                                                                        tmp_path, monkeypatch):
    """`artifacts` (or LAYERPRUNE_ARTIFACTS, its default) naming a file, or a path below one:
    Prefect's own parameter validation, the step a run takes before its body, refuses it with
    a message naming the parameter (and the variable), and creates nothing."""
    import importlib

    from prefect.exceptions import ParameterTypeError

    taken = tmp_path / "taken"
    taken.write_text("keep me")
    flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
    for root in (taken, taken / "below"):
        if via_env:
            monkeypatch.setenv("LAYERPRUNE_ARTIFACTS", str(root))
            params = {}
        else:
            params = {"artifacts": str(root)}
        with pytest.raises(ParameterTypeError) as err:
            flow.validate_parameters({"params": params})
        message = str(err.value)
        assert "artifacts" in message and f"{str(taken)!r} is a file" in message, message
        assert ("(from env LAYERPRUNE_ARTIFACTS)" in message) == via_env, message
    assert taken.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [taken]


def _schema(flow_name: str) -> dict:
    import importlib

    from prefect.utilities.callables import parameter_schema

    flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
    return parameter_schema(flow.fn).model_dump_for_openapi()


BAD_PARAMS = [
    ("prune_and_heal", {"benchmarks": {"tasks": {"mmlux": 1}}}),
    ("prune_and_heal", {"calibration": {"seed": -1}}),
    ("prune_and_heal", {"calibration": {"data": "  "}}),
    ("prune_and_heal", {"calibration": {"text_field": ""}}),
    ("prune_and_heal", {"loss": {"seq_len": 1}}),
    ("prune_and_heal", {"extraction": {"max_memory": "lots"}}),
    ("prune_and_heal", {"model": {"ref": "   "}}),
    ("prune_and_heal", {"model": {"revision": "my branch"}}),
    ("prune_and_heal", {"model": {"device_map": {"model.layers.0": -1}}}),
    ("prune_and_heal", {"model": {"device_map": {"lm_head": "gpu0"}}}),
    ("prune_and_heal", {"model": {"max_memory": {"0": "70 gigs"}}}),
    ("prune_and_heal", {"heal": {"data": ""}}),
    ("prune_and_heal", {"heal": {"config": {"seed": -1}}}),
    ("prune_and_heal", {"heal": {"config": {"seed": 2**32}}}),
    ("prune_and_heal", {"heal": {"config": {"text_field": ""}}}),
    ("prune_and_heal", {"heal": {"config": {"steps": 0}}}),
    ("prune_and_heal", {"artifacts": ""}),
    ("sweep", {"artifacts": " "}),
    ("sweep", {"benchmarks": {"tasks": {"loss": 3}}}),
    ("sweep", {"calibration": {"seed": -5}}),
]


@pytest.mark.parametrize("flow_name, params", BAD_PARAMS)
def test_more_bad_parameters_are_refused_at_submission(flow_name, params):
    """The server checks a run's parameters against this JSON schema when the run is created
    (enforce_parameter_schema): each bound below lived only in Python, or nowhere, before."""
    import jsonschema

    schema = _schema(flow_name)
    jsonschema.validate({"params": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"params": params}, schema)


@pytest.mark.parametrize("flow_name, params", [
    ("prune_and_heal", {"benchmarks": {"tasks": {"boolq": 5, "mmlu": None}}}),
    ("prune_and_heal", {"calibration": {"seed": 0}}),
    ("prune_and_heal", {"model": {"device_map": {"model.layers.0": 0, "lm_head": "cpu",
                                                 "model.norm": "cuda:1"},
                                  "max_memory": {"0": "70GiB", "cpu": "1.5 TB"}}}),
    ("prune_and_heal", {"extraction": {"max_memory": "700MB"}}),
    ("prune_and_heal", {"heal": {"config": {"seed": 2**32 - 1}}}),
    ("sweep", {"artifacts": "s3://bucket/prefix"}),
])
def test_good_parameters_still_pass_the_schema(flow_name, params):
    """The new bounds are not too tight: values users write are accepted."""
    import jsonschema

    jsonschema.validate({"params": params}, _schema(flow_name))


def test_the_schemas_enums_and_patterns_agree_with_the_code():
    """The task enum and the size pattern copy facts the code owns (benchmarks.TASKS,
    placement.parse_size): a task added there, or a size format, must be added here."""
    import re
    import typing

    from layerprune.config import BenchmarkTask, Size
    from layerprune.errors import LayerPruneError
    from layerprune.evaluate.benchmarks import TASKS
    from layerprune.models.placement import parse_size

    assert set(typing.get_args(BenchmarkTask)) == set(TASKS) - {"loss"}
    pattern = re.compile(typing.get_args(Size)[1].metadata[0].pattern)
    for text in ["700MB", "40GB", "1.5GiB", "4096", " 12 kb ", "2TiB", "3 B", "lots", "-3GB",
                 "1.5", "GB", "10 PB", "7MiBs"]:
        try:
            accepted = parse_size(text) > 0
        except LayerPruneError:
            accepted = False
        assert bool(pattern.match(text)) == accepted, text
