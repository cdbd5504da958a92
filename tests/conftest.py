"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Path:
    """The shared benchmark directory ($R1KIT_DATA_DIR), for tests marked `data`.

    Unset: the test skips, so a fresh checkout's suite passes without the data. With
    R1KIT_REQUIRE_DATA=1 (as CI sets) the absence fails instead: a CI that lost its data must not
    look green. A set but missing directory always fails (r1kit.data.data_dir raises).
    """
    from r1kit.data import DATA_ENV, data_dir as resolve

    path = resolve()
    if path is None:
        reason = f"{DATA_ENV} is not set (point it at the shared benchmark data to run this test)"
        if os.environ.get("R1KIT_REQUIRE_DATA") == "1":
            pytest.fail(f"R1KIT_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where CUDA is absent (they run with `-m gpu` on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
