"""Strict JSON for every file a run writes: NaN and Inf become null, numpy and jax scalars plain numbers.

json.dump writes `NaN` by default, which is not JSON: jq, JavaScript and most readers reject the file.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy/jax scalars (and tuples) as JSON's own types."""
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / jax scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps of strict(value); a value JSON cannot hold raises TypeError instead of being written."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write(path: str, value: Any) -> None:
    """`value` as indented strict JSON at `path`, written atomically (a crash leaves the old file)."""
    from input_pipeline.textio import atomic_write  # here: din_jax.load_model, which imports this, stays numpy + jax
    with atomic_write(path, "w") as f:
        f.write(dumps(value, indent=2) + "\n")
