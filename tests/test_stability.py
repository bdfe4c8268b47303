"""The stability of the block choice (layerprune.method.stability): fold choices and bootstrap intervals
checked against plain numpy loops over the samples, on synthetic states whose answer is known,
and the files and errors of `stability.write_distances` and `layerprune distances`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layerprune.cli import main
from layerprune.errors import LayerPruneError
from layerprune.method import distances, stability
from layerprune.report.figures import STABILITY_FIGURE, draw_distances


def direct_mean(states: torch.Tensor, samples) -> np.ndarray:
    """(L+1, L+1) mean of arccos(cos)/pi over `samples` (repeats count), one sample at a time."""
    x = states.double().numpy()
    total = np.zeros((x.shape[0], x.shape[0]))
    for i in samples:
        v = x[:, i] / np.linalg.norm(x[:, i], axis=1, keepdims=True)
        total += np.arccos(np.clip(v @ v.T, -1.0, 1.0)) / math.pi
    return total / len(samples)


def starts(matrix: np.ndarray) -> list[int]:
    n_layers = matrix.shape[0] - 1
    return [int(np.argmin([matrix[l, l + n] for l in range(n_layers - n + 1)]))
            for n in range(1, n_layers + 1)]


def noise_states(layers=6, samples=20, hidden=8, seed=0) -> torch.Tensor:
    """Independent Gaussian vectors: every distance about 0.5, so the choice is a coin toss."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layers + 1, samples, hidden, generator=gen)


