"""Cross-check: the same lm-eval tasks scored by lm-eval's HFLM and by our SharedPrefixHFLM.

Run it for a model family the tests do not cover: the values should be equal (the scorers agree
up to float rounding, which can flip an item only on a near-tie), and the time shows the gain.

    OMP_NUM_THREADS=2 python benchmarks/scorer_agreement.py [--model M]
        [--tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande] [--limit 25]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande")
    p.add_argument("--limit", type=int, default=25, help="items per task (per subject for MMLU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from layerprune.evaluate.benchmarks import STOCK_HFLM_ENV, check_tasks
    from layerprune.evaluate.run import evaluate
    from layerprune.models.loading import load_model

    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    loaded = load_model(args.model, device=args.device)
    results, seconds = {}, {}
    for scorer, flag in (("lm-eval HFLM", "1"), ("SharedPrefixHFLM", "")):
        os.environ[STOCK_HFLM_ENV] = flag
        started = time.perf_counter()
        results[scorer] = evaluate(loaded.model, loaded.tokenizer, tasks, limit=args.limit,
                                   batch_size=args.batch_size)
        seconds[scorer] = time.perf_counter() - started
    stock, ours = results["lm-eval HFLM"], results["SharedPrefixHFLM"]
    print(f"{args.model}, {args.limit} items per task")
    print(f"{'task':14s} {'metric':9s} {'n':>5s} {'HFLM':>8s} {'ours':>8s}  same")
    for t in tasks:
        a, b = stock[t], ours[t]
        print(f"{t:14s} {a['metric']:9s} {a['n']:5d} {a['value']:8.4f} {b['value']:8.4f}  "
              f"{'yes' if a['value'] == b['value'] else 'NO'}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
