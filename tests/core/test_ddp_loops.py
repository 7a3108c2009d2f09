"""Training loops sharded across processes: BatchNorm over the global batch of a torchrun job on the CPU
(``core.syncbn``), the segmenter (BatchNorm trains), the small SAM (NumPy prompt sampling), the detector (a loss
normalised by the global batch's assigned scores) and the Mask Frozen-DETR head (instances per image vary: a loss
normalised by the global instance count): two gloo processes, each on half of every batch, compute what one process
does on the whole.

One ``torchrun --nproc_per_node 2`` launch runs both jobs; the one-process references run in the test's process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from potpourri.core.syncbn import ProcessBatchNorm, synchronise_batchnorm
from potpourri.core.training import TrainOptions
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from potpourri.core.distributed import process_group
from tests.core.test_ddp_loops import batchnorm_job, detector_job, mask_head_job, sam_job, segmenter_job
with process_group("cpu"):
    batchnorm_job(sys.argv[1])
    segmenter_job(sys.argv[1])
    sam_job(sys.argv[1])
    detector_job(sys.argv[1])
    mask_head_job(sys.argv[1])
"""


def planted_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 images of 3 channels with different per-channel means and scales, and a fixed upstream gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + torch.tensor(
        [0.0, 2.0, -1.0]
    ).view(1, 3, 1, 1)
    return x, torch.randn(8, 3, 5, 5, generator=g)


