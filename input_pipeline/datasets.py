"""Where a run's prepared DIEN directory comes from: the built-in synthetic data, or a directory given."""

from __future__ import annotations

import json
import os

from input_pipeline import amazon, synthetic
from input_pipeline.errors import bad_file

_BUILTIN_MARKER = "builtin.json"


def builtin_data_dir(out_dir: str, spec: synthetic.SyntheticSpec, seed: int, prepare_seed: int,
                     samples: str = "last_event") -> str:
    """Generates and prepares the built-in data in `out_dir` unless the same spec, seeds and sample mode are there."""
    recipe = {"spec": _jsonable(spec), "seed": seed, "prepare_seed": prepare_seed,
              "version": synthetic.FORMAT_VERSION}
    if samples != "last_event":
        recipe["samples"] = samples
    marker = os.path.join(out_dir, _BUILTIN_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                return out_dir
    raw_dir = os.path.join(out_dir, "raw")
    reviews, meta = synthetic.generate(raw_dir, spec, seed)
    amazon.prepare(reviews, meta, out_dir, seed=prepare_seed, samples=samples)
    with open(marker + ".tmp", "w") as f:
        json.dump(recipe, f, indent=1, allow_nan=False)  # strict JSON, as every file din_jax writes
    os.replace(marker + ".tmp", marker)  # written last: a half-built directory is rebuilt next time
    return out_dir


def require_prepared(data_dir: str) -> str:
    """`data_dir` if it holds DIEN sample files, else a DataError saying how to prepare it."""
    if not data_dir:
        raise bad_file("config.data_dir", "is empty for dataset 'dien'",
                       "set --config.data_dir to a directory prepared by `python -m input_pipeline.amazon`")
    if not os.path.isdir(data_dir):
        raise bad_file(data_dir, "no such data directory",
                       "prepare one with `python -m input_pipeline.amazon --reviews ... --meta ... --out_dir "
                       f"{data_dir}` or point --config.data_dir at a prepared directory")
    return data_dir


def _jsonable(spec: synthetic.SyntheticSpec) -> dict:
    return json.loads(json.dumps(spec.__dict__))
