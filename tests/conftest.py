"""Shared fixtures. The environment (offline hub, Triton interpreter on CPU) is set by the top-level conftest.py."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: see docs/GPU.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; keep CPU threads modest so xdist workers don't oversubscribe."""
    torch.manual_seed(0)
    yield
