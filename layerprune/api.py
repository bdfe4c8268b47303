"""One typed function per CLI subcommand: refs and numbers in, files in an output directory out.

Each validates every argument first (cheap checks, no model loaded), then does the work in a
temporary directory that becomes `out` only when everything is written.
"""

from __future__ import annotations

from pathlib import Path

from layerprune.errors import LayerPruneError
from layerprune.method import (
    calibration,
    criteria,
    hidden_states,
    layer_config,
    streaming,
    surgery,
)
from layerprune.method import distances as dist
from layerprune.method import loss as loss_mod
from layerprune.method import prune as prune_mod
from layerprune.method import stability as stab
from layerprune.method.batching import PADDING_SIDES, pad_token_id, resolve_batch_size
from layerprune.method.criteria import DATA_STRATEGIES
from layerprune.method.data import check_source
from layerprune.models.loading import (
    LoadedModel,
    check_architecture,
    check_context,
    check_model_ref,
    check_tokenizer,
    check_weights,
    load_model,
    load_tokenizer,
    pinned_revision,
)
from layerprune.store.files import atomic_output_dir, check_output_dir, write_json_atomic


def model_spec(model: str, placement: dict):
    """The model and how to hold it (dtype, device, quantization, device_map, max_memory,
    offload_folder, revision, trust_remote_code: `layerprune.config.ModelSpec`), validated."""
    from pydantic import ValidationError

    from layerprune.config import ModelSpec

    check_model_ref(model)
    try:
        spec = ModelSpec(ref=model, **placement)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "model"
        raise LayerPruneError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    return spec


def _pinned(spec):
    """`spec` with a hub id pinned to the commit its revision resolves to now, so that every
    later read (config, tokenizer, weights) is of that one commit; after the cheap checks, since
    resolving may ask the hub."""
    commit = pinned_revision(spec.ref, spec.revision)
    return spec.model_copy(update={"revision": commit}) if commit else spec


def _load(spec) -> LoadedModel:
    check_architecture(spec.ref, spec.trust_remote_code, spec.revision)
    return load_model(spec.ref, **spec.load_options())


def _check_common(model: str, placement: dict, batch_size: int, out: str):
    check_output_dir(out)  # first: the cheapest check, and a file there is never right
    spec = model_spec(model, placement)
    if batch_size <= 0:
        raise LayerPruneError(f"batch_size must be a positive integer, got {batch_size}")
    return spec


def _check_model(spec, seq_len: int | None = None):
    """What the model's config and files can tell before its weights load: a known
    architecture, weight files that are whole, a tokenizer, and a context that holds `seq_len`
    tokens (records longer than `seq_len` are cut to their first `seq_len` tokens; a `seq_len`
    past the context is refused). Returns `spec` pinned (`_pinned`)."""
    spec = _pinned(spec)
    check_architecture(spec.ref, spec.trust_remote_code, spec.revision)
    check_weights(spec.ref)
    check_tokenizer(spec.ref, spec.trust_remote_code, spec.revision)
    if seq_len is not None:
        check_context(spec.ref, seq_len, "seq_len", spec.trust_remote_code, spec.revision)
    return spec


