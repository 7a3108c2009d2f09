"""The NCCL path of a torchrun job, run for real where a machine has two CUDA devices (skipped elsewhere):
``ProcessBatchNorm`` over the global batch on CUDA tensors, and the detector trained by two GPU processes against
one CPU process on the whole batch (the references of ``test_ddp_loops``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from potpourri.core.syncbn import synchronise_batchnorm
from potpourri.core.training import TrainOptions
from tests.core.test_ddp_loops import detector_job, planted_batch
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from potpourri.core.distributed import process_group
from tests.core.test_ddp_nccl import nccl_batchnorm_job, nccl_detector_job
with process_group("cuda"):
    nccl_batchnorm_job(sys.argv[1])
    nccl_detector_job(sys.argv[1])
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_nccl_available()), reason="no NCCL in this torch"
    ),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one CUDA device per process (2 here)"),
]


def nccl_batchnorm_job(out: str) -> None:
    """Rank r normalises images r, r+2, … on cuda:r; rank 0 writes the gathered outputs and the summed gradients."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    x, upstream = planted_batch()
    bn = synchronise_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)))[0].to(device)
    local = x[rank::world].to(device).requires_grad_(True)
    y = bn(local)
    (y * upstream[rank::world].to(device)).sum().backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    torch.distributed.all_reduce(grads)  # nccl: CUDA tensors only
    parts = [torch.empty_like(y) for _ in range(world)]
    torch.distributed.all_gather(parts, y.detach().contiguous())
    if rank == 0:
        order = torch.cat([torch.arange(8)[r::world] for r in range(world)]).argsort()
        save_file({"y": torch.cat(parts).cpu()[order].contiguous(), "dweight": grads[:3].cpu(),
                   "dbias": grads[3:].cpu(), "running_var": bn.running_var.cpu()},
                  f"{out}/batchnorm.safetensors")  # fmt: skip


def nccl_detector_job(out: str) -> None:
    """``detector_job`` on ``--device cuda`` (each process on cuda:LOCAL_RANK, NCCL all-reduces)."""
    from dataclasses import replace

    from potpourri.detect.train import train_detector
    from tests.detect.test_resume import _detect_cfg
    from tests.detect.test_yolo import _planted, _tiny

    train = _planted(8)
    options = TrainOptions(device="cuda", checkpoint_every=3, progress=False, sync_bn=True)
    cfg = replace(_detect_cfg(epochs=2), eval_every=0, augment=True, optimizer="sgd", lr=0.05)
    result = train_detector(train, train[:4], cfg, model=_tiny(), run_path=f"{out}/detect", options=options)
    if torch.distributed.get_rank() == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, f"{out}/detector.safetensors")


def test_two_gpu_processes_normalise_and_train_as_one_cpu_process(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    two = tmp_path / "two"
    two.mkdir()
    done = standalone(script, two)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    x, upstream = planted_batch()
    reference = nn.BatchNorm2d(3, momentum=0.3)
    y = reference(x)
    (y * upstream).sum().backward()
    got = load_file(str(two / "batchnorm.safetensors"))
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["dweight"], reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["dbias"], reference.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["running_var"], reference.running_var, rtol=1e-4, atol=1e-4)

    one = tmp_path / "one"
    one.mkdir()
    detector_job(str(one))  # one CPU process on the whole batch
    a, b = load_file(str(one / "detector.safetensors")), load_file(str(two / "detector.safetensors"))
    a.pop("history")
    assert set(a) == set(b)
    for key, value in a.items():  # GPU kernels round differently from the CPU: SGD keeps that rounding-sized
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
