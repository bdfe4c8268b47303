"""method/: the paper's method as numbers: text in, distances and pruned models out.

Data and tokens (`data`, `calibration`, `batching`), the residual stream at the last token
(`hidden_states`, `streaming` for models larger than memory), the angular distances between
layers (`distances`) and how stable the block choice is (`stability`), other block criteria
(`criteria`) and next-token `loss`, then the cut: which layers (`prune`), what that does to a
config (`layer_config`) and to a checkpoint on disk (`surgery`). Nothing here draws: report/
draws what these return.

May import: models, store, errors.
"""