def distances(model: str, data: str, samples: int, seq_len: int, out: str,
              batch_size: int | str | None = "auto", seed: int | None = None,
              padding_side: str = "right", text_field: str = "text", extraction: str = "auto",
              memory_budget: int | str | None = None, folds: int | None = None,
              bootstrap: int = stab.DEFAULT_BOOTSTRAP, **placement) -> dict:
    """Write `out/distances.json`, `out/heatmap.png`, `out/stability.json`,
    `out/stability.png` (and the calibration tokens); return the distances document plus
    "stability" and "extraction", the way the hidden states were computed.

    `folds`: disjoint calibration subsets whose block choices are compared, 2..samples (default
    3, skipped with the reason recorded when samples < 3); `bootstrap`: resamples for the
    intervals and choice shares, 0 skips them (`layerprune.method.stability`).

    `batch_size`: "auto" is the fastest for the device (`batching.resolve_batch_size`).
    `extraction`: "in-memory", "streamed" (one layer at a time, `layerprune.method.streaming`) or "auto":
    streamed when the model does not fit `memory_budget` ("700MB", "40GB"; default: the memory
    available), the most weights + activations held at once, and for a GGUF file whenever
    streaming fits (it reads the file once; loading it whole parses it twice). `placement`: how
    the model is held (`model_spec`)."""
    check_output_dir(out)
    spec = model_spec(model, placement)
    batch_size = resolve_batch_size(batch_size, spec.device)
    calibration.check_sizes(samples, seq_len)
    if folds is None:
        folds = stab.default_folds(samples)
    stab.check_options(folds, bootstrap, samples)
    if seed is not None and not 0 <= seed < 2**63:
        raise LayerPruneError(f"seed must be an integer in 0..2^63-1 (or none: the first "
                              f"`samples` records), got {seed}")
    check_source(data)
    if padding_side not in PADDING_SIDES:
        raise LayerPruneError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    texts = calibration.sample_texts(data, samples, seed, text_field)
    check_weights(spec.ref, require=False)  # planning reads the headers of those there are
    spec = _pinned(spec)
    mode = streaming.extraction_for(spec, len(texts), seq_len, batch_size, extraction,
                                    memory_budget)
    spec = _check_model(spec, seq_len)
    loaded = _load(spec) if mode == "in-memory" else None
    tokenizer = loaded.tokenizer if loaded else load_tokenizer(spec.ref, spec.trust_remote_code,
                                                               spec.revision)
    with atomic_output_dir(out) as tmp:
        ids = calibration.tokenize(texts, tokenizer, seq_len)
        calibration.save_tokens(ids, tmp)
        pad = pad_token_id(tokenizer)
        if loaded:
            states = hidden_states.last_token_states(loaded.model, ids, batch_size,
                                                     padding_side, pad)
        else:
            states = streaming.last_token_states_streamed(
                spec.ref, ids, batch_size, padding_side, pad, max_memory=memory_budget,
                **streaming.streamed_options(spec))
        doc = stab.write_distances(states, tmp, folds=folds, bootstrap=bootstrap)
        from layerprune.report.figures import draw_distances  # matplotlib: only when drawing

        draw_distances(doc, tmp, title=f"{Path(model).name}: {samples} samples")
    return {**doc, "extraction": mode}


