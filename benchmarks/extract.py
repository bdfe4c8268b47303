"""Benchmark: the distance pass (hidden-state capture) against a bare forward pass with logits.

Each variant runs in its own process so that its peak memory (max RSS on CPU, max allocated on
CUDA) is its own. Same texts, same model, same dtype for every variant; the ratio column is
time / time of the bare forward at batch 1.

    python benchmarks/extract.py [--model bundled:SmolLM2-135M-Instruct] [--texts 24]
                                 [--seq-len 256] [--batch-size 8] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = {
    # name: (what runs, batch size; None = --batch-size)
    "forward+logits, batch 1": ("forward", 1),
    "forward+logits, batch B, padded in order": ("forward", None),
    "distance pass, batch 1": ("distance", 1),
    "distance pass, batch B, length-bucketed": ("distance", None),
}


def run_variant(args, kind: str, batch_size: int) -> dict:
    import torch

    from layerprune.method.batching import make_batch, pad_token_id
    from layerprune.method.calibration import tokenize
    from layerprune.method.data import read_records
    from layerprune.method.hidden_states import last_token_states
    from layerprune.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.dtype, args.device)
    ids = tokenize(read_records(args.data, limit=args.texts), loaded.tokenizer, args.seq_len)
    pad = pad_token_id(loaded.tokenizer)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if kind == "distance":
        last_token_states(loaded.model, ids, batch_size, "right", pad, show_bar=False)
    else:
        with torch.inference_mode():
            for i in range(0, len(ids), batch_size):  # in the given order: no bucketing
                b = make_batch(ids, list(range(i, min(i + batch_size, len(ids)))), pad,
                               device=args.device)
                loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             position_ids=b.position_ids, use_cache=False).logits.sum()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": seconds, "peak_mb": peak,
            "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
            "tokens": sum(len(r) for r in ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    p.add_argument("--data", default="bundled:wiki-calibration")
    p.add_argument("--texts", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the best is kept")
    args = p.parse_args()
    if args.variant:
        kind, b = VARIANTS[args.variant]
        print(json.dumps(run_variant(args, kind, b or args.batch_size)))
        return
    print(f"model {args.model}, {args.texts} texts <= {args.seq_len} tokens, dtype {args.dtype}, "
          f"device {args.device}, {args.threads} threads, B = {args.batch_size}")
    results = {}
    for name in VARIANTS:
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", name],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        results[name] = min(runs, key=lambda r: r["seconds"])
    base = results["forward+logits, batch 1"]
    print(f"{'variant':44s} {'seconds':>8s} {'ratio':>6s} {'tok/s':>7s} {'peak MB':>8s}")
    for name, r in results.items():
        print(f"{name:44s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:6.2f} "
              f"{r['tokens'] / r['seconds']:7.0f} {r['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
