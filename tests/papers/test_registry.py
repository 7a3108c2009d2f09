"""Every ``potpourri reproduce`` entry points at a real ``run(quick, out)`` function."""

from __future__ import annotations

import importlib
import inspect

import pytest

from potpourri.papers.registry import EXPERIMENTS


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_entry_resolves_to_a_run_function(name: str) -> None:
    module, function = EXPERIMENTS[name][0].split(":")
    run = getattr(importlib.import_module(module), function)
    assert list(inspect.signature(run).parameters)[:2] == ["quick", "out"]
