"""GPU benchmark: extraction, loss, an MMLU-like pass and QLoRA steps of a 7B-class model.

    benchmarks/gpu.sh                 # a GPU machine: Llama-2-7B's shape, bf16 and nf4
    benchmarks/gpu.sh --tiny          # anywhere, CPU included: a 4-layer model, every path

Llama-2-7B's config with random weights (speed and memory do not depend on their values), saved
once and loaded as the stages load a checkpoint: `bf16`, and `nf4` (bitsandbytes NF4, double
quantization, bf16 compute, as QLoRA). Phases per mode, over the same N texts of T tokens:
forward (the baseline: bare batched forward with logits), extract (`last_token_states`, the
distance pass), loss (`next_token_loss`), mmlu (one pass of `SharedPrefixHFLM.loglikelihood`
over S x Q questions shaped like 5-shot MMLU: a shared ~450-token header per subject, a
~110-token question, four one-token answers) and heal (steps of `heal_training.load_for_training`'s
model: LoRA rank 8 on the MLPs, gradient checkpointing, AdamW, autocast in the compute dtype as
the Trainer's bf16 flag does; timed after one warm-up step). Text: random words of a word-level
tokenizer built here (no network). Figures: tokens/s and peak GPU memory per phase
(torch.cuda.max_memory_allocated, reset before each; not measured on CPU), extract and loss over
forward, nf4 over bf16. A phase that fails is recorded and the others still run; the JSON
(`--json`, default $OUT/gpu_bench.json when OUT is set) is rewritten after each mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from layerprune.store.files import write_json_atomic

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): 6.7 B parameters, 13.5 GB in bf16.
CONFIG_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)
# Every dimension a multiple of 64: bitsandbytes' CPU inference kernels repack NF4 weights in
# blocks of rows and refuse other shapes ("N must be divisible by block_n").
CONFIG_TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
                   max_position_embeddings=1024, rms_norm_eps=1e-5)
# Real 5-shot MMLU prompts: ~450 tokens of examples shared by a subject's questions, ~110 of own.
HEADER_WORDS, QUESTION_WORDS = 440, 105
PHASES = ("forward", "extract", "loss", "mmlu", "heal")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "Answer", ":", "A", "B", "C", "D", "."]


# option: (what it sets, default, default with --tiny). 256 x 512 tokens on a 7B model is a few
# seconds of bf16 work on an H100-class GPU: long enough to time, short enough for one lease.
SIZES = {"samples": ("N texts for forward/extract/loss", 256, 8),
         "seq_len": ("T tokens per text and per training row", 512, 64),
         "batch_size": ("batch of forward/extract/loss/mmlu", 16, 4),
         "subjects": ("S MMLU-like subjects", 8, 2),
         "questions": ("Q questions per subject", 25, 3),
         "heal_steps": ("timed training steps", 10, 2),
         "heal_batch": ("B training rows per step", 8, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 4-layer model and small sizes: checks "
                   "every path in seconds, on CPU too")
    p.add_argument("--modes", default="bf16,nf4", help="comma-separated: bf16, nf4")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    for name, (what, big, tiny) in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{what} (default {big}; --tiny {tiny})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="where to write every figure "
                   "(default: $OUT/gpu_bench.json when OUT is set)")
    args = p.parse_args(argv)
    for name, (_, big, tiny) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else big)
    args.modes = [m for m in args.modes.split(",") if m]
    args.phases = [m for m in args.phases.split(",") if m]
    bad = [m for m in args.modes if m not in ("bf16", "nf4")] + [
        ph for ph in args.phases if ph not in PHASES]
    if bad:
        p.error(f"unknown modes/phases {bad}; modes: bf16, nf4; phases: {', '.join(PHASES)}")
    return args


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` entries: SPECIALS, then words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "Answer:" -> "Answer", ":"
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def build_checkpoint(config: dict, device: str, out: Path) -> None:
    """Save a random Llama model with `config` to `out` (bf16 safetensors) and a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**config, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    word_tokenizer(config["vocab_size"]).save_pretrained(out)
    del model


