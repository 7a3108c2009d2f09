"""Every ``potpourri reproduce`` entry points at a real ``run(quick, out, options)`` function, and ``reproduce`` /
``demo`` hand their ``--device``/``--precision`` to it as a ``TrainOptions``."""

from __future__ import annotations

import importlib
import inspect

import pytest

from potpourri.cli import main
from potpourri.core.runs import new_run
from potpourri.core.training import TrainOptions
from potpourri.papers.registry import EXPERIMENTS, compute_options


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_entry_resolves_to_a_run_function(name: str) -> None:
    module, function = EXPERIMENTS[name][0].split(":")
    run = getattr(importlib.import_module(module), function)
    assert list(inspect.signature(run).parameters)[:3] == ["quick", "out", "options"]


def test_reproduce_passes_device_and_precision_to_the_experiment(tmp_path, monkeypatch, capsys) -> None:
    seen = []

    def fake_run(quick, out, options=None):
        seen.append((quick, options))
        run = new_run("reproduce-smr", out)
        (run.path / "results.md").write_text("| arm |\n")
        return run

    monkeypatch.setattr(importlib.import_module("potpourri.papers.smr"), "run", fake_run)
    argv = ["reproduce", "smr", "--quick", "--out", str(tmp_path / "r"), "--device", "cpu", "--precision", "bf16"]
    assert main(argv) == 0
    [(quick, options)] = seen
    assert quick and isinstance(options, TrainOptions)
    assert (options.device, options.precision, options.resume) == ("cpu", "bf16", False)
    assert "| arm |" in capsys.readouterr().out


def test_demo_passes_device_and_precision_to_run_demo(tmp_path, monkeypatch) -> None:
    seen = []

    def fake_demo(out=None, *, seed=0, threads=None, options=None):
        seen.append(options)
        run = new_run("demo", out)
        run.write_summary({"probe_accuracy": 0.5, "histogram_accuracy": 0.2, "class_names": ["a", "b"], "tuning": [],
                           "inspection": {}, "segmentation": {}, "seconds": 1.0})  # fmt: skip
        return run

    monkeypatch.setattr(importlib.import_module("potpourri.papers.demo"), "run_demo", fake_demo)
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "cpu", "--precision", "bf16"]) == 0
    assert (seen[0].device, seen[0].precision) == ("cpu", "bf16")


def test_fp16_on_the_cpu_is_refused_before_any_run_starts(tmp_path, capsys) -> None:
    assert main(["reproduce", "smr", "--quick", "--out", str(tmp_path / "r"), "--device", "cpu", "--precision",
                 "fp16"]) == 2  # fmt: skip
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_options_reach_only_the_config_fields_that_exist() -> None:
    from dataclasses import dataclass

    @dataclass
    class OnlyDevice:
        device: str = "auto"

    options = TrainOptions(device="cpu", precision="bf16")
    assert compute_options(OnlyDevice, options) == {"device": "cpu"}
