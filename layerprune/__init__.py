"""layerprune: prune the most redundant block of decoder layers from a causal LM.

The method of Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") as a
library of plain functions; Prefect lives in the top-level `tasks/` and `flows/` packages.
"""

__version__ = "0.1.0"
