"""The paper loops sharded across processes: SMR's MAE pretraining (masks drawn for the global batch), the
semi-supervised arms (supervised, FixMatch's labelled and unlabelled slices, SimCLR's NT-Xent with every process's
negatives through ``ProcessGroup.gather_rows``; BatchNorm trains, so sync BN), AutoVP's prompt training and
auto-replace's distillation: two gloo processes, each on its slice of every batch, compute what one process does on
the whole batch.

One ``torchrun --nproc_per_node 2`` launch runs every job; the one-process references run in the test's process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from potpourri.core.training import TrainOptions
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
JOBS = ("smr", "supervised", "fixmatch", "simclr", "autovp", "distill")
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from potpourri.core.distributed import process_group
from tests.papers.test_ddp_papers import all_jobs, nt_xent_job
with process_group("cpu"):
    nt_xent_job(sys.argv[1] + "/nt_xent")
    all_jobs(sys.argv[1])
"""


def _options() -> TrainOptions:
    return TrainOptions(device="cpu", checkpoint_every=3, progress=False, sync_bn=True)


def _main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def all_jobs(out: str) -> None:
    """Every job into ``out/<job>/final.safetensors`` (rank 0 writes)."""
    from tests.papers.test_resume import autovp_job, smr_job

    smr_job(f"{out}/smr", False, options=_options())  # MAE: batches of 4, random masks and flips
    for arm in ("supervised", "fixmatch", "simclr"):
        semisup_job(f"{out}/{arm}", arm)
    autovp_job(f"{out}/autovp", False, options=_options())  # batches of 10: 5 per process
    distill_job(f"{out}/distill")


def semisup_job(out: str, arm: str) -> None:
    """5 steps of one semi-supervised loop on a tiny CNN whose BatchNorm trains, on slices of unequal size: labelled
    batches of 3 (2 + 1 per process), FixMatch's unlabelled batches of 6 (3 + 3; its confidence mask keeps 0 to 3 of
    them), SimCLR's batches of 5 (3 + 2)."""
    from potpourri.papers.semi_supervised import SmallCNN, train_fixmatch, train_simclr, train_supervised

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(12) % 3
    images = 0.3 * torch.rand(12, 3, 16, 16, generator=g)
    images[torch.arange(12), labels] += 0.5  # the class lights its own channel
    unlabelled = torch.rand(16, 3, 16, 16, generator=g)
    torch.manual_seed(0)
    model = SmallCNN(3, width=4)
    common = {"steps": 5, "lr": 2e-3, "seed": 0, "options": _options(), "checkpoints": Path(out) / "checkpoints"}
    if arm == "supervised":
        losses = train_supervised(model, images, labels, batch_size=3, **common)
    elif arm == "fixmatch":
        history = train_fixmatch(model, images, labels, unlabelled, batch_size=3, mu=2, threshold=0.5, **common)
        losses = [[row[k] for k in ("loss", "loss_x", "loss_u", "mask_rate")] for row in history]
    else:
        losses = train_simclr(model, unlabelled, batch_size=5, temperature=0.2, **common)
    if _main():
        Path(out).mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file({**state, "losses": torch.tensor(losses, dtype=torch.float64)}, f"{out}/final.safetensors")


def planted_views() -> torch.Tensor:
    """Embeddings of both views of 5 images (an odd count: slices of 3 and 2), first views then second views."""
    return torch.randn(10, 4, generator=torch.Generator().manual_seed(0))


def nt_xent_job(out: str) -> None:
    """SimCLR's loss alone: each process's views of images rank, rank + 2, …; rank 0 writes every process's loss
    and the gradients of its views, in image order."""
    from potpourri.core.distributed import current_group
    from potpourri.papers.semi_supervised import sharded_nt_xent

    group, z = current_group(), planted_views()
    mine = list(range(5)[group.rank :: group.world])
    local = torch.cat([z[:5][mine], z[5:][mine]]).requires_grad_(True)
    loss = sharded_nt_xent(local, group, 5, temperature=0.5)
    loss.backward()
    parts = group.all_gather_object((mine, float(loss), local.grad))
    if group.is_main:
        grad = torch.zeros(10, 4)
        for images, _, g in parts:
            grad[images], grad[[5 + i for i in images]] = g[: len(images)], g[len(images) :]
        Path(out).mkdir(parents=True, exist_ok=True)
        losses = torch.tensor([p[1] for p in parts], dtype=torch.float64)
        save_file({"grad": grad, "losses": losses}, f"{out}/final.safetensors")


def distill_job(out: str) -> None:
    """auto-replace's local distillation of a token MLP (batches of 5 drawn with replacement: 3 + 2 per process)."""
    from potpourri.deploy.auto_replace import TokenMlp, distill_locally

    torch.manual_seed(0)
    teacher, student = TokenMlp(8, 16).eval(), TokenMlp(8, 16)
    inputs = torch.randn(30, 5, 8)
    with torch.no_grad():
        targets = teacher(inputs)
    loss = distill_locally(student, inputs, targets, steps=6, lr=1e-2, batch_size=5)
    if _main():
        Path(out).mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file({**state, "losses": torch.tensor([loss], dtype=torch.float64)}, f"{out}/final.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_the_paper_loops_as_one(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = standalone(script, tmp_path / "two", timeout=200)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        all_jobs(str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)

    # SimCLR: each process's loss is world x its views' share; their gradients, averaged by the trainer, are the
    # gradients of one process's NT-Xent over all 10 views (negatives from the other process included)
    from potpourri.papers.semi_supervised import nt_xent

    z = planted_views().requires_grad_(True)
    whole = nt_xent(z[:5], z[5:], 0.5)
    whole.backward()
    sharded = load_file(str(tmp_path / "two" / "nt_xent" / "final.safetensors"))
    torch.testing.assert_close(sharded["losses"].mean(), whole.detach().double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sharded["grad"] / 2, z.grad, rtol=1e-5, atol=1e-7)

    for job in JOBS:
        one = load_file(str(tmp_path / "one" / job / "final.safetensors"))
        two = load_file(str(tmp_path / "two" / job / "final.safetensors"))
        assert set(one) == set(two), job
        if job not in ("autovp", "distill"):  # it learned: not two idle runs compared
            assert (one["losses"][-1] - one["losses"][0]).abs().max() > 1e-3, job
        # the logged losses are the global batch's (the slices' shares add up to the one-process loss)
        for key in ("losses", "history"):
            if key in one:
                torch.testing.assert_close(two.pop(key), one.pop(key), rtol=1e-5, atol=1e-7, msg=f"{job} {key}")
        # Adam(W) divides by sqrt(v): a gradient that is zero up to float rounding (the sum of two halves vs one
        # whole) can step either way by up to lr, so weights are compared at 1e-3 (as in tests/core/test_ddp_loops)
        for key, value in one.items():
            if key.endswith("qkv.bias"):  # a key bias has a zero gradient (softmax ignores a shift of every key):
                third = len(value) // 3  # AdamW turns its rounding noise into ±lr steps, so it is left out
                query_and_value = [*range(third), *range(2 * third, 3 * third)]
                value, two[key] = value[query_and_value], two[key][query_and_value]
            if value.is_floating_point():
                torch.testing.assert_close(
                    two[key], value, rtol=0, atol=1e-3, msg=lambda m, j=job, k=key: f"{j} {k}: {m}"
                )
            else:
                assert torch.equal(two[key], value), f"{job} {key}"