class Phase:
    """Times a block (synchronising the GPU) and records its peak GPU memory."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def record(self, tokens: int, **extra) -> dict:
        return {"seconds": self.seconds, "tokens": tokens, "tokens_per_s": tokens / self.seconds,
                "peak_gib": self.peak_gib, **extra}


def random_ids(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(len(SPECIALS), vocab) for _ in range(length)] for _ in range(n)]


def mmlu_requests(rng: random.Random, subjects: int, questions: int, vocab: int):
    """lm-eval loglikelihood Instances shaped like 5-shot MMLU, and the prompt tokens counted
    once per question."""
    from lm_eval.api.instance import Instance

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(k))

    requests, tokens = [], 0
    for _ in range(subjects):
        header = words(HEADER_WORDS)
        for _ in range(questions):
            context = f"{header} {words(QUESTION_WORDS)} Answer:"
            tokens += HEADER_WORDS + QUESTION_WORDS + 2
            for letter in "ABCD":
                requests.append(Instance(request_type="loglikelihood", doc={},
                                         arguments=(context, f" {letter}"), idx=len(requests)))
    return requests, tokens


def heal_steps(ckpt: Path, mode: str, args, device: str, rng: random.Random) -> dict:
    from layerprune.heal.config import HealConfig
    from layerprune.heal.training import compute_dtype, load_for_training

    cfg = HealConfig(quant=mode == "nf4", batch_size=args.heal_batch, seq_len=args.seq_len)
    dtype = compute_dtype(cfg)
    model = load_for_training(str(ckpt), cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    vocab = model.config.vocab_size
    phase = Phase(device)
    for step in range(args.heal_steps + 1):
        if step == 1:  # step 0 pays one-time costs (allocation, kernel choice)
            phase.__enter__()
        ids = torch.tensor(random_ids(rng, args.heal_batch, args.seq_len, vocab), device=device)
        with torch.autocast(torch.device(device).type, dtype=dtype,
                            enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    phase.__exit__()
    del model, opt
    return phase.record(args.heal_steps * args.heal_batch * args.seq_len, loss=loss.item(),
                        compute_dtype=str(dtype).removeprefix("torch."))


def forward_phase(model, tokenizer, ids, args, device) -> dict:
    with Phase(device) as ph:
        bare_forward(model, ids, args.batch_size, tokenizer.pad_token_id)
    return ph.record(sum(map(len, ids)))


def extract_phase(model, tokenizer, ids, args, device) -> dict:
    from layerprune.method.hidden_states import last_token_states

    with Phase(device) as ph:
        states = last_token_states(model, ids, batch_size=args.batch_size,
                                   pad_id=tokenizer.pad_token_id, show_bar=False)
    return ph.record(sum(map(len, ids)), finite=bool(torch.isfinite(states).all()))


def loss_phase(model, tokenizer, ids, args, device) -> dict:
    from layerprune.method.loss import next_token_loss

    with Phase(device) as ph:
        out = next_token_loss(model, tokenizer, ids, args.batch_size, show_bar=False)
    return ph.record(sum(map(len, ids)), loss=out["loss"])


def mmlu_phase(model, tokenizer, ids, args, device) -> dict:
    from layerprune.evaluate.scoring import SharedPrefixHFLM

    requests, prompt_tokens = mmlu_requests(random.Random(1), args.subjects, args.questions,
                                            model.config.vocab_size)
    lm = SharedPrefixHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    with Phase(device) as ph:
        scores = lm.loglikelihood(requests, disable_tqdm=True)
    questions = len(requests) // 4
    return ph.record(prompt_tokens, questions=questions, scored=len(scores),
                     questions_per_s=questions / ph.seconds)


INFERENCE = {"forward": forward_phase, "extract": extract_phase, "loss": loss_phase,
             "mmlu": mmlu_phase}


def attempt(res: dict, name: str, run) -> None:
    """res[name] = run(), or the error, so that one failing phase does not lose the others."""
    try:
        res[name] = run()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}


def run_mode(ckpt: Path, mode: str, args, device: str) -> dict:
    res: dict = {}
    loaded: list = []

    def load_phase() -> dict:  # the stages' loader; its time includes the weights' sha256
        from layerprune.models.loading import load_model

        with Phase(device) as ph:
            loaded.append(load_model(str(ckpt), dtype="bfloat16", device=device,
                                     quantization="nf4" if mode == "nf4" else "none"))
        cuda = device.startswith("cuda")
        return {"seconds": ph.seconds,
                "weights_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
                "linear4bit": sum(type(m).__name__ == "Linear4bit"
                                  for m in loaded[0].model.modules())}

    attempt(res, "load", load_phase)
    if loaded:
        model, tokenizer = loaded[0].model, loaded.pop().tokenizer
        ids = random_ids(random.Random(0), args.samples, args.seq_len, model.config.vocab_size)
        bare_forward(model, ids[: args.batch_size], args.batch_size, tokenizer.pad_token_id)
        for name in [ph for ph in args.phases if ph in INFERENCE]:  # warmed up just above
            attempt(res, name, lambda: INFERENCE[name](model, tokenizer, ids, args, device))
        del model
    free(device)
    if "heal" in args.phases:
        attempt(res, "heal", lambda: heal_steps(ckpt, mode, args, device, random.Random(2)))
        free(device)
    return res


@torch.inference_mode()
def bare_forward(model, ids: list[list[int]], batch_size: int, pad_id: int) -> None:
    from layerprune.method.batching import batches

    device = next(model.parameters()).device
    for b in batches(ids, batch_size, pad_id, "right", device):
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
              use_cache=False).logits.sum().item()  # .item(): wait for the result


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _note(phase: str, r: dict, forward: dict | None) -> str:
    ratio = (f"{r['seconds'] / forward['seconds']:.2f}x forward; " if forward
             and "seconds" in forward and phase in ("extract", "loss") else "")
    return ratio + {"load": f"{r.get('linear4bit')} Linear4bit modules", "forward": "",
                    "extract": "finite" if r.get("finite") else "NOT FINITE",
                    "loss": f"loss {r.get('loss', 0):.2f}",
                    "mmlu": f"{r.get('questions')} questions, {r.get('questions_per_s', 0):.2f}/s",
                    "heal": f"compute {r.get('compute_dtype')}, loss {r.get('loss', 0):.2f}"}[phase]


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(results: dict) -> str:
    """One row per mode and phase; then nf4 over bf16 per phase when both ran."""
    rows = [f"{'mode':5} {'phase':8} {'seconds':>8} {'tokens/s':>10} {'peak GiB':>9}  notes"]
    for mode, phases in results.items():
        for phase, r in phases.items():
            if "error" in r:
                rows.append(f"{mode:5} {phase:8} FAILED: {r['error'][:100]}")
                continue
            rows.append(f"{mode:5} {phase:8} {r['seconds']:8.2f} "
                        f"{_num(r.get('tokens_per_s'), '.0f'):>10} "
                        f"{_num(r.get('peak_gib', r.get('weights_gib')), '.2f'):>9}  "
                        f"{_note(phase, r, phases.get('forward'))}")
    if {"bf16", "nf4"} <= results.keys():
        rows += ["", f"{'phase':8} {'nf4/bf16 time':>14} {'nf4/bf16 peak memory':>21}"]
        for phase in [ph for ph in results["bf16"] if ph in results["nf4"]]:
            b, n = results["bf16"][phase], results["nf4"][phase]
            if "error" in b or "error" in n:
                continue
            mem_b = b.get("peak_gib", b.get("weights_gib"))
            mem_n = n.get("peak_gib", n.get("weights_gib"))
            rows.append(f"{phase:8} {n['seconds'] / b['seconds']:14.2f} "
                        f"{_num(mem_n / mem_b if mem_b and mem_n else None, '.2f'):>21}")
    return "\n".join(rows)


def environment(device: str, args) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
           "threads": torch.get_num_threads(), "config": "tiny" if args.tiny else "llama-2-7b"}
    for name in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "lm_eval"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device, args)
    print(json.dumps(env), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    target = args.json or (str(Path(os.environ["OUT"]) / "gpu_bench.json")
                           if os.environ.get("OUT") else None)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        ckpt = Path(tmp) / "model"
        start = time.perf_counter()
        build_checkpoint(CONFIG_TINY if args.tiny else CONFIG_7B, device, ckpt)
        free(device)
        print(f"random checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)
        for mode in args.modes:
            results[mode] = run_mode(ckpt, mode, args, device)
            print(table({mode: results[mode]}), flush=True)
            if target:  # after each mode: a run cut short keeps what it measured
                write_json_atomic(target, {"environment": env, "settings": settings,
                                           "results": results})
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
