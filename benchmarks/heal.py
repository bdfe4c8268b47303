"""Benchmark healing: training tokens/s and peak memory, QLoRA (4-bit NF4 base) vs plain LoRA.

    python benchmarks/heal.py --steps 8 --batch-size 4 --seq-len 128            # both variants
    python benchmarks/heal.py --no-quant --model /path/to/pruned --threads 2     # LoRA only

Each variant runs `layerprune.heal.run.heal` in its own subprocess, so its memory figures are its
own: on a GPU, CUDA max_memory_allocated; on CPU, the peak RSS while training (sampled every
10 ms from the first step's end) and the whole process's peak RSS (which includes loading and the
full-precision reload for merging, and is usually the larger). Tokens/s counts the
training steps after the first (the first pays one-time costs: allocation, kernel warm-up).
By default the model is bundled SmolLM2-135M-Instruct with `--drop` layers removed (heuristic:
the deepest ones but the last).
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pruned HF checkpoint dir (default: bundled "
                   "SmolLM2-135M-Instruct pruned by --drop layers)")
    p.add_argument("--drop", type=int, default=6, help="layers to drop from the bundled model "
                   "when --model is not given (0: the full model)")
    p.add_argument("--data", default="bundled:wiki-heal")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="mlp", choices=["mlp", "attn", "all"])
    p.add_argument("--no-gc", action="store_true", help="disable gradient checkpointing")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-quant", action="store_true", help="plain LoRA only")
    group.add_argument("--quant-only", action="store_true", help="QLoRA only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice / OMP_NUM_THREADS)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one variant
    return p.parse_args(argv)


def prepare_model(args: argparse.Namespace, workdir: Path) -> str:
    if args.model:
        return args.model
    from layerprune.models.assets import resolve_ref

    if args.drop == 0:
        return resolve_ref("bundled:SmolLM2-135M-Instruct")
    from layerprune.method.prune import heuristic_start, save_pruned
    from layerprune.models.loading import load_model

    loaded = load_model("bundled:SmolLM2-135M-Instruct")
    start = heuristic_start(loaded.model.config.num_hidden_layers, args.drop)
    out = workdir / f"pruned-{args.drop}"
    save_pruned(loaded, list(range(start, start + args.drop)), out)
    return str(out)


def run_variant(args: argparse.Namespace, model_dir: str, quant: bool, workdir: Path) -> dict:
    """One heal() run in this process; returns throughput and memory."""
    import psutil
    import torch

    from layerprune.heal.config import HealConfig
    from layerprune.heal.run import heal

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     rank=args.rank, targets=args.targets, quant=quant, save_every=None,
                     gradient_checkpointing=not args.no_gc)
    stamps: list[float] = []
    peak = [0]

    def sample_rss() -> None:  # runs while training: from the first step's end to the last's
        proc = psutil.Process()
        while len(stamps) < cfg.steps:
            if stamps:
                peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    start = time.perf_counter()
    record = heal(model_dir, args.data, str(workdir / ("qlora" if quant else "lora")), cfg,
                  resume=False, progress=lambda step, total: stamps.append(time.perf_counter()))
    sampler.join()
    timed = len(stamps) - 1
    cuda = torch.cuda.is_available()
    return {
        "variant": "qlora" if quant else "lora",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "tokens_per_s": timed * cfg.tokens_per_step / (stamps[-1] - stamps[0]) if timed else None,
        "s_per_step": (stamps[-1] - stamps[0]) / timed if timed else None,
        "first_step_s": stamps[0] - start,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() if cuda else peak[0]) / 2**30,
        "peak_mem_kind": "cuda max_memory_allocated" if cuda else "RSS while training",
        "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "heal_wall_s": record["wall_seconds"],
        "loss": [round(record["initial_train_loss"], 4), round(record["final_train_loss"], 4)],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        variant, model_dir, workdir = json.loads(args.worker)
        print("RESULT " + json.dumps(run_variant(args, model_dir, variant == "qlora",
                                                 Path(workdir))), flush=True)
        return
    variants = ["lora"] if args.no_quant else ["qlora"] if args.quant_only else ["qlora", "lora"]
    with tempfile.TemporaryDirectory(prefix="heal-bench-") as tmp:
        model_dir = prepare_model(args, Path(tmp))
        rows = []
        for variant in variants:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                   "--worker", json.dumps([variant, model_dir, tmp])]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{variant} failed (exit {proc.returncode})")
            rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
    print(f"\nmodel: {args.model or f'bundled SmolLM2-135M-Instruct minus {args.drop} layers'}; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, "
          f"targets {args.targets}, gradient checkpointing {not args.no_gc}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'variant':8} {'device':10} {'threads':>7} {'tokens/s':>9} {'s/step':>7} "
          f"{'peak GiB':>9}  memory measure (process peak RSS GiB)")
    for r in rows:
        print(f"{r['variant']:8} {r['device'][:10]:10} {r['threads']:>7} "
              f"{r['tokens_per_s'] or float('nan'):>9.1f} {r['s_per_step'] or float('nan'):>7.2f} "
              f"{r['peak_mem_gib']:>9.2f}  {r['peak_mem_kind']} ({r['process_peak_rss_gib']:.2f})")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
