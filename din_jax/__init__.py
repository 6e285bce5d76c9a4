"""din_jax: the Deep Interest Network CTR model in JAX/Flax, with DeepRec's DIN as the reference."""

import os as _os

# Row-sparse embedding updates scatter into tables that are also read in the same step; without
# region analysis XLA:CPU inserts a copy of every such table per step (O(vocabulary) again).
# Set before jax creates its backend; a flag the user already set wins.
_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=true").strip()


def __getattr__(name: str):
    """`din_jax.load_model`, imported on first use so that `import din_jax` stays light."""
    if name == "load_model":
        from din_jax.export import load_model
        return load_model
    raise AttributeError(f"module 'din_jax' has no attribute {name!r}")
