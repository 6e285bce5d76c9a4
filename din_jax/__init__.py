"""din_jax: the Deep Interest Network CTR model in JAX/Flax, with DeepRec's DIN as the reference."""

import os as _os

# Row-sparse embedding updates scatter into tables that are also read in the same step; without
# region analysis XLA:CPU inserts a copy of every such table per step (O(vocabulary) again).
# Set before jax creates its backend; a flag the user already set wins.
_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=true").strip()