def prune(model: str, n: int | None, out: str, start: int | None = None,
          strategy: str | None = None, distances_dir: str | None = None, dtype: str = "auto", *,
          layers: list[int] | None = None, data: str | None = None, samples: int | None = None,
          seq_len: int | None = None, batch_size: int | str = "auto", seed: int | None = None,
          text_field: str = "text") -> dict:
    """Remove n layers and save a checkpoint in `out`; returns `prune.json`.

    The layers: exactly one of `start` (the block start..start+n-1), `strategy`
    (`prune.choose_layers`) or `layers` (an explicit list, contiguous or not; n is its length).
    block-influence and greedy-loss score the first `samples` records of `data` cut to
    `seq_len` tokens with the model loaded (`layerprune.method.criteria`); random takes `seed`
    (default 0); similarity reads `distances_dir`. `prune.json` records the strategy and what
    it read (scores, seed, distance).

    A local safetensors checkpoint is pruned by surgery on disk, in the dtype it has (`dtype`
    auto, or that dtype); another dtype, a GGUF file or a hub id loads and saves
    (`prune.write_pruned`)."""
    check_output_dir(out)
    model_spec(model, {"dtype": dtype})
    if sum(x is not None for x in (start, strategy, layers)) != 1:
        raise LayerPruneError("give exactly one of start (--start), strategy (--strategy) or "
                              "layers (--layers)")
    if layers is not None:
        if n is not None and n != len(layers):
            raise LayerPruneError(f"n={n} but layers lists {len(layers)} layers; give one")
        n = len(layers)
    elif n is None:
        raise LayerPruneError("n (--n) is required with start or strategy")
    if strategy is not None and strategy not in prune_mod.STRATEGIES:
        raise LayerPruneError(f"strategy must be one of {', '.join(prune_mod.STRATEGIES)}, "
                              f"got {strategy!r}")
    criteria.check_strategy_inputs(strategy, distances_dir, data, samples, seq_len, seed)
    if strategy == "random":
        seed = 0 if seed is None else seed
        prune_mod.check_seed(seed)
    if strategy in DATA_STRATEGIES:
        batch_size = resolve_batch_size(batch_size, "auto")
        calibration.check_sizes(samples, seq_len)
        check_source(data)
    num_layers = check_architecture(model)
    check_weights(model)
    check_tokenizer(model)  # the checkpoint written must load with its tokenizer
    if layers is not None:  # distinct, in range, not every layer
        layer_config.kept_layers(list(layers), num_layers)
    prune_mod.check_block_size(n, num_layers)
    info: dict = {"strategy": strategy or "manual", "block_size": n}
    loaded = None
    if layers is not None:
        drop = sorted(layers)
    elif start is not None:
        drop = prune_mod.block_from_start(start, n, num_layers)
    elif strategy in DATA_STRATEGIES:
        check_context(model, seq_len)
        texts = calibration.sample_texts(data, samples, None, text_field)
        loaded = load_model(model, dtype)
        ids = calibration.tokenize(texts, loaded.tokenizer, seq_len)
        scores = criteria.scores(strategy, loaded.model, loaded.tokenizer, ids, n, batch_size)
        info.update(scores, calibration={"data": data, "samples": samples, "seq_len": seq_len})
        drop = prune_mod.choose_layers(strategy, n, num_layers,
                                       influence=scores.get("block_influence"),
                                       greedy_order=scores.get("greedy_order"))
    else:
        doc = dist.load(distances_dir) if strategy == "similarity" else None
        drop = prune_mod.choose_layers(strategy, n, num_layers,
                                       distance=doc["distance"] if doc else None, seed=seed or 0)
        if doc is not None:
            info["block_distance"] = doc["distance"][n - 1][drop[0]]
            info["calibration_samples"] = doc["n_samples"]
        if strategy == "random":
            info["seed"] = seed
    return surgery.write_pruned(model, drop, out, info, dtype=dtype,
                                  load=(lambda: loaded) if loaded else None)


def loss(model: str, data: str, seq_len: int, out: str, samples: int | None = None,
         batch_size: int = 8, text_field: str = "text", **placement) -> dict:
    """Write `out/loss.json` = {"loss": mean next-token cross-entropy, "tokens": k}."""
    spec = _check_common(model, placement, batch_size, out)
    calibration.check_sizes(samples if samples is not None else 1, seq_len)
    check_source(data)
    from layerprune.method.data import read_records

    texts = read_records(data, limit=samples, text_field=text_field)
    spec = _check_model(spec, seq_len)
    loaded = _load(spec)
    ids = calibration.tokenize(texts, loaded.tokenizer, seq_len)
    result = loss_mod.next_token_loss(loaded.model, loaded.tokenizer, ids, batch_size)
    # Said in the result, not only in the docs: how many records were cut to seq_len tokens.
    result = {**result, "records": len(ids), "seq_len": seq_len,
              "truncated": loss_mod.truncated_records(texts, ids, loaded.tokenizer, seq_len)}
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / "loss.json", result)
    return result


