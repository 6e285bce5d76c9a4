"""The seed's --tf: DIN with every din_jax extra off, to show what each speed-up contributes.

Whole-table embedding gradients (TF1's dense Adam on every row), histories padded to 50, no
background batch preparation, fp32. Same model, data and flags as configs/default.py otherwise.
"""

from configs import default


def get_config():
    """configs/default.py with sparse_embeddings, packing, bucketing and smartstaged off."""
    config = default.get_config()
    config.sparse_embeddings = False
    config.pack_granularity = 0
    config.bucket_boundaries = ()
    config.smartstaged = False
    config.micro_batch = 0
    config.precision = "fp32"
    return config
