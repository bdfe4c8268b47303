"""The linear patch's fit (ReplaceMe, NeurIPS 2025): heal a cut by least squares, in memory.

For a removed run of layers a..b, the last kept layer k = a-1 computes out_k = y + m, where m is
its feed-forward (MLP) block's output and y everything else (its input plus attention). Over
every real token of calibration text, in the source (unpruned) model, fit a d x d map T with
    m @ T ≈ x^(b+1) - y        (x^(b+1): the residual stream the removed run would have handed on;
                                the last layer's output, before the final norm, when b = L-1)
and fold T into layer k's MLP output projection (down_proj, c_proj, dense_4h_to_h, ...): its
output becomes m @ T, so the pruned model's layer k outputs m @ T + y with no extra module, and
the checkpoint stays a standard one that plain transformers loads.

Several runs (drop [3, 7, 8]: runs 3 and 7..8) get one patch each, fitted in order: run j is
fitted on the source with the runs before it already removed and patched (`prune.removed_layers`
on the loaded model, the earlier maps applied by forward hooks), against targets from the
unpruned source, so each later fit sees what the pruned model really computes below it.

The fit streams X^T X and X^T Y (float64, d x d each) batch by batch, never rows x d, so a
4096-wide model on 100k tokens needs 2 x 128 MiB of accumulators.

`layerprune.heal.linear_patch` applies it to a pruned checkpoint on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from layerprune.errors import LayerPruneError
from layerprune.heal.training import MLP_KEYS
from layerprune.method.batching import batches
from layerprune.method.hidden_states import output_tensor
from layerprune.method.layer_config import kept_layers, layer_config
from layerprune.method.prune import removed_layers, runs_of
from layerprune.models.loading import base_model, decoder_layers
from layerprune.models.placement import input_device

# The probe compares a layer's output with y + m @ Q; float32 rounding leaves ~1e-6 relative,
# half precision ~1e-3; a norm after the MLP (Gemma-2/3) gave 0.33 on the tiny Gemma-3.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_PROBE_TOLERANCE = 3e-2
# Cholesky is trusted when its pivots say cond(X^T X) is below this (float64 keeps ~4 digits of
# T there); above it, or when X^T X is singular (fewer token rows than d, a dead direction), the
# SVD-based least-squares solver gives the minimum-norm solution instead.
MAX_CHOLESKY_CONDITION = 1e12


class _Enough(Exception):
    """Raised by a hook once a pass has captured what it needs: layers above it are not run."""


def check_runs(drop: list[int], num_layers: int) -> list[list[int]]:
    kept_layers(drop, num_layers)  # distinct, in range, one left
    runs = runs_of(drop)
    if runs[0][0] == 0:
        raise LayerPruneError(
            f"method linear: removed layers start at layer 0 ({runs[0]}); the patch is folded "
            "into the last kept layer before a removed run and there is none before layer 0; "
            "use method lora or distill, or remove another block")
    return runs


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2


def _out_width(module: nn.Module) -> int:
    # nn.Linear stores weight as (out, in); GPT-2's Conv1D as (in, out).
    return module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]


def output_projection(layer: nn.Module, hidden_size: int, where: str) -> nn.Module:
    """The output projection of a decoder layer's feed-forward block, or a clear refusal.

    The block is the child whose name holds one of `MLP_KEYS` (the names LoRA targets use) and
    that holds projections; its output projection the one Linear/Conv1D in it that writes
    hidden_size features (down_proj, c_proj, dense_4h_to_h). That it is also the block's last
    operation, and that the block's output enters the residual stream as it is, the probe in
    `fit_linear_patch` checks on real activations."""
    blocks = [(name, child) for name, child in layer.named_children()
              if any(key in name.lower() for key in MLP_KEYS)
              and any(_is_projection(m) for m in child.modules())]
    if len(blocks) != 1:
        raise LayerPruneError(
            f"method linear: {where} has {len(blocks)} feed-forward blocks (children named like "
            f"{', '.join(MLP_KEYS)} holding Linear layers: {[n for n, _ in blocks]}); exactly "
            "one is needed to fold the patch into")
    name, block = blocks[0]
    outs = [(n, m) for n, m in block.named_modules()
            if _is_projection(m) and _out_width(m) == hidden_size]
    if len(outs) != 1:
        raise LayerPruneError(
            f"method linear: the feed-forward block {where}.{name} has {len(outs)} projections "
            f"writing hidden_size={hidden_size} features ({[n for n, _ in outs]}); the patch "
            "needs exactly one output projection (mixture-of-experts blocks have one per "
            "expert and are not supported)")
    if not outs[0][1].weight.is_floating_point():
        raise LayerPruneError(f"method linear: {where}.{name}.{outs[0][0]} holds quantized "
                              "weights; fold the patch into a full-precision checkpoint")
    return outs[0][1]


def _hidden_size(model: nn.Module) -> int:
    return layer_config(model.config).hidden_size


def _capture(model, batch, taps: dict, stop: nn.Module, rows: torch.Tensor) -> dict:
    """Run `model` on `batch` until `stop` has run; returns {name: (real tokens, d) tensor} of
    the output of each module in `taps` {name: module}."""
    got: dict = {}
    handles = []
    for name, module in taps.items():
        def hook(mod, args, out, name=name):
            got[name] = output_tensor(out)[rows]
            if mod is stop and len(got) == len(taps):
                raise _Enough
        handles.append(module.register_forward_hook(hook))
    try:
        base_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _map_output(module: nn.Module, T: torch.Tensor):
    """A forward hook on `module` that maps its output by T: a patch applied without touching
    the weights (the source model stays as it was; the fold does the same up to rounding)."""
    def hook(mod, args, out):
        return out @ T.to(out.device, out.dtype)
    return module.register_forward_hook(hook)


def _probe(model, batch, rows, layer, proj, where: str) -> None:
    """Refuse when no map folded into `proj` can act as m @ T: map `proj`'s output by a random Q
    and check the layer then outputs y + m @ Q. A norm after the MLP (Gemma-2/3's
    post_feedforward_layernorm), an op after the projection or a gated residual fails here."""
    plain = _capture(model, batch, {"m": proj, "out": layer}, layer, rows)
    d = plain["m"].shape[-1]
    gen = torch.Generator().manual_seed(0)
    Q = torch.eye(d) + torch.randn(d, d, generator=gen) / d ** 0.5
    handle = _map_output(proj, Q)
    try:
        mapped = _capture(model, batch, {"out": layer}, layer, rows)["out"]
    finally:
        handle.remove()
    expected = plain["out"] - plain["m"] + plain["m"] @ Q.to(plain["m"].device, plain["m"].dtype)
    error = float((mapped - expected).norm() / expected.norm().clamp_min(1e-30))
    if error > PROBE_TOLERANCE.get(mapped.dtype, HALF_PROBE_TOLERANCE):
        norms = [n for n, _ in layer.named_children()  # e.g. post_feedforward_layernorm
                 if "post" in n and "norm" in n and any(f in n for f in ("ff", "feed", "mlp"))]
        family = f"{type(model).__name__} (model_type {model.config.model_type})"
        raise LayerPruneError(
            f"method linear: cannot patch {family}: the output of {where}'s feed-forward block "
            "does not enter the residual stream as it is"
            + (f" (it passes through {', '.join(norms)} first)" if norms else "")
            + f", so no map folded into its output projection reproduces the fit (probe "
            f"error {error:.2g}); use method lora or distill")


def _solve(xtx: torch.Tensor, xty: torch.Tensor) -> torch.Tensor:
    """T minimising ||X T - Y|| from the normal equations, in float64 on the CPU.

    Normal equations square X's condition number; float64 absorbs that for any activations
    seen in practice, and they are what makes streaming (d x d, not rows x d) possible. Cholesky
    is the fast exact solve for a well-conditioned X^T X; otherwise torch.linalg.lstsq with the
    SVD driver gelsd returns the minimum-norm solution (rank-deficient X^T X solved without a
    ridge, which would bias every direction)."""
    xtx, xty = xtx.double().cpu(), xty.double().cpu()
    chol, info = torch.linalg.cholesky_ex(xtx)
    pivots = chol.diagonal()
    if int(info) == 0 and float((pivots.max() / pivots.min()) ** 2) < MAX_CHOLESKY_CONDITION:
        return torch.cholesky_solve(xty, chol)
    return torch.linalg.lstsq(xtx, xty, driver="gelsd").solution


@contextlib.contextmanager
def _pruned_and_patched(model, patches: list[dict]):
    """Within the block, `model` is the source without the layers of `patches` (earlier runs),
    each patch applied by a hook on its layer's output projection; on exit, the source again."""
    layers, hidden = decoder_layers(model), _hidden_size(model)
    hooks = [_map_output(output_projection(layers[p["layer"]], hidden, f"layer {p['layer']}"),
                         p["T"]) for p in patches]
    try:
        if patches:
            with removed_layers(model, [i for p in patches for i in p["removed"]]):
                yield model
        else:
            yield model
    finally:
        for h in hooks:
            h.remove()


