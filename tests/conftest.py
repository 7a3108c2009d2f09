"""Shared test set-up: no network, a private weight cache, one thread per process for stable timings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (make test) runs one worker per core: each worker keeps to one torch thread so they do not fight
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights are converted into a fresh cache once per session, so tests also cover the conversion path."""
    cache = tmp_path_factory.mktemp("potpourri-cache")
    os.environ["POTPOURRI_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="module", autouse=True)
def _one_thread_when_marked(request: pytest.FixtureRequest):
    """Modules with ``pytestmark = pytest.mark.one_thread`` run on one torch thread (tiny models are fastest and
    steadiest so on a shared 2-core machine); the thread count is restored afterwards."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
