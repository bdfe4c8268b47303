"""Benchmark: healing methods and block criteria side by side on the real model.

    python benchmarks/heal_methods.py [--sizes 6 8] [--steps 20] [--threads 2]

Two tables, each against its baseline:
1. criteria: for each n, the layers each strategy removes (similarity, heuristic,
   block-influence, greedy-loss, and `--random` seeded contiguous blocks as mean ± sd, the
   baseline every criterion must beat) and the held-out loss of the pruned model, unhealed;
2. healing methods: the similarity block at each n healed by lora (the paper's QLoRA), distill,
   linear (no training) and linear+distill, at the same training budget (`--steps` x
   `--batch-size` x `--seq-len` tokens of `--heal-data`): held-out loss, % of the loss gap
   closed (100 x (pruned - healed) / (pruned - base)), wall seconds and peak memory.

Each healing method runs `layerprune heal` in its own process, so its seconds include loading
and its peak memory (heal.json's `peak_memory_mb`) is its own. Held-out loss: the first
`--heldout` records of bundled:wiki-heldout cut to `--seq-len` tokens, none of which is in the
calibration or healing text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "bundled:SmolLM2-135M-Instruct"
METHODS = ("lora", "distill", "linear", "linear+distill")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--sizes", type=int, nargs="+", default=[6, 8], help="block sizes n")
    p.add_argument("--calibration", default="bundled:wiki-calibration")
    p.add_argument("--samples", type=int, default=128, help="calibration records (distances, "
                   "block influence; the linear fit uses --linear-samples)")
    p.add_argument("--greedy-samples", type=int, default=8, help="records scored by greedy-loss")
    p.add_argument("--random", type=int, default=3, help="random blocks per n")
    p.add_argument("--heal-data", default="bundled:wiki-heal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="the demo's: see layerprune/config.py")
    p.add_argument("--linear-samples", type=int, default=120)
    p.add_argument("--heldout", type=int, default=24)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-criteria", action="store_true")
    return p.parse_args(argv)


def heldout_loss(model, tokenizer, args) -> float:
    from layerprune.method.loss import loss_metrics

    return loss_metrics(model, tokenizer, "bundled:wiki-heldout", args.seq_len, args.heldout,
                        batch_size=8)["value"]


def similarity_distances(loaded, ids) -> list[list[float]]:
    from layerprune.method import distances, hidden_states
    from layerprune.method.batching import pad_token_id

    states = hidden_states.last_token_states(loaded.model, ids, 8,
                                             pad_id=pad_token_id(loaded.tokenizer),
                                             show_bar=False)
    return distances.triangle(distances.pairwise_mean_distance(states))


def choose_all(loaded, ids, distance, args) -> dict:
    """{"chosen": {n: {strategy: [drop, ...]}} (`--random` drops for random), "seconds": the
    data-driven criteria's, "greedy": greedy-loss's record}."""
    from layerprune.method import criteria, prune, surgery
    from layerprune.method.batching import pad_token_id

    pad = pad_token_id(loaded.tokenizer)
    L = loaded.model.config.num_hidden_layers
    timing = {}
    t = time.perf_counter()
    influence = criteria.block_influence(loaded.model, ids, 8, pad)
    timing["block-influence"] = time.perf_counter() - t
    t = time.perf_counter()
    greedy = criteria.greedy_loss_order(loaded.model, loaded.tokenizer, ids[:args.greedy_samples],
                                        max(args.sizes), 8)
    timing["greedy-loss"] = time.perf_counter() - t
    chosen = {}
    for n in args.sizes:
        chosen[n] = {s: [prune.choose_layers(s, n, L, distance=distance, influence=influence,
                                             greedy_order=greedy["order"])]
                     for s in ("similarity", "heuristic", "block-influence", "greedy-loss")}
        chosen[n]["random"] = [prune.choose_layers("random", n, L, seed=k)
                               for k in range(args.random)]
    return {"chosen": chosen, "seconds": timing, "greedy": greedy}


def criteria_table(loaded, ids, distance, args, base: float) -> dict:
    from layerprune.method.prune import describe_layers, removed_layers

    found = choose_all(loaded, ids, distance, args)
    rows = []
    for n, by_strategy in found["chosen"].items():
        for strategy, drops in by_strategy.items():
            losses = []
            for drop in drops:
                with removed_layers(loaded.model, drop):
                    losses.append(heldout_loss(loaded.model, loaded.tokenizer, args))
            rows.append({"n": n, "strategy": strategy,
                         "layers": "; ".join(describe_layers(d) for d in drops),
                         "loss": statistics.mean(losses),
                         "sd": statistics.stdev(losses) if len(losses) > 1 else None,
                         "gap": statistics.mean(losses) - base})
    return {"rows": rows, "seconds": found["seconds"], "chosen": found["chosen"],
            "greedy_passes": found["greedy"].get("forward_passes")}


def heal_one(pruned: str, method: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "layerprune.cli", "heal", "--model", pruned, "--data",
           args.heal_data, "--method", method, "--seq-len", str(args.seq_len),
           "--samples", str(args.linear_samples), "--out", str(out)]
    if method != "linear":
        cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
                str(args.lr), "--save-every", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        sys.exit(f"heal {method} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    record = json.loads((out / "heal.json").read_text())
    return {**record, "process_seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from layerprune.method import calibration, prune
    from layerprune.method.prune import removed_layers
    from layerprune.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "float32")
    ids = calibration.tokenize(calibration.sample_texts(args.calibration, args.samples),
                               loaded.tokenizer, args.seq_len)
    base = heldout_loss(loaded.model, loaded.tokenizer, args)
    print(f"model {args.model}: {loaded.model.config.num_hidden_layers} layers, held-out loss "
          f"{base:.3f} ({args.heldout} records x {args.seq_len} tokens); torch threads "
          f"{args.threads}")
    started = time.perf_counter()
    distance = similarity_distances(loaded, ids)
    print(f"distances: {time.perf_counter() - started:.1f} s")
    crit = None if args.skip_criteria else criteria_table(loaded, ids, distance, args, base)
    if crit:
        print(f"\n1. criteria (unhealed; calibration {args.samples} records; greedy-loss on "
              f"{args.greedy_samples}, {crit['greedy_passes']} loss passes; seconds: "
              + ", ".join(f"{k} {v:.1f}" for k, v in crit["seconds"].items()) + ")")
        print(f"{'n':>3} {'strategy':16} {'loss':>7} {'± sd':>6} {'+gap':>6}  layers removed")
        for r in crit["rows"]:
            sd = f"{r['sd']:.3f}" if r["sd"] is not None else ""
            print(f"{r['n']:>3} {r['strategy']:16} {r['loss']:>7.3f} {sd:>6} {r['gap']:>6.3f}  "
                  f"{r['layers']}")

    healing = []
    with tempfile.TemporaryDirectory(prefix="heal-methods-") as tmp:
        for n in args.sizes:
            drop = prune.choose_layers("similarity", n, loaded.model.config.num_hidden_layers,
                                       distance=distance)
            with removed_layers(loaded.model, drop):
                pruned_loss = heldout_loss(loaded.model, loaded.tokenizer, args)
            pruned = Path(tmp) / f"pruned-{n}"
            surgery.write_pruned(args.model, drop, pruned, {"strategy": "similarity"},
                               dtype="float32", load=lambda: loaded)
            for method in args.methods:
                record = heal_one(str(pruned), method, Path(tmp) / f"{method}-{n}", args)
                healed = load_model(str(Path(tmp) / f"{method}-{n}" / "merged"), "float32")
                loss = heldout_loss(healed.model, healed.tokenizer, args)
                del healed
                healing.append({"n": n, "layers": prune.describe_layers(drop), "method": method,
                                "pruned": pruned_loss, "loss": loss,
                                "gap_closed": 100 * (pruned_loss - loss) / (pruned_loss - base),
                                "tokens": record["tokens_seen"],
                                "fit_tokens": record.get("fit_tokens") or 0,
                                "seconds": record["wall_seconds"],
                                "process_seconds": record["process_seconds"],
                                "peak_mb": record["peak_memory_mb"]})
    print(f"\n2. healing methods (similarity block; training: {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens of {args.heal_data}, lr {args.lr}; "
          f"linear fit: {args.linear_samples} records)")
    print(f"{'n':>3} {'layers':7} {'method':15} {'pruned':>7} {'healed':>7} {'gap %':>6} "
          f"{'train tok':>9} {'fit tok':>7} {'heal s':>7} {'proc s':>7} {'peak MB':>8}")
    for r in healing:
        print(f"{r['n']:>3} {r['layers']:7} {r['method']:15} {r['pruned']:>7.3f} "
              f"{r['loss']:>7.3f} {r['gap_closed']:>6.1f} {r['tokens']:>9} {r['fit_tokens']:>7} "
              f"{r['seconds']:>7.1f} {r['process_seconds']:>7.1f} {r['peak_mb']:>8.0f}")
    print(json.dumps({"base": base, "criteria": crit and crit["rows"], "healing": healing},
                     indent=1))


if __name__ == "__main__":
    main()
