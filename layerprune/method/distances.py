"""Angular distances between layer inputs, for every start l and block size n, in one pass.

d(x^(l), x^(l+n)) = arccos(cos_sim) / pi, averaged over samples (Gromov et al. 2024, eq. 7).
All (l, n) pairs come from one Gram matrix per sample: (L+1)^2 cosines, computed in float64
because arccos is ill-conditioned near cos = 1, exactly where similar layers live.

Every mean here is a weighted mean of the per-sample matrices (`weighted_mean_distance`): the
plain mean (weight 1 each), a calibration subset (0/1 weights) and a bootstrap resample
(multinomial counts) are rows of one weight matrix, so the distance has one implementation and
the stability analysis (layerprune.method.stability, which also writes the stage's documents:
`write_distances`) costs one pass over the states, not one per subset.

`distance[n-1][l]` (n = 1..L, l = 0..L-n) is the layout of `distances.json`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

DISTANCES_FILE = "distances.json"
# The float64 copy of a chunk of states, (L+1) x samples x d, is what costs memory: 256 MB holds
# 1,792 samples at L = 30, d = 576 (SmolLM2, every calibration set in one chunk) and 48 at
# L = 80, d = 8192 (a 70B model), whose Grams are then 48 x 81^2 x 8 B = 2.5 MB.
CHUNK_BYTES = 256 * 2**20


def sample_chunks(n_points: int, n_samples: int, hidden: int) -> Iterator[slice]:
    """Slices of the sample axis whose float64 states fit CHUNK_BYTES (at least one sample)."""
    size = max(1, CHUNK_BYTES // (n_points * hidden * 8))
    for start in range(0, n_samples, size):
        yield slice(start, min(start + size, n_samples))


def sample_distances(states: torch.Tensor, rows: slice) -> torch.Tensor:
    """(s, L+1, L+1) float64: each sample's angular distance between every pair of layer inputs,
    for the samples `rows` of (L+1, N, d) states."""
    x = states[:, rows].to(torch.float64).transpose(0, 1)  # (s, L+1, d)
    x = torch.nn.functional.normalize(x, dim=-1)
    cos = (x @ x.transpose(1, 2)).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def weighted_mean_distance(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(R, L+1, L+1): for each row r of the (R, N) non-negative `weights`, the mean distance
    matrix sum_i w_ri d_i / sum_i w_ri over the N samples of (L+1, N, d) states."""
    n_points, n_samples, hidden = states.shape
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.ndim != 2 or weights.shape[1] != n_samples:
        raise ValueError(f"weights must be (R, {n_samples}), got {tuple(weights.shape)}")
    total = torch.zeros(weights.shape[0], n_points * n_points, dtype=torch.float64)
    for rows in sample_chunks(n_points, n_samples, hidden):
        total += weights[:, rows] @ sample_distances(states, rows).flatten(1)
    return (total / weights.sum(1, keepdim=True)).view(-1, n_points, n_points)


def pairwise_mean_distance(states: torch.Tensor) -> torch.Tensor:
    """(L+1, L+1) mean angular distance between the layer inputs, from (L+1, N, d) states."""
    return weighted_mean_distance(states, torch.ones(1, states.shape[1]))[0]


def triangle(matrix: torch.Tensor) -> list[list[float]]:
    """distance[n-1][l] = matrix[l, l+n] for n = 1..L, l = 0..L-n."""
    n_layers = matrix.shape[0] - 1
    return [[float(matrix[l, l + n]) for l in range(n_layers - n + 1)]
            for n in range(1, n_layers + 1)]


def load(path: str | Path) -> dict:
    import json

    path = Path(path)
    if path.is_dir():
        path = path / DISTANCES_FILE
    return json.loads(path.read_text())
