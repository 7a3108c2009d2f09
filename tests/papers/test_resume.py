"""The paper loops on ``core.training.Trainer``: SMR pretraining, the semi-supervised arms (supervised, FixMatch,
SimCLR + fine-tuning) and AutoVP's prompt training each resume bitwise after a SIGKILL (weights, optimizer, RNGs and
the loop's own history), run under bf16 autocast on the CPU, and on CUDA in fp16/bf16 (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from potpourri.core.training import TrainOptions
from potpourri.papers.semi_supervised import SemiSupConfig, run_arm
from potpourri.papers.smr import FeatureDecoder, SMRViT, pretrain
from potpourri.tune.visual_prompt import VPConfig, build_visual_prompt, train_visual_prompt
from tests.resume import assert_resumes_bitwise
from tests.tune.tune_testkit import tiny_model

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _options(resume: bool, **kw) -> TrainOptions:
    return TrainOptions(**{"device": "cpu", "checkpoint_every": 2, "resume": resume, "progress": False, **kw})


# ----------------------------------------------------------------------------------------------------- SMR
class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, 6, H/4, W/4)


def smr_job(out: str, resume: bool, *, objective: str = "mae", steps: int = 8, options: TrainOptions | None = None):
    """MAE-style pretraining (random masking from the registered generator) of a tiny student + decoder."""
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher = _Teacher().requires_grad_(False)
    student = SMRViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2)
    decoder = FeatureDecoder(16, 6, student.num_tokens, decoder_dim=16, heads=2)
    images = F.interpolate(torch.rand(8, 3, 2, 2), size=16, mode="bilinear", align_corners=False)
    losses = pretrain(
        student, decoder, teacher, images, objective, steps=steps, batch_size=4, r=3, visible=6, lr=3e-3, seed=1,
        options=options or _options(resume), checkpoints=Path(out) / "checkpoints",
    )  # fmt: skip
    tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
    tensors |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()} | {"losses": torch.tensor(losses)},
              f"{out}/final.safetensors")  # fmt: skip
    return losses


@pytest.mark.slow
def test_smr_pretraining_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise(
        "tests.papers.test_resume:smr_job",
        tmp_path,
        kill_at=5,
        outputs=["final.safetensors"],
        checkpoints="checkpoints",
    )


# ----------------------------------------------------------------------------------------------------- semi-supervised
def _semisup_data() -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(12) % 3
    images = 0.3 * torch.rand(12, 3, 16, 16, generator=g)
    images[torch.arange(12), labels] += 0.5
    return (images, labels), torch.rand(16, 3, 16, 16, generator=g)


def semisup_job(out: str, resume: bool, *, arm: str = "fixmatch", options: TrainOptions | None = None):
    """One arm of the comparison on a tiny CNN; SimCLR runs 3 pretraining steps, then 7 fine-tuning steps."""
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg = SemiSupConfig(width=4, steps=10, batch_size=4, mu=2, threshold=0.3, pretrain_fraction=0.3)
    labelled, unlabelled = _semisup_data()
    model, notes = run_arm(
        arm, cfg, 0, labelled, unlabelled, options=options or _options(resume), checkpoints=Path(out) / "checkpoints"
    )
    tensors = {k: v.cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["final_loss"] = torch.tensor(notes["final_loss"], dtype=torch.float64)
    save_file(tensors, f"{out}/final.safetensors")
    return model, notes


def simclr_job(out: str, resume: bool) -> None:
    semisup_job(out, resume, arm="simclr")


@pytest.mark.slow
def test_fixmatch_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise(
        "tests.papers.test_resume:semisup_job", tmp_path, kill_at=5, outputs=["final.safetensors"],
        checkpoints="checkpoints/fixmatch",
    )  # fmt: skip


@pytest.mark.slow
def test_simclr_killed_in_fine_tuning_resumes_bitwise_and_skips_the_finished_pretraining(tmp_path):
    assert_resumes_bitwise(
        "tests.papers.test_resume:simclr_job", tmp_path, kill_at=5, outputs=["final.safetensors"],
        checkpoints="checkpoints/finetune",
    )  # fmt: skip
    pretraining = tmp_path / "killed" / "checkpoints" / "simclr"
    assert (pretraining / "step00000003.safetensors").is_file()  # finished before the kill, restored, not retrained


# ----------------------------------------------------------------------------------------------------- AutoVP
def _pixels(n: int = 30, size: int = 16, num_classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % num_classes
    x = 0.2 * torch.rand(n, 3, size, size, generator=g)
    x[torch.arange(n), labels] += 0.6
    return TensorDataset(x, labels)


def autovp_job(out: str, resume: bool, *, options: TrainOptions | None = None) -> list[dict]:
    """IterMap (re-mapped every epoch) on a tiny source: 3 epochs x 3 batches, checkpoints every 2 steps."""
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = _pixels()
    cfg = VPConfig("iter", width=4)
    model = build_visual_prompt(tiny_model(num_classes=12), 3, cfg, canvas=24, train_data=data)
    history = train_visual_prompt(
        model, data, data, epochs=3, lr=0.1, batch_size=10, cfg=cfg, options=options or _options(resume),
        checkpoints=Path(out) / "checkpoints",
    )  # fmt: skip
    rows = torch.tensor([[h["epoch"], h["train_loss"], h["scale"], h.get("val_acc", -1.0)] for h in history])
    tensors = {k: v.cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("source.")}
    save_file({**tensors, "history": rows.double()}, f"{out}/final.safetensors")
    return history


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 7])  # 5: mid-epoch (checkpoint at 4); 7: checkpoint at the epoch end (6)
def test_autovp_killed_mid_epoch_or_after_an_epoch_end_resumes_bitwise(tmp_path, kill_at):
    assert_resumes_bitwise(
        "tests.papers.test_resume:autovp_job", tmp_path, kill_at=kill_at, outputs=["final.safetensors"],
        checkpoints="checkpoints",
    )  # fmt: skip


def test_autovp_history_has_one_row_per_epoch_after_a_resume(tmp_path):
    straight = autovp_job(str(tmp_path / "a"), False)
    resumed = autovp_job(str(tmp_path / "a"), True)  # restores the final checkpoint: nothing retrained
    assert [h["epoch"] for h in resumed] == [1, 2, 3] and resumed == straight
    assert "val_acc" in resumed[-1] and all("val_acc" not in h for h in resumed[:-1])


# ----------------------------------------------------------------------------------------------------- precision
def _dtypes_seen(module: nn.Module) -> tuple[set, object]:
    seen: set = set()
    return seen, module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))


def test_bf16_on_the_cpu_runs_every_loop_under_autocast(tmp_path, monkeypatch):
    bf16 = TrainOptions(device="cpu", precision="bf16", progress=False)
    seen: dict[str, set] = {"smr": set(), "semisup": set(), "autovp": set()}
    original_linear = nn.Linear.forward

    def spy(name: str):
        def forward(self, x):
            out = original_linear(self, x)
            seen[name].add(out.dtype)
            return out

        return forward

    monkeypatch.setattr(nn.Linear, "forward", spy("smr"))
    losses = smr_job(str(tmp_path / "smr"), False, options=bf16)
    monkeypatch.setattr(nn.Linear, "forward", spy("semisup"))
    _, notes = semisup_job(str(tmp_path / "semisup"), False, arm="simclr", options=bf16)
    monkeypatch.setattr(nn.Linear, "forward", spy("autovp"))
    history = autovp_job(str(tmp_path / "autovp"), False, options=bf16)
    assert all(torch.bfloat16 in dtypes for dtypes in seen.values()), seen
    assert all(map(torch.isfinite, torch.tensor([*losses, notes["final_loss"], *(h["train_loss"] for h in history)])))


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_runs_every_loop_in_mixed_precision(tmp_path, precision):
    options = TrainOptions(device="cuda", precision=precision, progress=False)
    losses = smr_job(str(tmp_path / "smr"), False, steps=30, options=options)
    assert torch.isfinite(torch.tensor(losses)).all() and sum(losses[-5:]) < sum(losses[:5])
    model, notes = semisup_job(str(tmp_path / "fixmatch"), False, arm="fixmatch", options=options)
    assert next(model.parameters()).device.type == "cuda" and torch.isfinite(torch.tensor(notes["final_loss"]))
    _, notes = semisup_job(str(tmp_path / "simclr"), False, arm="simclr", options=options)
    assert torch.isfinite(torch.tensor(notes["final_loss"]))
    history = autovp_job(str(tmp_path / "autovp"), False, options=options)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert 0.0 <= history[-1]["val_acc"] <= 1.0
