"""Benchmark: the scale paths side by side, each run as its own process, timed from outside.

Four tables, each against its baseline:
1. default path: the whole `layerprune distances` process (model load included), default
   options, against a process that loads the same model with plain transformers (AutoTokenizer
   and AutoModelForCausalLM, float32 on the CPU as layerprune computes there) and runs a bare
   batch-1 forward with logits over the same texts; for the safetensors SmolLM2 and for the GGUF
   file it was converted from (transformers parses a GGUF file whole for each config, tokenizer
   and model it reads: layerprune reads its config once, `models.description`), the pair run
   back to back `--repeats` times, the ratio of each pair and their median;
2. extraction held in memory against layer-streamed (`--extraction streamed`): seconds and peak
   anonymous memory, on SmolLM2 and (with `--big`) on the 1.5B Qwen2.5 checkpoint;
3. pruning by checkpoint surgery against load-and-save, on float32 and bfloat16 checkpoints;
4. nf4 against full precision: the distance matrix's largest difference and whether the block
   l*(n) each n chooses agrees.

Peak memory is anonymous memory (heap and tensors: RssAnon of /proc/PID/status, sampled every
20 ms), not RSS: pages of memory-mapped safetensors files count in RSS but are dropped under
pressure, so RSS would charge streaming for what the kernel caches.

    python benchmarks/scale.py [--threads 2] [--samples 200] [--seq-len 256] [--big]
                               [--repeats 1] [--only default,extract,prune,nf4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SMOLLM2 = "bundled:SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "bundled:SmolLM2-135M-Instruct-gguf"  # Q4_1, what SMOLLM2 was converted from
QWEN = "bundled:Qwen2.5-Coder-1.5B-Instruct"  # bfloat16 safetensors, converted on first use
DATA = "bundled:wiki-calibration"
LAYERPRUNE = [sys.executable, "-m", "layerprune.cli"]


def measure(cmd: list[str], threads: int) -> dict:
    """Run `cmd`; its wall time, CPU time (user + system: less swayed than wall time by other
    work on a shared machine) and peak anonymous memory (MB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child, reaped by communicate()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_anon_mb": peak[0] / 1024, "stdout": out}


def bare_forward(model: str, samples: int, seq_len: int) -> None:
    """Child: load the model as a plain transformers user would (no layerprune code on the path:
    a baseline our changes cannot speed up), run a batch-1 forward with logits over the
    calibration texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.method.calibration import sample_texts, tokenize
    from layerprune.models.assets import resolve_ref

    path = Path(resolve_ref(model))
    where = {"gguf_file": path.name} if path.is_file() else {}
    path = path.parent if path.is_file() else path
    tokenizer = AutoTokenizer.from_pretrained(str(path), **where)
    lm = AutoModelForCausalLM.from_pretrained(str(path), **where, dtype=torch.float32).eval()
    ids = tokenize(sample_texts(DATA, samples, None), tokenizer, seq_len)
    with torch.inference_mode():
        for row in ids:
            lm(input_ids=torch.tensor([row]), use_cache=False).logits.sum()


def load_and_save(model: str, start: int, n: int, out: str, dtype: str) -> None:
    """Child: the pruning baseline, the whole model loaded (in `dtype`, or `disk`: the dtype on
    disk) and saved."""
    from layerprune.method.prune import save_pruned
    from layerprune.models.assets import resolve_ref
    from layerprune.models.checkpoint_files import disk_dtype
    from layerprune.models.loading import load_model

    if dtype == "disk":
        dtype = disk_dtype(Path(resolve_ref(model))) or "float32"
    save_pruned(load_model(model, dtype=dtype), list(range(start, start + n)), out)


def libraries_only(model: str) -> None:
    """Child: what every variant pays before any work: the interpreter, torch, transformers and
    the model's class, built on the meta device (no weights) as every command checks it."""
    from layerprune.models.loading import check_architecture

    check_architecture(model)


def distances_cmd(model: str, args, out: str, *extra: str) -> list[str]:
    return [*LAYERPRUNE, "distances", "--model", model, "--data", DATA, "--samples",
            str(args.samples), "--seq-len", str(args.seq_len), "--out", out, *extra]


def row(name: str, r: dict, base: dict) -> str:
    return (f"{name:58s} {r['seconds']:8.1f} {r['seconds'] / base['seconds']:6.2f} "
            f"{r['peak_anon_mb']:9.0f} {r['peak_anon_mb'] / base['peak_anon_mb']:6.2f}")


HEADER = f"{'variant':58s} {'seconds':>8s} {'ratio':>6s} {'anon MB':>9s} {'ratio':>6s}"


def table_default(args, tmp: Path) -> None:
    import statistics

    for model in (SMOLLM2, SMOLLM2_GGUF):
        print(f"\n1. default path, {model}, {args.samples} passages x {args.seq_len} tokens, "
              f"{args.threads} threads (OMP_NUM_THREADS), whole process, {args.repeats} pair(s)")
        print(HEADER)
        ratios, cpu_ratios = [], []
        for r in range(args.repeats):
            runs = {"base": lambda: measure(
                        [sys.executable, __file__, "--child", "bare-forward", "--model", model,
                         "--samples", str(args.samples), "--seq-len", str(args.seq_len)],
                        args.threads),
                    "ours": lambda: measure(distances_cmd(model, args, str(tmp / f"default-{r}")),
                                            args.threads)}
            # Alternate which runs first, so a machine busier early or late favours neither.
            done = {k: runs[k]() for k in (("base", "ours") if r % 2 == 0 else ("ours", "base"))}
            base, ours = done["base"], done["ours"]
            print(row(f"[{r + 1}] load + bare forward with logits, batch 1", base, base))
            print(row(f"[{r + 1}] layerprune distances (defaults)", ours, base))
            ratios.append(ours["seconds"] / base["seconds"])
            cpu_ratios.append(ours["cpu_seconds"] / base["cpu_seconds"])
            print(f"    CPU seconds (user + system): bare forward {base['cpu_seconds']:.1f}, "
                  f"distances {ours['cpu_seconds']:.1f}")
        for what, values in (("wall", ratios), ("CPU", cpu_ratios)):
            print(f"distances / bare forward, whole process, {what} time: "
                  f"{', '.join(f'{x:.2f}' for x in values)} "
                  f"(median {statistics.median(values):.2f})")


def table_extract(args, tmp: Path, model: str, samples: int, seq_len: int, budget: str) -> None:
    a = argparse.Namespace(samples=samples, seq_len=seq_len)
    print(f"\n2. extraction, {model}, {samples} passages x {seq_len} tokens, float32 compute, "
          f"{args.threads} threads")
    held = measure(distances_cmd(model, a, str(tmp / "held"), "--extraction", "in-memory"),
                   args.threads)
    streamed = measure(distances_cmd(model, a, str(tmp / "streamed"), "--extraction", "streamed",
                                     "--max-memory", budget), args.threads)
    diff = max_difference(tmp / "held", tmp / "streamed")
    print(HEADER)
    print(row("in memory", held, held))
    print(row(f"streamed (--max-memory {budget})", streamed, held))
    print(f"largest |difference| of the distance matrices: {diff:.2e}")


def bfloat16_copy(model: str, out: Path) -> None:
    """Child: `model` saved in bfloat16, as hub checkpoints are stored."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerprune.models.assets import resolve_ref
    from layerprune.models.loading import load_tokenizer

    AutoModelForCausalLM.from_pretrained(resolve_ref(model), dtype=torch.bfloat16) \
        .save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)


def table_prune(args, tmp: Path, models: list[str]) -> None:
    print("\n3. pruning a block of 6 layers from layer 12: checkpoint surgery vs load-and-save")
    bf16 = tmp / "smollm2-bf16"
    subprocess.run([sys.executable, __file__, "--child", "bf16-copy", "--model", SMOLLM2,
                    "--out", str(bf16)], check=True, capture_output=True)
    print(HEADER + f" {'above':>6s}")
    for i, model in enumerate([models[0], str(bf16), *models[1:]]):
        name = Path(model.split(":")[-1]).name
        libraries = measure([sys.executable, __file__, "--child", "libraries", "--model", model],
                            args.threads)
        print(f"{name}: interpreter, libraries and the model's class alone: "
              f"{libraries['seconds']:.1f} s, {libraries['peak_anon_mb']:.0f} MB ('above' is "
              "the peak above that)")
        runs = {}
        for label, dtype in (("load float32 + save (former default)", "float32"),
                             ("load in its dtype + save", "disk")):
            runs[label] = measure([sys.executable, __file__, "--child", "load-and-save",
                                   "--model", model, "--dtype", dtype,
                                   "--out", str(tmp / f"saved-{i}-{dtype}")], args.threads)
        runs["surgery (layerprune prune)"] = measure(
            [*LAYERPRUNE, "prune", "--model", model, "--n", "6", "--start", "12",
             "--out", str(tmp / f"surgery-{i}")], args.threads)
        base = runs["load float32 + save (former default)"]
        for label, r in runs.items():
            print(row(f"{name}: {label}", r, base)
                  + f" {r['peak_anon_mb'] - libraries['peak_anon_mb']:6.0f}")


def table_nf4(args, tmp: Path) -> None:
    print(f"\n4. nf4 vs float32 distances, {SMOLLM2}, {args.samples} passages x "
          f"{args.seq_len} tokens")
    measure(distances_cmd(SMOLLM2, args, str(tmp / "fp32")), args.threads)
    measure(distances_cmd(SMOLLM2, args, str(tmp / "nf4"), "--quantization", "nf4"),
            args.threads)
    full, quant = (json.loads((tmp / d / "distances.json").read_text())["distance"]
                   for d in ("fp32", "nf4"))
    print(f"{'n':>3s} {'l*(n) fp32':>10s} {'l*(n) nf4':>10s} {'agree':>6s} {'max |diff|':>11s}")
    agree = 0
    for n, (a, b) in enumerate(zip(full, quant), start=1):
        la, lb = a.index(min(a)), b.index(min(b))
        agree += la == lb
        print(f"{n:3d} {la:10d} {lb:10d} {'yes' if la == lb else 'NO':>6s} "
              f"{max(abs(x - y) for x, y in zip(a, b)):11.4f}")
    print(f"l*(n) agrees for {agree} of {len(full)} block sizes")


def max_difference(a: Path, b: Path) -> float:
    da, db = (json.loads((d / "distances.json").read_text())["distance"] for d in (a, b))
    return max(abs(x - y) for ra, rb in zip(da, db) for x, y in zip(ra, rb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="pairs run back to back (table 1)")
    p.add_argument("--big", action="store_true",
                   help="also the 1.5B Qwen2.5 (fetches 1.1 GB of wheels on first use)")
    p.add_argument("--only", default="default,extract,prune,nf4")
    p.add_argument("--child", choices=["bare-forward", "load-and-save", "bf16-copy", "libraries"],
                   help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="disk", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "bare-forward":
        return bare_forward(args.model, args.samples, args.seq_len)
    if args.child == "load-and-save":
        return load_and_save(args.model, 12, 6, args.out, args.dtype)
    if args.child == "libraries":
        return libraries_only(args.model)
    if args.child == "bf16-copy":
        return bfloat16_copy(args.model, Path(args.out))
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="layerprune-scale-") as tmp:
        tmp = Path(tmp)
        if "default" in only:
            table_default(args, tmp)
        if "extract" in only:
            table_extract(args, tmp / "smol", SMOLLM2, 64, 128, "150MB")
            if args.big:
                table_extract(args, tmp / "qwen", QWEN, 16, 128, "700MB")
        if "prune" in only:
            table_prune(args, tmp, [SMOLLM2] + ([QWEN] if args.big else []))
        if "nf4" in only:
            table_nf4(args, tmp)


if __name__ == "__main__":
    main()
