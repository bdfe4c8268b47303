"""layerprune: prune the most redundant block of decoder layers from a causal LM.

The method of Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") as a
library of plain functions; Prefect lives in the top-level `tasks/` and `flows/` packages.

Wings, each importing only those below it (checked by import-linter, pyproject.toml):

    cli, api            the doors: the command line, and one function per stage on files
    config | report     the run's schema  |  figures, trade-off, leaderboard
    heal | evaluate     repair a pruned model  |  benchmarks, loss, speed
    method              calibration, hidden states, distances, criteria, prune, surgery
    models              loading, placement, checkpoint files, bundled assets
    store               artifacts, manifests, S3, leases, atomic files
    errors              the one error type for bad input
"""

__version__ = "0.1.0"
