"""Shared fixtures of the data tests: one tiny DS-Synth written once per session, and image writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from potpourri.data.synth import write_ds_synth

TINY = {"seed": 0, "size": 48, "per_class": 2, "categories": ["brick", "gravel"], "workers": 1}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A DS-Synth tree (2 categories, 2 images per kind, 48 px) and its manifest."""
    root = tmp_path_factory.mktemp("ds_synth")
    return root, write_ds_synth(root, **TINY)


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def write_png():
    """``write_png(path, array)`` writes a PNG, creating parent folders, and returns the path."""
    return _write_png


@pytest.fixture
def tiny_config() -> dict:
    """The ``write_ds_synth`` arguments of ``tiny_synth``."""
    return dict(TINY)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
