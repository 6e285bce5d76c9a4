"""Shared test fixtures: where the real-format data files live."""

from __future__ import annotations

import os
import pathlib

import pytest

# The project's checkout sits beside shared/ (developers and CI alike); DIN_SHARED_DATA overrides.
SHARED_DATA = pathlib.Path(os.environ.get("DIN_SHARED_DATA",
                                          pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The directory of small real data files (../shared/data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-format fixtures not found at {SHARED_DATA}")
    return SHARED_DATA