def evaluate(model: str, tasks: list[str], out: str, data: str | None = None,
             seq_len: int = 256, limit: int | None = None, shots: int | None = None,
             samples: int | None = None, batch_size: int = 8,
             target_stderr: float | None = None, **placement) -> dict:
    """Write `out/metrics.json` = {task: {"value", "stderr", "n", "metric", "baseline", ...}}.

    target_stderr: instead of `limit`, each benchmark task scores
    `benchmarks.items_for_stderr(task, target_stderr)` items; loss reads `samples` records
    (all when None).
    """
    from layerprune.evaluate import benchmarks, run

    spec = _check_common(model, placement, batch_size, out)
    if target_stderr is not None:
        if limit is not None:
            raise LayerPruneError(f"limit (--limit {limit}) and target_stderr (--target-stderr "
                                  f"{target_stderr}) both set the items per task: give one")
        benchmarks.check_target_stderr(target_stderr)
        tasks = benchmarks.check_tasks(tasks)
        limit = {t: benchmarks.items_for_stderr(t, target_stderr) for t in tasks if t != "loss"}
    tasks = benchmarks.check_args(tasks, limit, shots, batch_size, data, seq_len, samples)
    if "loss" in tasks:  # read the loss text now: a bad record fails before the model loads
        from layerprune.method.data import read_records

        loss_limit = limit.get("loss") if isinstance(limit, dict) else limit
        read_records(data or benchmarks.DEFAULT_LOSS_DATA, limit=samples or loss_limit)
    spec = _check_model(spec, seq_len if "loss" in tasks else None)
    loaded = _load(spec)
    metrics = run.evaluate(loaded.model, loaded.tokenizer, tasks, limit=limit, shots=shots,
                                  batch_size=batch_size, loss_data=data, loss_seq_len=seq_len,
                                  loss_samples=samples)
    with atomic_output_dir(out) as tmp:
        benchmarks.write_metrics(metrics, tmp)
    return metrics


def heal(model: str, data: str, out: str, steps: int | None = None, method: str = "lora",
         teacher: str | None = None, **config) -> dict:
    """Heal a pruned checkpoint with `method` (lora, distill, linear, linear+distill):
    `out/merged/`, `out/heal.json`, a loss curve, and `out/adapter/` for the training methods.

    `steps` is required except for `linear` (no training). `teacher`: the unpruned model
    (default: the source in the checkpoint's prune.json). `config` holds any other
    `layerprune.heal.config.HealConfig` field (rank, lr, seq_len, temperature, kl_weight,
    teacher_logits, top_k, linear_samples, ...); an interrupted run into the same `out` resumes.
    """
    from layerprune.heal import run as heal_mod
    from layerprune.heal.config import check_config, check_method
    from layerprune.heal.validation import check_pruned_checkpoint
    from layerprune.report.figures import heal_curve

    check_method(method)
    if steps is None and method != "linear":
        raise LayerPruneError(f"steps (--steps) is required for method {method!r}; only "
                              "'linear' trains nothing")
    cfg = check_config({**({"steps": steps} if steps is not None else {}), **config})
    check_output_dir(out)
    check_pruned_checkpoint(model)
    check_source(data)
    check_context(model, cfg.seq_len)
    record = heal_mod.heal(model, data, out, cfg, method=method, teacher=teacher)
    heal_curve(out)
    return record


def speed(model: str, drop: list[int], out: str, batch: int = 4, prefill_tokens: int = 128,
          decode_tokens: int = 64, repeats: int = 5, **placement) -> dict:
    """Write `out/speed.json`: the inference cost of the model without layers `drop` against
    the model itself, one load, timed alternately (`layerprune.evaluate.speed.measure`), with "model"
    added to its settings. `placement`: how the model is held (`model_spec`)."""
    from layerprune.evaluate import speed as speed_mod
    from layerprune.models.loading import context_length, read_config

    check_output_dir(out)
    spec = model_spec(model, placement)
    speed_mod.check_settings(batch, prefill_tokens, decode_tokens, repeats)
    layers = check_architecture(spec.ref, spec.trust_remote_code, spec.revision)
    drop = speed_mod.check_drop(drop, layers)
    speed_mod.check_lengths(prefill_tokens, decode_tokens, context_length(
        read_config(spec.ref, spec.trust_remote_code, spec.revision)))
    spec = _check_model(spec)
    loaded = _load(spec)
    doc = speed_mod.measure(loaded.model, loaded.tokenizer, drop, batch, prefill_tokens,
                            decode_tokens, repeats)
    doc["settings"]["model"] = model
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / speed_mod.SPEED_FILE, doc)
    return doc
