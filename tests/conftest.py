"""Shared test fixtures: where the real-format data files live; one XLA compilation cache for the whole run."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Many tests build a trainer for the same small shapes, in this process or in `python -m din_jax.main`
# subprocesses: a persistent compilation cache shared by all of them compiles each program once per run.
# The subprocesses inherit it through the environment; a test may still point its own runs elsewhere.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="din_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

# The project's checkout sits beside shared/ (developers and CI alike); DIN_SHARED_DATA overrides.
SHARED_DATA = pathlib.Path(os.environ.get("DIN_SHARED_DATA",
                                          pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))

SHARED_DATA_MISSING = (f"the real-format data files are not at {SHARED_DATA} (the shared/data folder beside this "
                       "checkout); point DIN_SHARED_DATA at a copy of them to run this test")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The directory of small real data files (../shared/data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_DATA_MISSING)
    return SHARED_DATA
