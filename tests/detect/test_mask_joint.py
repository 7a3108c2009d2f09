"""Full fine-tuning of the small DETR + mask head: it starts where the frozen arm's DETR and head start, it moves the
DETR (the frozen arm leaves it bit-identical), the Lite0 trunk stays frozen in both, and a CPU budget stops it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potpourri.detect.detr import LiteDetr, LiteDetrFrozen, SmallDetrConfig, train_small_detr
from potpourri.detect.mask_head import InstanceSample, MaskHeadConfig, train_mask_head
from potpourri.detect.mask_joint import joint_initialisation, train_detr_and_mask_head
from potpourri.models.yolo import Lite0Backbone
from tests.detect.instances import planted_instances

pytestmark = pytest.mark.one_thread
SIZE = 64


def _detr_cfg(**kw) -> SmallDetrConfig:
    base = dict(num_classes=2, dim=16, heads=2, queries=4, decoder_layers=2, ffn=32, encoder_ffn=32, batch_size=2,
                max_steps=6, seed=3, progress=False)  # fmt: skip
    return SmallDetrConfig(**{**base, **kw})


def _head_cfg(**kw) -> MaskHeadConfig:
    return MaskHeadConfig(**{"dim": 16, "batch_size": 2, "max_steps": 3, "seed": 5, "progress": False, **kw})


def _samples(n: int = 4) -> list[InstanceSample]:
    return planted_instances(n, SIZE, 2)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_starts_from_the_frozen_arms_initialisation() -> None:
    samples, backbone = _samples(), Lite0Backbone()
    detr, head = joint_initialisation(_detr_cfg(), _head_cfg(), backbone.fine_channels)
    untrained, _ = train_small_detr(samples, _detr_cfg(max_steps=0), backbone=backbone)  # the frozen arm's start
    assert _same(_state(detr), _state(untrained))
    frozen_head, _ = train_mask_head(LiteDetrFrozen(LiteDetr(backbone, untrained).eval()), samples,
                                     _head_cfg(max_steps=0))  # fmt: skip
    assert _same(_state(head), _state(frozen_head))


def test_joint_training_moves_the_detector_and_the_frozen_arm_does_not() -> None:
    samples, backbone = _samples(), Lite0Backbone()
    trunk = _state(backbone)
    start_detr, start_head = (_state(m) for m in joint_initialisation(_detr_cfg(), _head_cfg(), backbone.fine_channels))
    detector, head, history = train_detr_and_mask_head(samples, _detr_cfg(), _head_cfg(), backbone=backbone,
                                                       max_steps=3)  # fmt: skip
    assert history["steps"] == 3 and all(np.isfinite(history["mask_losses"]))  # every batch had instances
    moved = [k for k, v in detector.detr.state_dict().items() if not torch.equal(v, start_detr[k])]
    assert any(k.startswith("decoder.") for k in moved) and any(k.startswith("encoder.") for k in moved)
    assert any(k.startswith("proj.") for k in moved)  # the mask loss and the box loss both reach the input conv
    assert not _same(_state(head), start_head)
    assert _same(_state(backbone), trunk)  # the Lite0 trunk is frozen in the joint arm too

    frozen_detr = detector.detr  # the frozen arm: a head on that DETR, the DETR untouched to the bit
    before = _state(frozen_detr)
    train_mask_head(LiteDetrFrozen(detector), samples, _head_cfg())
    assert _same(_state(frozen_detr), before) and _same(_state(backbone), trunk)


def test_a_cpu_budget_stops_joint_training() -> None:
    budget = 0.5
    _, _, history = train_detr_and_mask_head(_samples(), _detr_cfg(), _head_cfg(), backbone=Lite0Backbone(),
                                             max_steps=100_000, max_cpu_seconds=budget)  # fmt: skip
    assert 0 < history["steps"] < 100_000
    # checked before each step: at least the budget is spent, and at most one step more
    assert budget <= history["cpu_s"] <= budget + history["max_step_cpu_s"] + 0.05
