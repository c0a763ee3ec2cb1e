"""Shared test fixtures: tiny models, deterministic seeds, NaN-poisoned allocations, the gpu marker."""

import os

import pytest
import torch

os.environ.setdefault("MAMBABYTE_HOME", os.path.join(os.path.dirname(__file__), ".mambabyte_home_unused"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread: the test models are tiny, so threads only add overhead, and on a shared 2-core
    CI machine OpenMP threads spinning against other processes make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like filled with NaN, so kernels that leave memory unwritten fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def tiny_model():
    from mambabyte import MambaByteLM

    torch.manual_seed(1234)
    return MambaByteLM.from_preset("tiny").eval()
