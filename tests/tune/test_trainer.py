"""The training loop: schedule, learning, clipping, EMA, atomic checkpoints, kill-and-resume, NaN handling."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from potpourri.core.errors import PotpourriError
from potpourri.core.training import load_checkpoint, lr_at
from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, train
from tests.tune.tune_testkit import colour_data, tiny_model


def test_lr_schedule_warmup_then_cosine():
    kw = {"base": 1.0, "total": 110, "warmup": 10, "min_ratio": 0.1}
    assert [lr_at(s, **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_full_finetuning_learns_the_colour_task_and_writes_metrics(tmp_path):
    model = tiny_model()
    plan = get_strategy("full-adamw").prepare(model, lr=0.02)
    cfg = TuneConfig(epochs=4, batch_size=8, lr=0.02, progress=False, seed=1)
    result = train(model, colour_data(48), colour_data(30, seed=7), plan, cfg, run=tmp_path / "run")
    assert result.val_acc >= 0.9
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and int(rows[-1]["step"]) == 24
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == set(model.state_dict())


def test_grad_clip_bounds_the_update_of_plain_sgd():
    def update_norm(clip):
        model = tiny_model()
        start = [p.detach().clone() for p in model.parameters()]
        plan = get_strategy("full-sgd", momentum=0.0).prepare(model, lr=1.0)
        cfg = TuneConfig(epochs=1, batch_size=16, lr=1.0, grad_clip=clip, progress=False)
        train(model, colour_data(16), None, plan, cfg)
        deltas = [(p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start, strict=True)]
        return torch.stack(deltas).sum().sqrt().item()

    assert update_norm(0.01) == pytest.approx(0.01, rel=1e-4)  # one step of lr 1: |Δθ| = clipped |g|
    assert update_norm(None) > 0.05


def test_ema_weights_follow_the_exponential_average_of_the_steps():
    model = tiny_model()
    plan = get_strategy("subtuning", blocks=["blocks.1.0"]).prepare(model, lr=0.05)
    names = plan.trainable_names
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

    def on_step(step, live):
        for name, param in live.named_parameters():
            if name in expected:
                expected[name] = torch.lerp(expected[name], param.detach(), 0.2)

    cfg = TuneConfig(epochs=2, batch_size=8, lr=0.05, ema_decay=0.8, progress=False)
    result = train(model, colour_data(24), None, plan, cfg, on_step=on_step)
    for name, param in result.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-7)


class PoisonedAfter(Dataset):
    """Returns NaN images once ``limit`` items have been read (a loss blow-up at a known step)."""

    def __init__(self, base, limit: int) -> None:
        self.base, self.limit, self.reads = base, limit, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        self.reads += 1
        image, label = self.base[index]
        return (image * float("nan") if self.reads > self.limit else image), label


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TuneConfig(epochs=3, batch_size=8, lr=0.05, progress=False)
    clean_model = tiny_model()
    plan = get_strategy("full-adamw").prepare(clean_model, lr=0.05)
    at_step_3 = {}

    def snapshot(step, live):
        if step == 3:
            at_step_3.update(copy.deepcopy(live.state_dict()))

    train(clean_model, colour_data(24), None, plan, cfg, on_step=snapshot)

    model = tiny_model()
    plan = get_strategy("full-adamw").prepare(model, lr=0.05)
    poisoned = PoisonedAfter(colour_data(24), limit=24 + 8)  # epoch 2, second batch = step 5
    with pytest.raises(PotpourriError, match=r"loss became nan at epoch 2 step 5; stopped, last good checkpoint kept"):
        train(model, poisoned, None, plan, cfg, run=tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    assert json.loads((folder / "last.json").read_text())["step"] == 3
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "step00000003.optim.safetensors",
        "step00000003.safetensors",
    ]
    restored = tiny_model(seed=5)
    load_checkpoint(folder, model=restored)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, at_step_3[key]), key


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    model = tiny_model()
    plan = get_strategy("linear").prepare(model, lr=0.05)
    with pytest.raises(PotpourriError, match="no checkpoint to resume"):
        train(model, colour_data(16), None, plan, TuneConfig(epochs=1, progress=False), run=tmp_path, resume=True)
    train(model, colour_data(16), None, plan, TuneConfig(epochs=1, batch_size=8, progress=False), run=tmp_path)
    cfg = TuneConfig(epochs=2, batch_size=4, progress=False)
    with pytest.raises(PotpourriError, match="cannot resume with batch_size=4: the run used 8"):
        train(model, colour_data(16), None, plan, cfg, run=tmp_path, resume=True)


def resume_job(out: str, mode: str) -> None:
    """The run of the resume test: ``fresh``, ``kill`` (SIGKILL at step 9) or ``resume``; also run in subprocesses."""
    import signal

    model = tiny_model(drop_rate=0.3)  # dropout: the torch RNG must be restored too
    plan = get_strategy("full-adamw").prepare(model, lr=0.01)
    cfg = TuneConfig(epochs=3, batch_size=8, lr=0.01, warmup_steps=3, label_smoothing=0.1, ema_decay=0.9)
    cfg.bn, cfg.checkpoint_every, cfg.progress, cfg.device = "train", 2, False, "cpu"  # bitwise: a CPU claim

    def on_step(step, live):
        if mode == "kill" and step == 9:  # mid epoch 2, one step after the step-8 checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    data, val = colour_data(40), colour_data(16, seed=1)
    train(model, data, val, plan, cfg, run=out, resume=mode == "resume", on_step=on_step)


RESUME_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})  # the repository root: tests is a package
from tests.tune.test_trainer import resume_job
resume_job(sys.argv[2], sys.argv[1])
"""


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    script = tmp_path / "resume_script.py"
    script.write_text(RESUME_SCRIPT.format(tests_dir=str(Path(__file__).parents[2])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(mode, out):
        return subprocess.run([sys.executable, str(script), mode, str(out)], env=env, capture_output=True, text=True)

    resume_job(str(tmp_path / "straight"), "fresh")  # in this process, also on one thread (conftest.one_thread)
    killed = run("kill", tmp_path / "interrupted")
    assert killed.returncode == -9, killed.stderr  # really SIGKILLed, no cleanup ran
    assert json.loads((tmp_path / "interrupted" / "checkpoints" / "last.json").read_text())["step"] == 8
    assert not (tmp_path / "interrupted" / "model.safetensors").exists()
    resumed = run("resume", tmp_path / "interrupted")
    assert resumed.returncode == 0, resumed.stderr

    expected = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "interrupted" / "model.safetensors"))
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"'{key}' differs after resume"

    def metrics(folder):
        rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
        return [{k: v for k, v in row.items() if k != "epoch_s"} for row in rows]

    assert metrics(tmp_path / "interrupted") == metrics(tmp_path / "straight")
