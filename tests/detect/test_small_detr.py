"""The small DETR on frozen Lite0 features: losses by hand, resume after a time cap is bitwise, the contract adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potpourri.core.training import TrainOptions
from potpourri.detect import detr as detr_module
from potpourri.detect.detr import (
    LiteDetr,
    LiteDetrFrozen,
    SmallDetr,
    SmallDetrConfig,
    detr_losses,
    load_lite_detr,
    save_lite_detr,
    train_small_detr,
)
from potpourri.detect.mask_head import InstanceSample, MaskHead
from potpourri.models.yolo import Lite0Backbone
from tests.detect.instances import planted_instances

SIZE = 64


def _tiny_cfg(**kw) -> SmallDetrConfig:
    base = dict(num_classes=2, dim=16, heads=2, queries=4, decoder_layers=2, ffn=32, encoder_ffn=32, batch_size=2,
                max_steps=6, progress=False)  # fmt: skip
    return SmallDetrConfig(**{**base, **kw})


def _samples(n: int = 4) -> list[InstanceSample]:
    return planted_instances(n, SIZE, 2)


def test_losses_against_hand_computation() -> None:
    gt = torch.tensor([[16.0, 32.0, 48.0, 64.0]])  # cxcywh (0.5, 0.75, 0.5, 0.5) of a 64-px image
    boxes = torch.tensor([[[[0.1, 0.1, 0.1, 0.1], [0.5, 0.75, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1]]]])  # (1, 1, 3, 4)
    logits = torch.tensor([[[[0.3, -1.0], [-0.5, 2.0], [0.0, 0.0]]]])  # (1, 1, 3, 2)
    out = detr_losses(logits, boxes, [(gt, torch.tensor([1]))], SIZE)
    assert out["l1"].item() == pytest.approx(0.0, abs=1e-6) and out["giou"].item() == pytest.approx(0.0, abs=1e-6)
    p = 1 / (1 + np.exp(-logits.numpy().reshape(-1)))
    t = np.zeros(6)
    t[3] = 1.0  # query 1, class 1: the matched pair
    focal = -(0.25 * t * (1 - p) ** 2 * np.log(p) + 0.75 * (1 - t) * p**2 * np.log(1 - p))
    assert out["cls"].item() == pytest.approx(focal.sum(), rel=1e-5)
    assert out["total"].item() == pytest.approx(2 * focal.sum(), rel=1e-5)


def test_forward_shapes_and_boxes_in_the_unit_square() -> None:
    torch.manual_seed(0)
    model = SmallDetr(_tiny_cfg(in_channels=(5, 7)))
    out = model(torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4))
    assert out["logits"].shape == (2, 2, 4, 2) and out["boxes"].shape == (2, 2, 4, 4)
    assert out["hidden"].shape == (2, 4, 16) and out["memory"].shape == (2, 16, 4, 4)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()


def test_a_time_capped_run_resumes_to_bitwise_identical_weights(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    backbone = Lite0Backbone(pretrained=False)
    samples = _samples()
    straight, _ = train_small_detr(samples, _tiny_cfg(), backbone=backbone)
    clock = iter([0.0] * 5 + [100.0] * 1000)  # start, cache, 3 steps within the cap, then past it
    monkeypatch.setattr(detr_module.time, "perf_counter", lambda: next(clock))
    _, first = train_small_detr(samples, _tiny_cfg(max_seconds=50.0), backbone=backbone, checkpoints=tmp_path)
    monkeypatch.undo()
    assert first["steps"] == 3 and not first["finished"]
    resumed, second = train_small_detr(samples, _tiny_cfg(), backbone=backbone, checkpoints=tmp_path,
                                       options=TrainOptions(resume=True, progress=False))  # fmt: skip
    assert second["steps"] == 6 and len(second["losses"]) == 6
    after = resumed.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in straight.state_dict().items())
    monkeypatch.setattr(detr_module, "lite0_pyramids", lambda *a, **k: pytest.fail("a finished run cached features"))
    again, third = train_small_detr(samples, _tiny_cfg(), backbone=backbone, checkpoints=tmp_path,
                                    options=TrainOptions(resume=True, progress=False))  # fmt: skip
    assert third["steps"] == 6 and all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_the_adapter_reloads_and_feeds_a_mask_head(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = Lite0Backbone(pretrained=False).eval()
    detr = SmallDetr(_tiny_cfg(in_channels=(40, 112))).eval()
    save_lite_detr(tmp_path, detr, {"note": "test"})
    model, meta = load_lite_detr(tmp_path, backbone=backbone)
    frozen = LiteDetrFrozen(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    out, ref = frozen.outputs(x), LiteDetrFrozen(LiteDetr(backbone, detr).eval()).outputs(x)
    assert meta["note"] == "test" and torch.equal(out.boxes, ref.boxes)
    assert out.strides == (4.0, 16.0) and out.embeds[0].shape == (1, 4, 16)
    head = MaskHead.for_detector(frozen, dim=16, roi_size=7)
    pixels = head.pixel_map(out.features[0], out.features[1])
    assert pixels.shape == (1, 16, SIZE // 4, SIZE // 4)
    assert math.isfinite(head(pixels, torch.tensor([[0.0, 4, 4, 30, 30]]), torch.randn(1, 16)).sum().item())
