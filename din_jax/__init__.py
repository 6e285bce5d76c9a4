"""din_jax: the Deep Interest Network CTR model in JAX/Flax, with DeepRec's DIN as the reference."""

import os as _os

# Row-sparse embedding updates scatter into tables that are also read in the same step; without
# region analysis XLA:CPU inserts a copy of every such table per step (O(vocabulary) again).
# Set before jax creates its backend; a flag the user already set wins.
_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=true").strip()

# XLA:CPU's per-step scratch buffer is malloc'd and freed every step; keep freed memory for reuse
# instead of unmapping it, or every long-history step page-faults ~50 MB back in (din_jax/host_memory.py).
from din_jax import host_memory as _host_memory  # noqa: E402

_host_memory.reuse_freed_memory()


def __getattr__(name: str):
    """`din_jax.load_model`, imported on first use so that `import din_jax` stays light."""
    if name == "load_model":
        from din_jax.export import load_model
        return load_model
    raise AttributeError(f"module 'din_jax' has no attribute {name!r}")