def clear_states(samples=24, hidden=64, noise=0.01, seed=0) -> torch.Tensor:
    """A residual stream x^(l+1) = x^(l) + step_l u_l (orthogonal u_l, one per sample) whose step
    sizes make every window of n layers differ clearly in total change, so l*(n) is unique with
    a wide margin for each n; `noise` is a small per-sample perturbation of each x^(l)."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.tensor([5.0, 4.0, 0.1, 0.2, 0.4, 3.0, 6.0, 7.0])
    out = []
    for _ in range(samples):
        basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0]
        x = [10.0 * basis[0]]
        for step, u in zip(steps, basis[1:]):
            x.append(x[-1] + step * u)
        x = torch.stack(x)
        out.append(x + noise * x.norm(dim=1, keepdim=True) * torch.randn(x.shape, generator=gen)
                   / math.sqrt(hidden))
    return torch.stack(out, dim=1)  # (L+1, N, d)


def test_fold_choices_equal_a_direct_computation():
    states = noise_states(samples=20)
    doc = stability.stability(states, folds=3, bootstrap=0, seed=5)
    folds = doc["folds"]
    members = [i for part in folds["samples"] for i in part]
    assert sorted(members) == list(range(20))  # disjoint and covering
    assert sorted(folds["sizes"]) == [6, 7, 7] and folds["sizes"] == [len(p) for p in
                                                                        folds["samples"]]
    full = starts(direct_mean(states, range(20)))
    assert doc["start"] == full
    for part, fold_start in zip(folds["samples"], folds["start"]):
        assert fold_start == starts(direct_mean(states, part))
    expected = [np.mean([f[n] == full[n] for f in folds["start"]]) for n in range(6)]
    assert folds["agreement"] == pytest.approx(expected)
    assert min(expected[:-1]) < 1  # noise: the folds disagree somewhere, so membership matters
    assert doc["bootstrap"] == {"skipped": "not asked (bootstrap=0)"}
    # Another seed draws other folds; the same seed the same ones.
    assert stability.stability(states, 3, 0, seed=6)["folds"]["samples"] != folds["samples"]
    assert stability.stability(states, 3, 0, seed=5)["folds"] == folds


def test_bootstrap_equals_a_loop_over_resamples():
    states = noise_states(layers=5, samples=12, seed=1)
    doc = stability.stability(states, folds=2, bootstrap=20, seed=3)
    counts = stability.bootstrap_counts(12, 20, seed=3)
    assert counts.shape == (20, 12) and (counts.sum(1) == 12).all()
    means = np.stack([direct_mean(states, np.repeat(np.arange(12), c)) for c in counts])
    boot = doc["bootstrap"]
    for n in range(1, 6):
        row = np.stack([means[:, l, l + n] for l in range(6 - n)], axis=1)  # (B, L+1-n)
        low, high = np.quantile(row, [0.025, 0.975], axis=0)
        assert boot["ci_low"][n - 1] == pytest.approx(low, abs=1e-12)
        assert boot["ci_high"][n - 1] == pytest.approx(high, abs=1e-12)
        share = np.bincount(row.argmin(1), minlength=6 - n) / 20
        assert boot["frequency"][n - 1] == pytest.approx(share)
        assert boot["chosen_frequency"][n - 1] == pytest.approx(share[doc["start"][n - 1]])
        assert boot["contenders"][n - 1] == [l for l in range(6 - n) if share[l] >= 0.05]
        # The runner-up's gap behind the choice, paired over the same resamples.
        full = [direct_mean(states, range(12))[l, l + n] for l in range(6 - n)]
        best = doc["start"][n - 1]
        if n == 5:
            assert boot["margin"][n - 1] is None  # one start: no runner-up
            continue
        other = min((l for l in range(6 - n) if l != best), key=full.__getitem__)
        margin = boot["margin"][n - 1]
        assert margin["runner_up"] == other
        assert margin["gap"] == pytest.approx(full[other] - full[best], abs=1e-12)
        gap_low, gap_high = np.quantile(row[:, other] - row[:, best], [0.025, 0.975])
        assert (margin["low"], margin["high"]) == pytest.approx((gap_low, gap_high), abs=1e-12)


def test_identical_samples_give_zero_width_and_certain_choice():
    one = noise_states(layers=6, samples=1, hidden=16, seed=2)
    doc = stability.stability(one.expand(-1, 30, -1).contiguous(), bootstrap=50)
    boot = doc["bootstrap"]
    for low, high in zip(boot["ci_low"], boot["ci_high"]):
        assert np.allclose(low, high, rtol=0, atol=1e-12)
    assert boot["chosen_frequency"] == [1.0] * 6
    assert doc["folds"]["agreement"] == [1.0] * 6
    for margin in boot["margin"][:-1]:
        assert margin["low"] == pytest.approx(margin["high"], abs=1e-12) and margin["gap"] > 0


def test_a_clear_block_is_stable_and_noise_is_not():
    clear = stability.stability(clear_states(), folds=3, bootstrap=100)
    assert clear["folds"]["agreement"] == [1.0] * 8
    assert clear["bootstrap"]["chosen_frequency"] == [1.0] * 8
    assert clear["start"][:3] == [2, 2, 2]  # the small steps 0.1, 0.2, 0.4 at layers 2..4
    assert stability.summary_line(clear, [2, 3]) == (
        "l*(n) agreed across 3 disjoint folds of 8 samples for 7 of 7 block sizes; bootstrap "
        "(100 resamples): chosen start won 100% of resamples at n=2, 100% of resamples at n=3")
    noise = stability.stability(noise_states(layers=8, samples=24, hidden=8), bootstrap=100)
    agreement = noise["folds"]["agreement"][:-1]  # n = L has a single start: always agrees
    won = noise["bootstrap"]["chosen_frequency"][:-1]
    # Seeded, so fixed: here 0.52 and 0.65 (the clear case: 1.0 and 1.0).
    assert np.mean(agreement) < 0.75 and np.median(won) < 0.8, (agreement, won)
    assert min(agreement) < 0.5 and min(won) < 0.5, (agreement, won)
    assert "for 7 of 7" not in stability.summary_line(noise)
    for doc, states in ((clear, clear_states()), (noise, noise_states(8, 24, 8))):
        mean = distances.pairwise_mean_distance(states).numpy()
        boot = doc["bootstrap"]
        for n in range(1, 9):  # the percentile interval of a mean holds the sample mean
            for l in range(9 - n):
                assert boot["ci_low"][n - 1][l] <= mean[l, l + n] <= boot["ci_high"][n - 1][l]
            assert 0 < max(np.subtract(boot["ci_high"][n - 1], boot["ci_low"][n - 1]))


def test_weighted_means_in_chunks_equal_direct_means(monkeypatch):
    """The plain mean (distances.json), a subset's and a resample's, computed a few samples per
    chunk (as for L = 80, d = 8192), against one-sample-at-a-time loops."""
    states = noise_states(layers=4, samples=11, hidden=8, seed=4)
    monkeypatch.setattr(distances, "CHUNK_BYTES", 5 * 8 * 8 * 3)  # 3 samples per chunk
    assert [s.stop - s.start for s in distances.sample_chunks(5, 11, 8)] == [3, 3, 3, 2]
    subset = [1, 4, 5, 9]
    counts = stability.bootstrap_counts(11, 1, seed=7)[0]
    weights = np.stack([np.ones(11), np.isin(np.arange(11), subset), counts])
    got = distances.weighted_mean_distance(states, torch.from_numpy(weights)).numpy()
    upper = np.triu_indices(5, k=1)  # the (l, l+n) pairs; the diagonal is arccos(1 - eps)
    for row, samples in zip(got, [range(11), subset, np.repeat(np.arange(11), counts)]):
        assert np.allclose(row[upper], direct_mean(states, samples)[upper], rtol=0, atol=1e-12)
    assert np.array_equal(distances.pairwise_mean_distance(states).numpy()[upper], got[0][upper])


@pytest.mark.parametrize("folds, bootstrap, phrase", [
    (1, 10, "folds must be an integer >= 2"), (21, 10, "folds must be at most samples (20)"),
    (3, -1, "bootstrap must be an integer >= 0")])
def test_bad_options(folds, bootstrap, phrase):
    with pytest.raises(LayerPruneError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        stability.stability(noise_states(samples=20), folds, bootstrap)


def test_compute_writes_the_stability_files(tmp_path):
    states = clear_states(samples=12)
    doc = stability.write_distances(states, tmp_path, folds=2, bootstrap=30)
    draw_distances(doc, tmp_path, title="t")
    saved = json.loads((tmp_path / stability.STABILITY_FILE).read_text())
    assert saved == doc["stability"] and saved["folds"]["k"] == 2
    assert saved["bootstrap"]["resamples"] == 30
    assert (tmp_path / STABILITY_FIGURE).stat().st_size > 5000
    on_disk = json.loads((tmp_path / distances.DISTANCES_FILE).read_text())
    assert set(on_disk) == {"num_layers", "n_samples", "distance"}  # unchanged format
    assert on_disk["distance"] == distances.triangle(distances.pairwise_mean_distance(states))
    assert saved["start"] == [row.index(min(row)) for row in on_disk["distance"]]


def _cli(model, data, out, samples, *extra):
    return main(["distances", "--model", model, "--data", data, "--samples", str(samples),
                 "--seq-len", "12", "--out", str(out), *extra])


def test_cli_writes_stability_and_skips_folds_when_samples_are_few(tiny_models, texts_jsonl,
                                                                   tmp_path, capsys):
    model = tiny_models["llama"]
    assert _cli(model, texts_jsonl, tmp_path / "d", 6, "--folds", "2", "--bootstrap", "10") == 0
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads((tmp_path / "d" / stability.STABILITY_FILE).read_text())
    assert doc["folds"]["sizes"] == [3, 3] and doc["bootstrap"]["resamples"] == 10
    assert printed["stability"] == stability.summary_line(doc)
    assert (tmp_path / "d" / STABILITY_FIGURE).is_file()
    # The default 3 folds need 3 samples: with 2 the check is skipped, saying why.
    assert _cli(model, texts_jsonl, tmp_path / "two", 2) == 0
    doc = json.loads((tmp_path / "two" / stability.STABILITY_FILE).read_text())
    assert doc["folds"] == {"skipped": "2 sample(s) are too few for 3 folds"}
    assert doc["bootstrap"]["resamples"] == 200


@pytest.mark.parametrize("option, value, phrase", [
    ("--folds", "1", "folds must be an integer >= 2"),
    ("--folds", "7", "folds must be at most samples (6)"),
    ("--bootstrap", "-1", "bootstrap must be an integer >= 0")])
def test_cli_bad_stability_options_fail_before_loading(option, value, phrase, tiny_models,
                                                       texts_jsonl, tmp_path, capsys,
                                                       weights_must_not_load):
    assert _cli(tiny_models["llama"], texts_jsonl, tmp_path / "o", 6, option, value) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("layerprune distances: error: "), err
    assert phrase in err[0], err
    assert not (tmp_path / "o").exists()
