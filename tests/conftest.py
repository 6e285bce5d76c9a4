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

# The tests' programs are tiny and run a few steps: compiling them costs more than running them. With LLVM's
# optimisation passes off, XLA:CPU compiles them ~40% faster (the suite's CPU time 194 -> 119 s for test_sparse and
# test_train); floating point stays IEEE either way (no fast-math), so results do not change. Subprocesses inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

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


# pytest-xdist hands out whole modules in collection order; starting the longest ones first keeps the two
# workers busy to the end instead of one of them finishing alone with a 40-second module (~25 s of wall time).
_LONGEST_FIRST = ("test_train.py", "test_sparse.py", "test_crash.py", "test_parallel.py", "test_export.py",
                  "test_embedding_kinds.py", "test_main.py", "test_model.py", "test_sharded_tables.py",
                  "test_owned_ids.py", "test_incremental.py", "test_optim.py", "test_launch.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
