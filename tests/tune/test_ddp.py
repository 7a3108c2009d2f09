"""Data-parallel training: 2 torchrun processes (gloo) reach the weights of 1 process with the same global batch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, train
from tests.torchrun import standalone
from tests.tune.tune_testkit import colour_data, tiny_model


def ddp_job(out: str) -> None:
    """Full SGD on TinyNet; run once in this process and once under torchrun with 2 processes."""
    model = tiny_model()
    plan = get_strategy("full-sgd").prepare(model, lr=0.05)
    cfg = TuneConfig(epochs=2, batch_size=8, lr=0.05, warmup_steps=2, bn="eval", progress=False, device="cpu")
    # 35 images: the last global batch of 3 splits 2 + 1 across two processes (the uneven-slice weighting)
    train(model, colour_data(35), colour_data(12, seed=1), plan, cfg, run=out)


DDP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})  # the repository root: tests is a package
from tests.tune.test_ddp import ddp_job
ddp_job(sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_reach_the_weights_of_one(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT.format(tests_dir=str(Path(__file__).parents[2])))
    ddp_job(str(tmp_path / "one"))  # one process: this one
    double = standalone(script, tmp_path / "two", timeout=240)
    assert double.returncode == 0, double.stderr.decode()[-2000:]

    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(one) == set(two)
    start = tiny_model().state_dict()
    assert not torch.allclose(one["conv_stem.weight"], start["conv_stem.weight"], atol=1e-3)  # training moved it
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=f"'{key}' differs between 1 and 2 processes")

    def rows(folder):
        return list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))

    assert len(rows(tmp_path / "two")) == 2  # only rank 0 wrote metrics
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), abs=1e-5)  # all-reduced over ranks
        assert b["val_acc"] == a["val_acc"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
