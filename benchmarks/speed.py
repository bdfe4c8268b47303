"""Benchmark: what dropping n layers buys at inference, on the real model.

    python benchmarks/speed.py [--sizes 4 6 8 10] [--threads 2] [--batch 4]
                               [--prefill-tokens 128] [--decode-tokens 64] [--repeats 3]
                               [--start S]

For each n, the model without n layers against the model itself (`layerprune.evaluate.speed.measure`:
one load, the variant as an in-memory view, base and variant timed alternately after a warm-up,
medians of `--repeats`): prefill tokens/s (`--batch` rows of `--prefill-tokens`), decode
tokens/s with the KV cache (`--decode-tokens` greedy tokens after a 16-token prompt, batch 1
and batch `--batch`), parameters and peak memory, each with its ratio to the base of the same
pair. The n = 0 row is the base: the median of the base figures over all pairs.

Which layers: the heuristic block (the n deepest but the last, L-1-n..L-2; no calibration data
needed), or `--start S`: the block S..S+n-1 (S=12 gives 12..17 at n=6, SmolLM2's similarity
block). Every decoder layer of a model costs the same, so the block changes the figures little.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

MODEL = "bundled:SmolLM2-135M-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8, 10], help="layers dropped")
    p.add_argument("--start", type=int, default=None,
                   help="first layer of every block (default: the heuristic block)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from layerprune.evaluate.speed import measure
    from layerprune.method.prune import block_from_start, choose_layers, describe_layers
    from layerprune.models.loading import load_model, num_layers

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    total = num_layers(loaded.model)
    rows, start = [], time.perf_counter()
    for n in args.sizes:
        drop = (block_from_start(args.start, n, total) if args.start is not None
                else choose_layers("heuristic", n, total))
        doc = measure(loaded.model, loaded.tokenizer, drop, args.batch, args.prefill_tokens,
                      args.decode_tokens, args.repeats)
        rows.append((n, drop, doc))
        # Each pair as soon as it is measured (a long run still shows what it has).
        print(f"n={n} ({describe_layers(drop)}) after {time.perf_counter() - start:.0f} s: "
              + "; ".join(f"{side} prefill {doc[side]['prefill_tokens_per_s']:.0f}, decode "
                          f"{doc[side]['decode_tokens_per_s']:.1f} / "
                          f"{doc[side]['decode_tokens_per_s_batch']:.1f} tok/s, peak "
                          f"{doc[side]['peak_memory_mb']:.0f} MB" for side in ("base", "variant"))
              + f"; decode speedup {doc['speedup']['decode']:.2f}x", file=sys.stderr, flush=True)
    settings = rows[0][2]["settings"]
    print(f"{args.model}, {total} layers, {settings['device']} {settings['dtype']}, "
          f"{torch.get_num_threads()} threads; prefill {args.batch} x {args.prefill_tokens} "
          f"tokens; decode {args.decode_tokens} greedy tokens after a "
          f"{settings['decode_prompt_tokens']}-token prompt, batch 1 and {args.batch}; medians "
          f"of {args.repeats}, base and variant alternating")
    print(f"peak memory: {settings['peak_memory_kind']}")
    keys = ("params", "prefill_tokens_per_s", "decode_tokens_per_s",
            "decode_tokens_per_s_batch", "peak_memory_mb")
    base = {k: statistics.median(doc["base"][k] for _, _, doc in rows) for k in keys}
    base_decode_s = statistics.median(statistics.median(doc["base"]["seconds"]["decode"])
                                      for _, _, doc in rows)
    print(f"{'n':>3} {'layers':>8} {'params M':>14} {'prefill tok/s':>17} "
          f"{'decode tok/s b1':>17} {'s/' + str(args.decode_tokens) + ' tok':>8} "
          f"{'decode tok/s b' + str(args.batch):>17} {'peak MB':>15}")

    def line(n, drop, side, ratios, decode_s):
        params, prefill, decode, decode_batch, peak = (
            f"{value:.{digits}f} ({ratio:.2f}x)" for value, digits, ratio in zip(
                (side["params"] / 1e6, *(side[k] for k in keys[1:])), (1, 0, 1, 1, 0), ratios))
        print(f"{n:>3} {drop:>8} {params:>14} {prefill:>17} {decode:>17} {decode_s:8.2f} "
              f"{decode_batch:>17} {peak:>15}")

    line(0, "-", base, [1.0] * 5, base_decode_s)
    for n, drop, doc in rows:
        ratios = [doc["variant"][k] / doc["base"][k] if doc["base"][k] else float("nan")
                  for k in keys]
        line(n, describe_layers(drop), doc["variant"], ratios,
             statistics.median(doc["variant"]["seconds"]["decode"]))


if __name__ == "__main__":
    main()
