"""``core.training.Trainer``: kill-and-resume is bitwise, NaN stops keep the last good checkpoint, the best checkpoint
follows the metric, early stopping, bf16 on CPU, and device/precision errors (CUDA paths skip without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from potpourri.cli import main
from potpourri.core.errors import PotpourriError
from potpourri.core.training import EMA, NonFiniteLoss, Trainer, TrainOptions, check_precision, resolve_device
from tests.resume import assert_resumes_bitwise

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def regression(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g) + 0.1


def tiny_job(out: str, resume: bool, *, steps: int = 10, options: TrainOptions | None = None) -> Trainer:
    """Dropout, AdamW, a LambdaLR schedule, EMA, clipping and batches drawn from a torch and a NumPy generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    gen, npgen = torch.Generator().manual_seed(1), np.random.default_rng(2)
    options = options or TrainOptions(device="cpu", grad_clip=0.5, checkpoint_every=3, resume=resume, progress=False)
    trainer = Trainer(
        model, opt, total_steps=steps, options=options, folder=Path(out) / "checkpoints", ema=EMA(model, 0.9),
        schedulers={"lr": sched}, generators={"batches": gen, "noise": npgen},
    )  # fmt: skip
    x, y = regression()
    for _ in trainer.steps():
        index = torch.randint(0, len(x), (8,), generator=gen)
        noise = torch.from_numpy(npgen.normal(0, 0.01, (8, 1))).float()
        with trainer.autocast():
            loss = (model(x[index]).float() - y[index] - noise).square().mean()
        trainer.update(loss)
    trainer.finish()
    save_file(
        {**model.state_dict(), **{f"ema.{k}": v for k, v in trainer.ema.shadow.items()}}, f"{out}/final.safetensors"
    )
    return trainer


def test_killed_after_step_7_then_resumed_ends_bitwise_where_an_uninterrupted_run_does(tmp_path):
    assert_resumes_bitwise(
        "tests.core.test_trainer:tiny_job",
        tmp_path,
        kill_at=7,
        outputs=["final.safetensors"],
        checkpoints="checkpoints",
    )
    last = json.loads((tmp_path / "killed" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 10  # finish() wrote the final checkpoint


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(PotpourriError, match="no checkpoint to resume"):
        tiny_job(str(tmp_path), True)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = nn.Linear(2, 1)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, folder=tmp_path,
        options=TrainOptions(device="cpu", checkpoint_every=2, progress=False),
    )  # fmt: skip
    x = torch.ones(4, 2)
    with pytest.raises(
        NonFiniteLoss, match=r"loss became nan at step 5; stopped, last good checkpoint kept: .*step00000004"
    ):
        for step in trainer.steps():
            loss = model(x).mean() * (float("nan") if step == 4 else 1.0)
            trainer.update(loss)
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 4
    saved = load_file(str(tmp_path / "step00000004.safetensors"))
    assert torch.isfinite(saved["weight"]).all()


def test_the_best_checkpoint_follows_the_metric_and_patience_stops_early(tmp_path):
    model = nn.Linear(1, 1, bias=False)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.0), total_steps=100, folder=tmp_path,
        options=TrainOptions(device="cpu", patience=2, mode="min", progress=False),
    )  # fmt: skip
    metrics = [5.0, 3.0, 4.0, 3.5, 1.0]
    stopped_at = None
    for step in trainer.steps():
        with torch.no_grad():
            model.weight.fill_(float(step))  # the weight records which step was best
        trainer.update(model.weight.sum() * 0)
        if trainer.report(metrics[step]):
            stopped_at = step
            break
    assert stopped_at == 3  # 3.0 at step 1, then two reports without improvement
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2, "metric": 3.0}
    assert load_file(str(tmp_path / "best.safetensors"))["weight"].item() == 1.0


def test_bf16_on_the_cpu_runs_under_autocast_and_learns(tmp_path):
    seen = []
    model = nn.Linear(8, 1)
    trainer = Trainer(
        model, torch.optim.Adam(model.parameters(), lr=0.05), total_steps=60,
        options=TrainOptions(device="cpu", precision="bf16", progress=False),
    )  # fmt: skip
    x, y = regression()
    losses = []
    for _ in trainer.steps():
        with trainer.autocast():
            pred = model(x)
        seen.append(pred.dtype)
        losses.append(trainer.update((pred.float() - y).square().mean()))
    assert set(seen) == {torch.bfloat16}
    assert losses[-1] < 0.2 * losses[0]


def test_device_and_precision_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PotpourriError, match="not one of auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(PotpourriError, match="fp16 needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(PotpourriError, match="no CUDA device"):
            resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("argv", [["tune", "--data", "ds-synth:classification", "--device", "cuda"],
                                  ["tune", "--data", "ds-synth:classification", "--precision", "fp16"]])  # fmt: skip
def test_cuda_flags_without_a_gpu_exit_2_with_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("CUDA" in err), err
    assert list(tmp_path.iterdir()) == []


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_in_each_precision_learns_and_resumes(tmp_path, precision):
    options = TrainOptions(device="cuda", precision=precision, checkpoint_every=3, progress=False)
    trainer = tiny_job(str(tmp_path), False, steps=30, options=options)
    assert trainer.device.type == "cuda"
    assert (trainer.scaler is not None) == (precision == "fp16")
    resumed = tiny_job(str(tmp_path), True, steps=30, options=TrainOptions(device="cuda", precision=precision,
                                                                         resume=True, progress=False))  # fmt: skip
    assert resumed.step == 30
