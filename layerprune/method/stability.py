"""How stable the similarity block choice l*(n) = argmin_l d(x^(l), x^(l+n)) is under the
calibration sample, from the stored last-token states (no further model passes).

Two views, both on the per-sample distance matrices that the mean already averages:

- disjoint folds: the N samples split into k folds (a seeded permutation, sizes differing by at
  most one); each fold's own l*(n), and per n the fraction of folds that agree with the full
  sample (`agreement`). Folds of N/k samples are a pessimistic check of N: if a third of the
  data already picks the same block, all of it does so with room to spare.
- bootstrap: B resamples of the N samples with replacement, as multinomial counts that weight
  the per-sample matrices; per (l, n) a 95% percentile interval of the mean distance, and per n
  how often each start wins (the chosen start's share and every start winning >= 5%).

The full sample, the folds and the resamples are rows of one weight matrix, so everything costs
one pass over the states (`distances.weighted_mean_distance`); memory is the (1 + k + B) mean
matrices, (L+1)^2 float64 each (10.7 MB at L = 80, B = 200), and the B x N counts.
Layouts follow `distances.json`: per-n lists are indexed n-1 for n = 1..L, triangles are
`[n-1][l]` for l = 0..L-n.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from layerprune.errors import LayerPruneError
from layerprune.method.distances import DISTANCES_FILE, triangle, weighted_mean_distance
from layerprune.store.files import write_json_atomic

STABILITY_FILE = "stability.json"
DEFAULT_FOLDS, DEFAULT_BOOTSTRAP = 3, 200
LEVEL = 0.95  # two-sided percentile interval
CONTENDER_SHARE = 0.05  # a start that wins at least this share of resamples is a contender


def check_options(folds: int | None, bootstrap: int, n_samples: int | None = None) -> None:
    """folds: None (skip) or an integer in 2..N; bootstrap: an integer >= 0 (0: skip)."""
    if folds is not None:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise LayerPruneError(f"folds must be an integer >= 2 (disjoint calibration "
                                  f"subsets to compare), got {folds!r}")
        if n_samples is not None and folds > n_samples:
            raise LayerPruneError(f"folds must be at most samples ({n_samples}): each fold "
                                  f"needs at least one sample, got {folds}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise LayerPruneError(f"bootstrap must be an integer >= 0 (resamples; 0 skips it), "
                              f"got {bootstrap!r}")


def default_folds(n_samples: int) -> int | None:
    """DEFAULT_FOLDS, or None (the fold check skipped, saying why) below DEFAULT_FOLDS samples."""
    return DEFAULT_FOLDS if n_samples >= DEFAULT_FOLDS else None


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Independent streams: changing the number of resamples does not move the folds.
    folds, boot = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(folds), np.random.default_rng(boot)


def fold_samples(n_samples: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """`folds` disjoint sorted index arrays covering 0..N-1, sizes differing by at most one."""
    order = _streams(seed)[0].permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, folds)]


def bootstrap_counts(n_samples: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(B, N) int: how many times each sample is drawn in each resample of N with replacement."""
    return _streams(seed)[1].multinomial(n_samples, np.full(n_samples, 1.0 / n_samples),
                                         size=resamples)


def block_starts(means: torch.Tensor) -> torch.Tensor:
    """(R, L) int: l*(n) for n = 1..L of each of R (L+1, L+1) mean matrices (the first minimum,
    as `prune.similarity_start`)."""
    n_layers = means.shape[-1] - 1
    return torch.stack([torch.diagonal(means, offset=n, dim1=-2, dim2=-1).argmin(-1)
                        for n in range(1, n_layers + 1)], dim=-1)


