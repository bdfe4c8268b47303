"""Benchmark: `layerprune.evaluate.run.evaluate` against lm-eval's HFLM and a bare forward pass.

Each variant runs in its own process so that its peak memory (max RSS on CPU, max allocated on
CUDA) is its own:
- "lm-eval HFLM" (MMLU, BoolQ): `evaluate` with env LAYERPRUNE_EVAL_STOCK_HFLM=1, i.e. scored by
  lm-eval's own HFLM, the baseline. It records the token rows HFLM feeds the model (caught at
  lm-eval's `pad_and_concat`, before padding; HFLM already feeds a shared context once).
- "evaluate": the same call scored by `SharedPrefixHFLM` (shared prefixes once, logits only at
  scored positions); for loss, `next_token_loss` over the tokenized records (its rows).
- "bare forward": `model(input_ids=row[None], use_cache=False).logits` over the baseline's rows,
  one at a time (batch 1), no scoring. Ratio = seconds / seconds of the bare forward.
Timing covers the whole call (lm-eval's task loading, prompts, tokenizing, scoring; not model
loading). Hooks time the model calls ("fwd s"), count the tokens fed to the model including
padding against the tokens in the rows ("fed/rows": > 1 is padding, < 1 is prefix sharing) and
count the positions projected onto the vocabulary ("logit rows").
Items are MMLU questions, BoolQ questions, or loss records; tok/s counts the rows' tokens.

    OMP_NUM_THREADS=2 python benchmarks/eval.py [--tasks mmlu,boolq,loss] [--limit N]
        [--loss-samples 40] [--seq-len 256] [--batch-size 8] [--threads 2] [--device cpu]
        [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

DEFAULT_LIMITS = {"mmlu": 1, "boolq": 40}  # MMLU: per subject (57 subjects -> 57 items)
STOCK, OURS, BARE = "lm-eval HFLM", "evaluate", "bare forward"


def variants(task: str) -> tuple[str, ...]:
    return (OURS, BARE) if task == "loss" else (STOCK, OURS, BARE)


def run_variant(args, task: str, variant: str) -> dict:
    import torch

    from layerprune.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.dtype, args.device)
    model, cuda = loaded.model, args.device.startswith("cuda")
    rows, stats = [], {"fwd_s": 0.0, "fed": 0, "logit_rows": 0, "items": None}
    if variant == STOCK:
        from lm_eval.models import huggingface as hf

        from layerprune.evaluate.benchmarks import STOCK_HFLM_ENV

        os.environ[STOCK_HFLM_ENV] = "1"
        real_pad = hf.pad_and_concat

        def recording_pad(max_length, tensors, padding_side="right"):
            rows.extend(t.reshape(-1).cpu().clone() for t in tensors)  # before it pads them
            return real_pad(max_length, tensors, padding_side)

        hf.pad_and_concat = recording_pad
    if variant != BARE:
        def pre(module, a, kw):
            stats["fed"] += (a[0] if a else kw["input_ids"]).numel()
            stats["t0"] = time.perf_counter()

        def post(module, a, kw, out):
            if cuda:
                torch.cuda.synchronize()
            stats["fwd_s"] += time.perf_counter() - stats["t0"]

        def head(module, a, out):
            stats["logit_rows"] += out.shape[:-1].numel()

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(head)
    else:
        rows = torch.load(args.rows)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if variant == BARE:
        with torch.inference_mode():
            for row in rows:
                model(input_ids=row[None].to(args.device), use_cache=False).logits.sum()
    else:
        from layerprune.evaluate.run import evaluate

        res = evaluate(model, loaded.tokenizer, [task], limit=args.limits.get(task),
                       batch_size=args.batch_size, loss_data=args.loss_data,
                       loss_seq_len=args.seq_len, loss_samples=args.loss_samples)[task]
        stats["items"] = res["n"]
        stats["value"] = res["value"]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if task == "loss" and variant == OURS:  # the same rows `loss_metrics` scores
        from layerprune.method.calibration import tokenize
        from layerprune.method.data import read_records

        texts = read_records(args.loss_data, limit=args.loss_samples)
        rows = [torch.tensor(r) for r in tokenize(texts, loaded.tokenizer, args.seq_len)]
    if variant == variants(task)[0]:
        torch.save(rows, args.rows)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": seconds, "peak_mb": peak, "rows": len(rows),
            "tokens": sum(len(r) for r in rows), **{k: v for k, v in stats.items() if k != "t0"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    p.add_argument("--tasks", default="mmlu,boolq,loss")
    p.add_argument("--limit", type=int, default=None,
                   help=f"items per lm-eval task (per subject for MMLU); default {DEFAULT_LIMITS}")
    p.add_argument("--loss-data", default="bundled:wiki-heldout")
    p.add_argument("--loss-samples", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest is kept")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: "task:variant"
    p.add_argument("--rows", help=argparse.SUPPRESS)     # internal: recorded rows file
    args = p.parse_args()
    args.limits = {t: args.limit or n for t, n in DEFAULT_LIMITS.items()}
    if args.variant:
        task, variant = args.variant.split(":")
        print(json.dumps(run_variant(args, task, variant)))
        return
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ("mmlu", "boolq", "loss")]
    if bad:
        p.error(f"unknown tasks {bad}; choose from mmlu, boolq, loss")
    print(f"model {args.model}, dtype {args.dtype}, device {args.device}, {args.threads} threads, "
          f"B = {args.batch_size}; MMLU 5-shot {args.limits['mmlu']}/subject, BoolQ 0-shot "
          f"{args.limits['boolq']}, loss {args.loss_samples} x <= {args.seq_len} tokens "
          f"of {args.loss_data}")
    print(f"{'task':6s} {'variant':13s} {'seconds':>8s} {'ratio':>6s} {'items':>6s} "
          f"{'items/s':>8s} {'tokens':>7s} {'tok/s':>7s} {'fwd s':>7s} {'fed/rows':>8s} "
          f"{'logit rows':>10s} {'peak MB':>8s} {'value':>7s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            rows_file = os.path.join(tmp, f"{task}.pt")
            results = {}
            for variant in variants(task):
                runs = [json.loads(subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--variant", f"{task}:{variant}",
                     "--rows", rows_file], check=True, capture_output=True, text=True
                ).stdout.strip().splitlines()[-1]) for _ in range(args.repeat)]
                results[variant] = min(runs, key=lambda r: r["seconds"])
            base, first = results[BARE], results[variants(task)[0]]
            items, tokens = first["items"], first["tokens"]
            for variant, r in results.items():
                scored = variant != BARE
                print(f"{task:6s} {variant:13s} {r['seconds']:8.2f} "
                      f"{r['seconds'] / base['seconds']:6.2f} {items:6d} "
                      f"{items / r['seconds']:8.2f} {tokens:7d} {tokens / r['seconds']:7.0f} "
                      + (f"{r['fwd_s']:7.2f} {r['fed'] / tokens:8.2f} {r['logit_rows']:10d} "
                         if scored else f"{'':7s} {'':8s} {'':10s} ")
                      + f"{r['peak_mb']:8.0f} "
                      + (f"{r['value']:7.4f}" if scored else ""), flush=True)


if __name__ == "__main__":
    main()