def _residual(rr: float, xtx: torch.Tensor, xty: torch.Tensor, T: torch.Tensor) -> float:
    """||R - X T|| / ||R|| from the accumulators alone: ||R - X T||^2 = R.R - 2 <T, X^T R> +
    <T, X^T X T>. In float64 the cancellation leaves an absolute error of ~1e-8 in the ratio."""
    sq = rr - 2 * float((T * xty).sum()) + float((T * (xtx @ T)).sum())
    return (max(sq, 0.0) / rr) ** 0.5 if rr > 0 else 0.0


@torch.inference_mode()
def fit_linear_patch(source_model, drop: list[int], ids: list[list[int]], batch_size: int = 8,
                     pad_id: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One patch per maximal run of `drop`: {"layer": k (source numbering), "removed": run,
    "T": float32 d x d (CPU), "rows": token rows fitted, "residual_before"/"residual_after":
    ||target - y - m @ T|| / ||target - y|| with T = I (no patch) and with the fitted T}.
    `source_model` is left as it was (layers removed and patches hooked only during the fit)."""
    layers = list(decoder_layers(source_model))
    runs = check_runs(drop, len(layers))
    if not ids:
        raise LayerPruneError("method linear: no calibration text to fit the patch on")
    hidden = _hidden_size(source_model)
    todo = list(batches(ids, batch_size, pad_id, "right", input_device(source_model)))
    patches: list[dict] = []
    done, total = 0, len(ids) * len(runs)
    for run in runs:
        k = run[0] - 1
        layer, last = layers[k], layers[run[-1]]  # last's output is x^(b+1) in the source
        proj = output_projection(layer, hidden, f"layer {k}")
        xtx = xty = None
        rr, rows = 0.0, 0
        for n, batch in enumerate(todo):
            real = batch.attention_mask.bool()
            if patches:  # targets from the unpruned source; m and y from the pruned-so-far model
                got = _capture(source_model, batch, {"target": last}, last, real)
                with _pruned_and_patched(source_model, patches):
                    if n == 0:
                        _probe(source_model, batch, real, layer, proj, f"layer {k}")
                    got |= _capture(source_model, batch, {"m": proj, "out": layer}, layer, real)
            else:  # one pass: layer k's block and, further up, the target
                if n == 0:
                    _probe(source_model, batch, real, layer, proj, f"layer {k}")
                got = _capture(source_model, batch, {"m": proj, "out": layer, "target": last},
                               last, real)
            # MPS has no float64; elsewhere accumulate where the activations are.
            acc = "cpu" if got["m"].device.type == "mps" else got["m"].device
            m = got["m"].to(acc, torch.float64)
            r = got["target"].to(acc, torch.float64) - got["out"].to(acc, torch.float64) + m
            if xtx is None:
                xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=acc)
                xty = torch.zeros_like(xtx)
            xtx += m.T @ m
            xty += m.T @ r
            rr += float((r * r).sum())
            rows += m.shape[0]
            done += len(batch.rows)
            if progress:
                progress(done, total)
        xtx, xty = xtx.cpu(), xty.cpu()
        T = _solve(xtx, xty)
        patches.append({"layer": k, "removed": list(run), "T": T.float(), "rows": rows,
                        "residual_before": _residual(rr, xtx, xty, torch.eye(hidden,
                                                                             dtype=torch.float64)),
                        "residual_after": _residual(rr, xtx, xty, T)})
    return patches


@torch.no_grad()
def fold_patches(pruned_model, drop: list[int], patches: list[dict]) -> None:
    """Fold each patch into its layer's output projection, in place, on a model that already
    has layers `drop` removed (source layer k is layer k - #removed below k there).

    An output projection computes h W^T + b (nn.Linear, W: d x ffn) or h W + b (GPT-2's Conv1D,
    W: ffn x d); (h W^T + b) T = h (T^T W)^T + b T, so W <- T^T W (Conv1D: W <- W T), b <- b T.
    The product is taken in float64 and rounded once to the weight's dtype."""
    layers = decoder_layers(pruned_model)
    runs = check_runs(drop, len(layers) + len(drop))
    hidden = _hidden_size(pruned_model)
    if sorted(tuple(p["removed"]) for p in patches) != [tuple(r) for r in runs]:
        raise LayerPruneError(f"method linear: the patches are for removed runs "
                              f"{[p['removed'] for p in patches]}, the model lacks {runs}")
    for p in patches:
        new = p["layer"] - sum(1 for i in drop if i < p["layer"])
        proj = output_projection(layers[new], hidden, f"layer {new}")
        T = p["T"].to(proj.weight.device, torch.float64)
        if T.shape != (hidden, hidden):
            raise LayerPruneError(f"method linear: patch for layer {p['layer']} is "
                                  f"{tuple(T.shape)}, the model's hidden size is {hidden}")
        W = proj.weight.double()
        proj.weight.copy_((T.T @ W) if isinstance(proj, nn.Linear) else (W @ T))
        if proj.bias is not None:
            proj.bias.copy_(proj.bias.double() @ T)
