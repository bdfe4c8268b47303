"""Angular distances between layer inputs, for every start l and block size n, in one pass.

d(x^(l), x^(l+n)) = arccos(cos_sim) / pi, averaged over samples (Gromov et al. 2024, eq. 7).
All (l, n) pairs come from one Gram matrix per sample: (L+1)^2 cosines, computed in float64
because arccos is ill-conditioned near cos = 1, exactly where similar layers live.

`distance[n-1][l]` (n = 1..L, l = 0..L-n) is the layout of `distances.json`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from layerprune.io import write_json_atomic

DISTANCES_FILE = "distances.json"
HEATMAP_FILE = "heatmap.png"
SAMPLE_CHUNK = 256  # samples per Gram batch: (L+1)^2 * 256 float64 stays small even for L = 80


def pairwise_mean_distance(states: torch.Tensor) -> torch.Tensor:
    """(L+1, L+1) mean angular distance between the layer inputs, from (L+1, N, d) states."""
    n_points, n_samples, _ = states.shape
    total = torch.zeros(n_points, n_points, dtype=torch.float64)
    for start in range(0, n_samples, SAMPLE_CHUNK):
        x = states[:, start:start + SAMPLE_CHUNK].to(torch.float64).transpose(0, 1)  # (s, L+1, d)
        x = torch.nn.functional.normalize(x, dim=-1)
        cos = (x @ x.transpose(1, 2)).clamp(-1.0, 1.0)
        total += (torch.arccos(cos) / math.pi).sum(0)
    return total / n_samples


def triangle(matrix: torch.Tensor) -> list[list[float]]:
    """distance[n-1][l] = matrix[l, l+n] for n = 1..L, l = 0..L-n."""
    n_layers = matrix.shape[0] - 1
    return [[float(matrix[l, l + n]) for l in range(n_layers - n + 1)]
            for n in range(1, n_layers + 1)]


def compute(states: torch.Tensor, out_dir: str | Path, title: str = "") -> dict:
    """Write `distances.json` and the heatmap; return the JSON document."""
    out_dir = Path(out_dir)
    doc = {
        "num_layers": states.shape[0] - 1,
        "n_samples": states.shape[1],
        "distance": triangle(pairwise_mean_distance(states)),
    }
    write_json_atomic(out_dir / DISTANCES_FILE, doc)
    from layerprune.figures import distance_heatmap

    distance_heatmap(doc["distance"], out_dir / HEATMAP_FILE, title=title)
    return doc


def load(path: str | Path) -> dict:
    import json

    path = Path(path)
    if path.is_dir():
        path = path / DISTANCES_FILE
    return json.loads(path.read_text())
