"""A small Mask R-CNN trained end to end: the baseline a mask head on a frozen detector is compared against.

torchvision's ``MaskRCNN`` class (He et al., arXiv 1703.06870) with a small backbone: the ImageNet EfficientNet-Lite0
stages ``blocks.2/4/6`` (strides 8/16/32; ``Lite0Backbone``) or our EfficientRep from scratch, a 64-channel FPN
(+ max-pool level), anchors 16/32/64/128 px at ratios 0.5/1/2, TwoMLPHead 256, a 4×64-conv mask head, 7×7 box and
14×14 mask RoIAlign. Everything trains (the Lite0 stages included, BatchNorm in train mode); no augmentation.
Training is AdamW lr 1e-3, weight decay 1e-4, 50-step linear warm-up, batch 4, stopped by a step count, a wall-clock
cap or a **CPU-second cap** (``time.process_time`` of this process, checked before each step), so an equal-compute
comparison is enforced by the loop itself. Reading order: ``build_maskrcnn`` → ``train_maskrcnn`` →
``predict_maskrcnn``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError

__all__ = ["build_maskrcnn", "predict_maskrcnn", "train_maskrcnn"]


class _FPNBackbone(nn.Module):
    """A body returning strides 8/16/32 maps + torchvision's FPN (and a max-pooled level): MaskRCNN's backbone."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 64):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))  # 4 maps (B, dim, h_i, w_i)


def build_maskrcnn(
    num_classes: int, backbone: str = "lite0", dim: int = 64, *, pretrained: bool = True, image_size: int = 256
) -> nn.Module:
    """torchvision ``MaskRCNN`` with a small backbone (``lite0``: ImageNet EfficientNet-Lite0 unless not
    ``pretrained``; ``rep``: EfficientRep from scratch), a ``dim``-channel FPN and slim heads, for square images.

    Example:
        model = build_maskrcnn(6, "lite0"); losses = model(images, targets)  # torchvision's train-mode contract
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    from potpourri.models.yolo import EfficientRep, Lite0Backbone

    if backbone not in ("lite0", "rep"):
        raise PotpourriError(f"unknown Mask R-CNN backbone '{backbone}'; choose lite0 or rep")
    body = Lite0Backbone(pretrained=pretrained) if backbone == "lite0" else EfficientRep()
    sizes = ((16,), (32,), (64,), (128,))
    return MaskRCNN(
        _FPNBackbone(body, list(body.out_channels), dim), num_classes=None, min_size=image_size,
        max_size=image_size, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, box_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
        box_head=TwoMLPHead(dim * 49, 256), box_predictor=FastRCNNPredictor(256, num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2),
        mask_head=MaskRCNNHeads(dim, (dim, dim, dim, dim), 1),
        mask_predictor=MaskRCNNPredictor(dim, dim, num_classes + 1),
        box_detections_per_img=100,
    )  # fmt: skip


def _image(sample: Any) -> torch.Tensor:
    return torch.from_numpy(sample.image).permute(2, 0, 1).float().div(255).contiguous()  # (3, H, W) in [0, 1]


def train_maskrcnn(
    model: nn.Module,
    samples: Sequence[Any],
    *,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    max_cpu_seconds: float | None = None,
    batch: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` end to end on ``samples`` (``InstanceSample``: image, masks, boxes, labels) until the first
    of ``max_steps``, ``max_seconds`` (wall) or ``max_cpu_seconds`` (this process's CPU time, counted from the call)
    is reached; returns steps, wall and CPU seconds, the costliest step's CPU seconds and the losses."""
    if max_steps is None and max_seconds is None and max_cpu_seconds is None:
        raise PotpourriError("train_maskrcnn needs a stop: max_steps, max_seconds or max_cpu_seconds")
    if not samples:
        raise PotpourriError("no training samples for Mask R-CNN")
    start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    model.train()
    step, losses, step_cpu_s = 0, [], []
    while True:
        if max_steps is not None and step >= max_steps:
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
        if max_cpu_seconds is not None and time.process_time() - cpu_start >= max_cpu_seconds:
            break
        step_start = time.process_time()
        picks = rng.choice(len(samples), min(batch, len(samples)), replace=False)
        images = [_image(samples[i]) for i in picks]
        targets = [{"boxes": torch.from_numpy(samples[i].boxes), "labels": torch.from_numpy(samples[i].labels) + 1,
                    "masks": torch.from_numpy(samples[i].masks.astype(np.uint8))} for i in picks]  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step_cpu_s.append(time.process_time() - step_start)
        step += 1
    model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps": step, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
            "max_step_cpu_s": max(step_cpu_s, default=0.0), "losses": losses,
            "trainable_params": trainable}  # fmt: skip


@torch.no_grad()
def predict_maskrcnn(
    model: nn.Module, samples: Sequence[Any], *, score_thresh: float | None = None
) -> list[dict[str, np.ndarray]]:
    """Per sample: ``boxes``, ``scores``, 0-based ``labels`` and binary ``masks`` (N, H, W) (probability > 0.5);
    ``score_thresh`` replaces torchvision's 0.05 detection threshold."""
    model.eval()
    if score_thresh is not None:
        model.roi_heads.score_thresh = score_thresh
    out = []
    for s in samples:
        found = model([_image(s)])[0]
        out.append({"boxes": found["boxes"].numpy(), "scores": found["scores"].numpy(),
                    "labels": found["labels"].numpy() - 1, "masks": found["masks"][:, 0].numpy() > 0.5})  # fmt: skip
    return out
