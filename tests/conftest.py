"""Shared fixtures. The environment (offline hub, Triton interpreter on CPU) is set by the top-level conftest.py."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 xdist workers on a 2-core CI box: one thread each avoids oversubscription, which makes tiny
    # matmuls and softmaxes several times slower than single-threaded.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: see docs/GPU.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield
