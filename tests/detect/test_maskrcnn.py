"""The small Mask R-CNN baseline: torchvision's output contract at our sizes, masks inside their boxes, everything
trains, and a CPU budget stops training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.detect.mask_head import InstanceSample
from potpourri.detect.maskrcnn import build_maskrcnn, predict_maskrcnn, train_maskrcnn
from tests.detect.instances import planted_instances

pytestmark = pytest.mark.one_thread
SIZE, CLASSES = 64, 3


def _samples(n: int = 4) -> list[InstanceSample]:
    return planted_instances(n, SIZE, CLASSES)


def test_predictions_have_the_contract_shapes_and_masks_stay_in_their_boxes() -> None:
    torch.manual_seed(0)
    model = build_maskrcnn(CLASSES, pretrained=False, image_size=SIZE)
    found = predict_maskrcnn(model, _samples(2), score_thresh=0.0)
    assert sum(one["masks"].sum() for one in found) > 0  # an untrained model's masks are not empty: a real check
    for one in found:
        n = len(one["boxes"])
        assert n > 0 and one["boxes"].shape == (n, 4) and one["scores"].shape == (n,)
        assert one["masks"].shape == (n, SIZE, SIZE) and one["masks"].dtype == bool
        assert set(one["labels"].tolist()) <= set(range(CLASSES))  # 0-based, background gone
        ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        for mask, (x1, y1, x2, y2) in zip(one["masks"], one["boxes"], strict=True):
            # torchvision pastes the 28x28 mask into its box grown by one texel (box side / 28) each way, + 1 px
            pad_x, pad_y = (x2 - x1) / 28 + 1, (y2 - y1) / 28 + 1
            inside = (xs >= x1 - pad_x) & (xs <= x2 + pad_x) & (ys >= y1 - pad_y) & (ys <= y2 + pad_y)
            assert not (mask & ~inside).any()


def test_training_updates_every_part_and_stops_at_the_cpu_budget() -> None:
    torch.manual_seed(0)
    model = build_maskrcnn(CLASSES, pretrained=False, image_size=SIZE)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    budget = 0.8
    history = train_maskrcnn(model, _samples(), batch=2, max_steps=100_000, max_cpu_seconds=budget)
    assert 0 < history["steps"] < 100_000
    assert budget <= history["cpu_s"] <= budget + history["max_step_cpu_s"] + 0.05
    moved = {".".join(k.split(".")[:2]) for k, v in model.named_parameters() if not torch.equal(v, start[k])}
    assert {"backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head"} <= moved


def test_training_needs_a_stop() -> None:
    with pytest.raises(PotpourriError, match="needs a stop"):
        train_maskrcnn(build_maskrcnn(CLASSES, pretrained=False, image_size=SIZE), _samples())
