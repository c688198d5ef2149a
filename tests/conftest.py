"""Shared test fixtures. Tests build their own small data; the real data is optional."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    # Two cores are shared by the whole suite; one intra-op thread avoids oversubscription.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "la" / "cases.txt").exists():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA
