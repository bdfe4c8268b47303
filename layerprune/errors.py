"""The one exception type for bad input: the CLI prints its message and exits 2."""


class LayerPruneError(ValueError):
    """Bad input or an impossible request. The message names the parameter and allowed values."""