def batchnorm_job(out: str) -> None:
    """Rank r normalises images r, r+2, … with ``ProcessBatchNorm``; rank 0 writes the gathered outputs, input
    gradients, summed parameter gradients and running statistics."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, upstream = planted_batch()
    bn = synchronise_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)))[0]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    local = x[rank::world].clone().requires_grad_(True)
    y = bn(local)
    # the global objective is Σ over all images of y·upstream: each rank backpropagates its own share
    (y * upstream[rank::world]).sum().backward()
    parts = [None] * world
    torch.distributed.all_gather_object(parts, (y.detach(), local.grad, bn.weight.grad, bn.bias.grad))
    if rank == 0:
        order = torch.cat([torch.arange(8)[r::world] for r in range(world)]).argsort()
        save_file(
            {
                "y": torch.cat([p[0] for p in parts])[order].contiguous(),
                "dx": torch.cat([p[1] for p in parts])[order].contiguous(),
                "dweight": sum(p[2] for p in parts),
                "dbias": sum(p[3] for p in parts),
                "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone(),
            },
            f"{out}/batchnorm.safetensors",
        )


def segmenter_job(out: str) -> None:
    """5 steps of the segmenter (full encoder, flips, unweighted CE: an exact split), batches of 4, sync BN."""
    from potpourri.segment.segmenter import train_segmenter
    from tests.segment.test_resume import planted_segmentation, seg_config

    images, masks = planted_segmentation(6)
    config = seg_config(steps=5, batch_size=4, class_weight_power=0.0, dice_weight=0.0)
    options = TrainOptions(device="cpu", checkpoint_every=2, progress=False, sync_bn=True)
    torch.manual_seed(0)  # the randomly initialised encoder (pretrained=False) draws from the global generator
    segmenter = train_segmenter(images, masks, config, options=options, checkpoints=Path(out) / "checkpoints")
    if int(os.environ.get("RANK", "0")) == 0:
        history = torch.tensor([row["loss"] for row in segmenter.history], dtype=torch.float64)
        state = {k: v.contiguous() for k, v in segmenter.net.state_dict().items()}
        save_file({**state, "history": history}, f"{out}/segmenter.safetensors")


def sam_job(out: str) -> None:
    """6 steps of ``train_sam`` (point, points and box prompts) on batches of 4, a checkpoint every 3."""
    from potpourri.segment.sam import train_sam
    from tests.segment.test_sam_resume import planted, tiny_sam

    sam = tiny_sam(steps=6, batch_size=4, lr=1e-2)
    images, masks = planted(3)
    options = TrainOptions(device="cpu", checkpoint_every=3, progress=False)
    losses = train_sam(sam, images, [(i, m) for i, m in enumerate(masks)], options=options,
                       checkpoints=Path(out) / "sam_checkpoints")  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({**sam.state_dict(), "losses": torch.tensor(losses)}, f"{out}/sam.safetensors")


def detector_job(out: str) -> None:
    """2 epochs of the tiny YOLO-style detector on 8 planted images, batches of 4, flips and turns, sync BN."""
    from dataclasses import replace

    from potpourri.detect.train import train_detector
    from tests.detect.test_resume import _detect_cfg
    from tests.detect.test_yolo import _planted, _tiny

    train = _planted(8)
    options = TrainOptions(device="cpu", checkpoint_every=3, progress=False, sync_bn=True)
    # SGD: its steps are proportional to the gradients, so float rounding stays rounding (AdamW's normalised steps
    # turn the rounding of a near-zero gradient into ±lr: 1 vs 2 threads of one process differ by 5.8e-3 with it)
    cfg = replace(_detect_cfg(epochs=2), eval_every=0, augment=True, optimizer="sgd", lr=0.05)
    result = train_detector(train, train[:4], cfg, model=_tiny(), run_path=f"{out}/detect", options=options)
    if int(os.environ.get("RANK", "0")) == 0:
        history = torch.tensor([[row["loss"], row["loss_cls"], row["loss_giou"]] for row in result.history])
        save_file({**result.model.state_dict(), "history": history.double()}, f"{out}/detector.safetensors")


def mask_head_job(out: str) -> None:
    """8 steps of the mask head on a frozen tiny detector; batches of 4 images with one or two instances each."""
    from potpourri.detect.mask_head import MaskHeadConfig, train_mask_head
    from tests.detect.test_mask_head import _planted, _tiny_detector

    cfg = MaskHeadConfig(dim=16, roi_size=14, max_steps=8, batch_size=4, lr=5e-3, progress=False)
    options = TrainOptions(device="cpu", checkpoint_every=3, progress=False)
    head, history = train_mask_head(_tiny_detector(), _planted(6), cfg, options=options,
                                    checkpoints=Path(out) / "mask_checkpoints")  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        losses = torch.tensor(history["losses"], dtype=torch.float64)
        save_file({**head.state_dict(), "losses": losses}, f"{out}/mask_head.safetensors")


def test_process_batchnorm_outside_a_group_is_batchnorm() -> None:
    x, _ = planted_batch()
    reference, synced = nn.BatchNorm2d(3), synchronise_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(synced, ProcessBatchNorm)
    torch.testing.assert_close(synced(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, reference.running_var, rtol=0, atol=0)
    frozen = synchronise_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3).eval()))
    assert isinstance(frozen[1], ProcessBatchNorm) and not frozen[1].training  # the mode survives the swap


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_normalise_and_train_as_one(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    two = tmp_path / "two"
    two.mkdir()
    done = standalone(script, two)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    # BatchNorm: nn.BatchNorm2d on the whole batch in this process is the independent reference
    x, upstream = planted_batch()
    reference = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        reference.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    whole = x.clone().requires_grad_(True)
    y = reference(whole)
    (y * upstream).sum().backward()
    got = load_file(str(two / "batchnorm.safetensors"))
    expected = {"y": y, "dx": whole.grad, "dweight": reference.weight.grad, "dbias": reference.bias.grad,
                "running_mean": reference.running_mean, "running_var": reference.running_var}  # fmt: skip
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.detach(), rtol=1e-5, atol=1e-5, msg=f"batchnorm '{key}'")

    # the segmenter: 2 processes with sync BN reach the weights and losses of 1 process on the whole batch
    one = tmp_path / "one"
    one.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        segmenter_job(str(one))
        sam_job(str(one))
        detector_job(str(one))
        mask_head_job(str(one))
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(one / "segmenter.safetensors")), load_file(str(two / "segmenter.safetensors"))
    assert set(a) == set(b)
    from potpourri.segment.segmenter import Segmenter
    from tests.segment.test_resume import seg_config

    untrained = Segmenter(seg_config()).net.state_dict()  # the same seeded initialisation
    assert not torch.equal(
        untrained["classifier.weight"], a["classifier.weight"]
    )  # it trained: not two idle runs compared
    decoder_stats = [v for k, v in a.items() if k.startswith("decoder") and k.endswith("running_mean")]
    assert decoder_stats and all(v.abs().sum() > 0 for v in decoder_stats)  # they trained: the synced path ran
    torch.testing.assert_close(b.pop("history"), a.pop("history"), rtol=1e-5, atol=0)  # the global batch's loss
    # AdamW divides by sqrt(v): a gradient that is zero up to float rounding (the sum of two halves vs one whole)
    # can step either way by up to lr. The same one-process run on 1 vs 2 threads differs by 4.7e-4 (measured), so
    # weights and statistics are compared at 1e-3; 5 steps of lr 2e-3 move them by ~1e-2.
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")

    # the small SAM: a mean over regions, no BatchNorm that trains
    sam_one = load_file(str(one / "sam.safetensors"))
    sam_two = load_file(str(two / "sam.safetensors"))
    assert abs(sam_one["losses"][-1] - sam_one["losses"][0]) > 1e-3  # it learned
    torch.testing.assert_close(sam_two.pop("losses"), sam_one.pop("losses"), rtol=1e-5, atol=0)
    # a key projection's bias has a zero gradient (softmax ignores a shift shared by all keys): AdamW turns its
    # rounding noise into steps of ±lr, so those biases are left out; every other weight within 1e-3 (see above)
    for key, value in sam_one.items():
        if not key.endswith("k_proj.bias"):
            torch.testing.assert_close(sam_two[key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")

    # the detector: BatchNorm trains (sync BN), the loss is normalised by the whole batch's assigned scores
    det_one = load_file(str(one / "detector.safetensors"))
    det_two = load_file(str(two / "detector.safetensors"))
    assert not torch.equal(det_one["history"][0], det_one["history"][-1])  # it learned
    torch.testing.assert_close(det_two.pop("history"), det_one.pop("history"), rtol=1e-5, atol=0)
    for key, value in det_one.items():
        if value.is_floating_point():
            torch.testing.assert_close(det_two[key], value, rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(det_two[key], value), key

    # the mask head: images carry one or two instances, so the slices' instance counts differ (AdamW, no BatchNorm)
    head_one = load_file(str(one / "mask_head.safetensors"))
    head_two = load_file(str(two / "mask_head.safetensors"))
    assert abs(head_one["losses"][-1] - head_one["losses"][0]) > 1e-3  # it learned
    torch.testing.assert_close(head_two.pop("losses"), head_one.pop("losses"), rtol=1e-5, atol=0)
    for key, value in head_one.items():
        torch.testing.assert_close(head_two[key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