def stability(states: torch.Tensor, folds: int | None = DEFAULT_FOLDS,
              bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """The stability document (`stability.json`) of (L+1, N, d) last-token states."""
    return analyse(states, folds, bootstrap, seed)[1]


def analyse(states: torch.Tensor, folds: int | None = DEFAULT_FOLDS,
            bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The full sample's (L+1, L+1) mean distance matrix and the stability document, in one
    pass over the states. `folds=None` or `bootstrap=0` skips that part (saying why)."""
    if states.ndim != 3 or states.shape[0] < 2 or states.shape[1] < 1:
        raise LayerPruneError(f"states must be (L+1, N, d) with L >= 1 and N >= 1, got "
                              f"{tuple(states.shape)}")
    n_points, n_samples = states.shape[:2]
    check_options(folds, bootstrap, n_samples)
    parts = fold_samples(n_samples, folds, seed) if folds else []
    counts = bootstrap_counts(n_samples, bootstrap, seed) if bootstrap else np.zeros((0, n_samples))
    weights = np.zeros((1 + len(parts) + len(counts), n_samples))
    weights[0] = 1.0
    for row, part in enumerate(parts, start=1):
        weights[row, part] = 1.0
    weights[1 + len(parts):] = counts
    means = weighted_mean_distance(states, torch.from_numpy(weights))
    starts = block_starts(means)
    full = starts[0]
    doc = {"num_layers": n_points - 1, "n_samples": n_samples, "seed": seed,
           "start": full.tolist(),
           "folds": _folds_part(parts, starts[1:1 + len(parts)], full) if parts else
           {"skipped": f"{n_samples} sample(s) are too few for {DEFAULT_FOLDS} folds"
                       if n_samples < DEFAULT_FOLDS else "not asked (folds=None)"},
           "bootstrap": _bootstrap_part(means[1 + len(parts):], means[0], full) if bootstrap else
           {"skipped": "not asked (bootstrap=0)"}}
    return means[0], doc


def write_distances(states: torch.Tensor, out_dir: str | Path, folds: int | None = 3,
                    bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Write `distances.json` and `stability.json` (the block choice on `folds` disjoint subsets
    and `bootstrap` resamples), from one pass over `states`; return the distances document with
    the stability one under "stability". Their figures: `report.figures.draw_distances`."""
    out_dir = Path(out_dir)
    matrix, stable = analyse(states, folds, bootstrap, seed)
    doc = {"num_layers": states.shape[0] - 1, "n_samples": states.shape[1],
           "distance": triangle(matrix)}
    write_json_atomic(out_dir / DISTANCES_FILE, doc)
    write_json_atomic(out_dir / STABILITY_FILE, stable)
    return {**doc, "stability": stable}


def _folds_part(parts: list[np.ndarray], starts: torch.Tensor, full: torch.Tensor) -> dict:
    return {"k": len(parts), "sizes": [len(p) for p in parts],
            "samples": [p.tolist() for p in parts],
            "start": starts.tolist(),  # [fold][n-1]
            "agreement": (starts == full).double().mean(0).tolist()}


def runner_up(row: list[float] | torch.Tensor, best: int) -> int | None:
    """The start with the smallest distance other than `best` (None when there is no other)."""
    others = [l for l in range(len(row)) if l != best]
    return min(others, key=lambda l: float(row[l])) if others else None


def _bootstrap_part(means: torch.Tensor, full_means: torch.Tensor, full: torch.Tensor) -> dict:
    resamples, n_layers = means.shape[0], means.shape[-1] - 1
    tail = (1 - LEVEL) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high, frequency, chosen, contenders, margin = [], [], [], [], [], []
    for n in range(1, n_layers + 1):
        row = torch.diagonal(means, offset=n, dim1=-2, dim2=-1)  # (B, L+1-n)
        bounds = torch.quantile(row, q, dim=0)
        low.append(bounds[0].tolist())
        high.append(bounds[1].tolist())
        share = torch.bincount(row.argmin(-1), minlength=row.shape[1]).double() / resamples
        frequency.append(share.tolist())
        best = int(full[n - 1])
        chosen.append(float(share[best]))
        contenders.append([int(l) for l in (share >= CONTENDER_SHARE).nonzero().flatten()])
        # How far the full sample's runner-up start is behind the choice, with the interval of
        # that gap over the same resamples (paired): an interval reaching 0 is a close call.
        other = runner_up(torch.diagonal(full_means, offset=n), best)
        if other is None:
            margin.append(None)
            continue
        gap = row[:, other] - row[:, best]
        gap_bounds = torch.quantile(gap, q)
        margin.append({"runner_up": other,
                       "gap": float(full_means[other, other + n] - full_means[best, best + n]),
                       "low": float(gap_bounds[0]), "high": float(gap_bounds[1])})
    return {"resamples": resamples, "level": LEVEL, "ci_low": low, "ci_high": high,
            "frequency": frequency, "chosen_frequency": chosen, "contenders": contenders,
            "margin": margin}


def summary_line(doc: dict, block_sizes: list[int] | None = None) -> str:
    """One sentence for the report: fold agreement over n = 1..L-1 (the block sizes one can
    drop) and the chosen start's bootstrap share at `block_sizes` (default: its median and
    lowest over n)."""
    sizes = range(1, doc["num_layers"])
    parts = []
    folds = doc["folds"]
    if "skipped" in folds:
        parts.append(f"fold check skipped: {folds['skipped']}")
    else:
        lo, hi = min(folds["sizes"]), max(folds["sizes"])
        agreed = sum(folds["agreement"][n - 1] == 1.0 for n in sizes)
        parts.append(f"l*(n) agreed across {folds['k']} disjoint folds of "
                     f"{lo if lo == hi else f'{lo}-{hi}'} samples for {agreed} of {len(sizes)} "
                     "block sizes")
    boot = doc["bootstrap"]
    if "skipped" in boot:
        parts.append(f"bootstrap skipped: {boot['skipped']}")
    elif len(sizes):
        won = {n: boot["chosen_frequency"][n - 1] for n in sizes}
        head = f"bootstrap ({boot['resamples']} resamples): chosen start won "
        if block_sizes:
            parts.append(head + ", ".join(f"{won[n]:.0%} of resamples at n={n}"
                                          for n in block_sizes if n in won))
        else:
            least = min(won, key=won.get)
            parts.append(head + f"a median {np.median(list(won.values())):.0%} of resamples, "
                         f"least {won[least]:.0%} at n={least}")
    return "; ".join(parts)
