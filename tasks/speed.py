"""Prefect task: the inference cost of one pruned variant against its base model, on the run's
device (`layerprune.evaluate.speed.measure`), and the columns the flow's rows and summary take from it.

The variant is the model already in memory with layers `drop` removed (as tasks/evaluate.py
does), so measuring every variant costs no load. Each measurement times the base model too,
alternately with the variant: a speedup is only meaningful between calls made under the same
conditions, so every variant's ratio comes from its own measurement.

Timings differ between two computations: the columns made here are in
`tasks.report.MEASURED_COLUMNS`, which the report key and the chaos checks leave out.
"""

from __future__ import annotations

import statistics

from layerprune.config import ModelSpec, SpeedSpec
from layerprune.evaluate import speed as speed_mod
from layerprune.method.prune import describe_layers
from layerprune.store.files import write_json_atomic
from tasks.common import model_in_memory, model_lock, numerics_key, run_stage, stage_task

STAGE, VERSION = "speed", 1
# A variant row's speed columns (the contract of issue 12); a healed row copies its unhealed
# variant's, and the base takes the per-model ones (BASE_COLUMNS) into the run's summary.
COLUMNS = ("decode_speedup", "prefill_speedup", "decode_tokens_per_s", "prefill_tokens_per_s",
           "weight_bytes", "bytes_saved_pct", "inference_peak_memory_mb")
BASE_COLUMNS = ("decode_tokens_per_s", "prefill_tokens_per_s", "weight_bytes",
                "inference_peak_memory_mb")


def hardware(model: ModelSpec) -> str:
    """Where the timing runs, for the key: unlike a loss, a speed measured on one kind of device
    says nothing about another, and a store may be shared by CPU and GPU runs. A GPU is named
    by its model and count; a CPU by the threads torch uses (its throughput scales with them)."""
    import torch

    from layerprune.models.placement import resolve_device

    device = resolve_device(model.device)
    if torch.cuda.is_available() and (device.startswith("cuda") or model.device_map is not None):
        if model.device_map is None:
            return torch.cuda.get_device_name(torch.device(device))
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return " + ".join(f"{names.count(n)}x {n}" for n in sorted(set(names)))
    return f"{device}, {torch.get_num_threads()} threads"


def key_params(model_info: dict, model: ModelSpec, drop: list[int], speed: SpeedSpec) -> dict:
    return {"model": model_info["fingerprint"], **numerics_key(model), "hardware": hardware(model),
            "removed_layers": drop, "batch": speed.batch, "prefill_tokens": speed.prefill_tokens,
            "decode_tokens": speed.decode_tokens, "repeats": speed.repeats}


def run_name() -> str:
    """e.g. speed-drop-12-17, speed-drop-3,7,9, shown in the Prefect UI."""
    from prefect.runtime import task_run

    return f"speed-drop-{describe_layers(task_run.parameters['drop'])}"


@stage_task(STAGE, VERSION, key_params, task_run_name=run_name)
def measure_speed(store_root: str, model: ModelSpec, model_info: dict, drop: list[int],
                  speed: SpeedSpec = SpeedSpec()) -> dict:
    """Write speed.json (as `layerprune speed` does) for the model without layers `drop`; the
    manifest's meta is the same document."""
    def build(out):
        with model_lock():
            loaded = model_in_memory(model)
            doc = speed_mod.measure(loaded.model, loaded.tokenizer, drop, speed.batch,
                                    speed.prefill_tokens, speed.decode_tokens, speed.repeats)
        doc["settings"]["model"] = model_info["ref"]
        write_json_atomic(out / speed_mod.SPEED_FILE, doc)
        return doc

    return run_stage(store_root, STAGE, VERSION, key_params(model_info, model, drop, speed),
                     build)


def speed_columns(manifest: dict) -> dict:
    """A variant row's speed columns from its measurement (the variant side, and its ratios to
    the base side of the same measurement)."""
    m = manifest["meta"]
    base, variant = m["base"], m["variant"]
    return {"decode_speedup": round(m["speedup"]["decode"], 3),
            "prefill_speedup": round(m["speedup"]["prefill"], 3),
            "decode_tokens_per_s": round(variant["decode_tokens_per_s"], 2),
            "prefill_tokens_per_s": round(variant["prefill_tokens_per_s"], 2),
            "weight_bytes": variant["bytes"],
            "bytes_saved_pct": round(100 * (1 - variant["bytes"] / base["bytes"]), 2),
            "inference_peak_memory_mb": round(variant["peak_memory_mb"], 1)}


def base_speed(manifests: list[dict]) -> dict:
    """The base model's figures for the summary: every measurement timed the base too, so each
    is the median over them (the least disturbed by a machine busy during one of them)."""
    sides = [m["meta"]["base"] for m in manifests]
    if not sides:
        return {}

    def median(key: str) -> float:
        return statistics.median(s[key] for s in sides)

    return {"decode_tokens_per_s": round(median("decode_tokens_per_s"), 2),
            "prefill_tokens_per_s": round(median("prefill_tokens_per_s"), 2),
            "weight_bytes": sides[0]["bytes"],  # the same in every measurement
            "inference_peak_memory_mb": round(median("peak_memory_mb"), 1)}
