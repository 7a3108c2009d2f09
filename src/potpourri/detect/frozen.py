"""A frozen detector behind one contract, so a head trained on top of it (the Mask Frozen-DETR mask head) never
touches a detector's internals.

The contract (``FrozenDetector``) is what Mask Frozen-DETR (arXiv 2308.03747) takes from a trained DETR: per query a
box, class probabilities and an embedding (a DETR's last decoder layer output for that query), plus a fine image
feature map (stride 4) and a coarse one (the encoder memory). Three adapters:

- ``YoloFrozen``: our anchor-free YOLOv6-style detector (``potpourri.models.yolo``). It has no queries: every anchor
  point is a "query", its embedding the head's class ⊕ box branch features there (one group per pyramid level, as
  the widths differ); detections are NMS survivors; a ground-truth box is assigned the anchor whose decoded box
  overlaps it most (the *winning anchor*).
- ``HFDetrFrozen``: Hugging Face transformers ``DetrForObjectDetection`` and, by the same code,
  ``ConditionalDetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` (sigmoid class scores instead of a
  softmax with a no-object class). Fine map: the backbone's first map; coarse map: the encoder memory (single-level
  models) or the backbone's last map (Deformable DETR, whose memory is multi-level).
- any other DETR-style module can subclass ``DetrFrozen`` and implement ``outputs`` (``potpourri.detect.detr``).

DETR-style detections are the queries whose best class score passes ``conf`` (no NMS: a DETR predicts a set), as
transformers' ``post_process_object_detection``. In training, ground-truth instances get their query by **Hungarian
matching** (``scipy.optimize.linear_sum_assignment``) on DETR's matching cost: ``5·L1`` on normalised cxcywh boxes
``− 2·GIoU − p(class)``, the assignment a DETR itself is trained with (with more instances than queries, the
unmatched instances are left out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from potpourri.core.boxes import box_iou_elementwise
from potpourri.core.errors import PotpourriError

__all__ = [
    "DetectorOutputs",
    "DetrFrozen",
    "FrozenDetector",
    "FrozenOutputs",
    "HFDetrFrozen",
    "YoloFrozen",
    "as_frozen",
    "clip_boxes",
    "detr_match_cost",
    "fine_module",
    "frozen_outputs",
    "hungarian_match",
    "load_hf_detr",
    "winning_anchors",
]

_FINE_TAPS = {"EfficientRep": "stages.0", "Lite0Backbone": "blocks.1"}  # stride-4 maps of the two backbones


@dataclass
class DetectorOutputs:
    """What a frozen detector gives a head for a batch of B images (all detached); Q queries per image."""

    features: list[torch.Tensor]  # [fine (B, C_f, H/s_f, W/s_f), coarse (B, C_c, H/s_c, W/s_c)]
    strides: tuple[float, float]  # of the fine and the coarse map
    boxes: torch.Tensor  # (B, Q, 4) xyxy pixels
    probs: torch.Tensor  # (B, Q, K) class probabilities (softmax without no-object, or sigmoid)
    embeds: list[torch.Tensor]  # per group (B, Q_g, D_g); the groups in order are the Q queries
    image_size: tuple[int, int]  # (H, W) of the input images

    def rows(self, index: torch.Tensor) -> DetectorOutputs:
        """The outputs of images ``index`` only."""
        return DetectorOutputs([f[index] for f in self.features], self.strides, self.boxes[index], self.probs[index],
                               [e[index] for e in self.embeds], self.image_size)  # fmt: skip

    @staticmethod
    def cat(parts: Sequence[DetectorOutputs]) -> DetectorOutputs:
        """Batches concatenated along the image axis."""
        first = parts[0]
        return DetectorOutputs(
            [torch.cat([p.features[i] for p in parts]) for i in range(len(first.features))], first.strides,
            torch.cat([p.boxes for p in parts]), torch.cat([p.probs for p in parts]),
            [torch.cat([p.embeds[i] for p in parts]) for i in range(len(first.embeds))], first.image_size,
        )  # fmt: skip


@runtime_checkable
class FrozenDetector(Protocol):
    """A detector a head can be trained on without knowing it: outputs, detections and training assignment."""

    module: nn.Module  # what gets frozen (eval mode, requires_grad off)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    feature_channels: tuple[int, int]  # fine, coarse
    embed_dims: tuple[int, ...]  # per embedding group

    def outputs(self, x: torch.Tensor) -> DetectorOutputs:
        """Run on normalised images ``x`` (B, 3, H, W) under no_grad."""
        ...

    def detections(self, out: DetectorOutputs, row: int, *, conf: float, iou: float, max_det: int) -> torch.Tensor:
        """Indices (into Q) of image ``row``'s detections, best first."""
        ...

    def assign(
        self, out: DetectorOutputs, row: int, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training assignment: (ground-truth indices, their query indices) for image ``row``."""
        ...


# ----------------------------------------------------------------------------------------------- YOLO
@dataclass
class FrozenOutputs:
    """Our YOLO detector's outputs for a batch of images (all detached)."""

    fine: torch.Tensor  # (B, C4, H/4, W/4) stride-4 backbone map
    p3: torch.Tensor  # (B, n3, H/8, W/8)
    embeds: list[torch.Tensor]  # per level (B, h_l·w_l, 2·C_l): class ⊕ box branch features per anchor
    boxes: torch.Tensor  # (B, A, 4) decoded xyxy pixels
    probs: torch.Tensor  # (B, A, K) class probabilities
    raw: torch.Tensor  # (B, A, 4·(R+1)+K) the detector's raw output


def clip_boxes(out: DetectorOutputs, row: int) -> torch.Tensor:
    """Image ``row``'s boxes (Q, 4) clipped to the image."""
    height, width = out.image_size
    boxes = out.boxes[row].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def fine_module(detector: nn.Module) -> nn.Module:
    """The stride-4 backbone stage of our YOLO detector."""
    name = _FINE_TAPS.get(type(detector.backbone).__name__)
    if name is None:
        raise PotpourriError(f"no stride-4 tap known for backbone {type(detector.backbone).__name__}")
    return detector.backbone.get_submodule(name)


@torch.no_grad()
def frozen_outputs(detector: nn.Module, x: torch.Tensor) -> FrozenOutputs:
    """Run the frozen YOLO detector once on normalised ``x`` (B, 3, H, W); features, per-anchor embeddings, boxes."""
    from potpourri.models.yolo import decode

    if detector.training:
        raise PotpourriError("the frozen detector must be in eval mode (call detector.eval()) so BN stays fixed")
    taps: list[torch.Tensor] = []
    handle = fine_module(detector).register_forward_hook(lambda _m, _i, out: taps.append(out))
    try:
        feats = detector.forward_features(x)
    finally:
        handle.remove()
    head, raws, embeds = detector.head, [], []
    for i, f in enumerate(feats):  # EffiDeHead.forward, keeping the branch features
        f = head.stems[i](f)
        reg, cls = head.reg_convs[i](f), head.cls_convs[i](f)
        raws.append(torch.cat([head.reg_preds[i](reg), head.cls_preds[i](cls)], 1).flatten(2))
        embeds.append(torch.cat([cls, reg], 1).flatten(2).transpose(1, 2).contiguous())
    raw = torch.cat(raws, 2).transpose(1, 2).float()
    with torch.autocast(x.device.type, enabled=False):  # boxes are decoded in fp32 under any autocast
        boxes, probs = decode(raw, num_classes=detector.num_classes, reg_max=detector.reg_max,
                              image_size=tuple(x.shape[-2:]), strides=detector.strides)  # fmt: skip
    return FrozenOutputs(taps[0], feats[0], embeds, boxes, probs, raw)


def winning_anchors(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """For each ground-truth box (M, 4), the anchor (index into A) whose decoded box (A, 4) overlaps it most."""
    if len(gt_boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    return box_iou_elementwise(gt_boxes[:, None], pred_boxes[None]).argmax(1)  # (M, A) -> (M,)


class YoloFrozen:
    """``FrozenDetector`` over our YOLO detector: anchors are the queries (module doc)."""

    def __init__(self, detector: nn.Module):
        self.module = detector
        self.mean, self.std = tuple(detector.mean), tuple(detector.std)
        self.num_classes = detector.num_classes
        fine = [m for m in fine_module(detector).modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        neck = detector.neck.out_channels
        self.feature_channels = (fine, neck[0])
        self.embed_dims = tuple(2 * c for c in neck)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> DetectorOutputs:
        """Stride-4 backbone map and P3, decoded boxes and probabilities, per-level anchor embeddings."""
        out = frozen_outputs(self.module, x)
        return DetectorOutputs([out.fine, out.p3], (4.0, 8.0), out.boxes, out.probs, out.embeds, tuple(x.shape[-2:]))

    def detections(self, out: DetectorOutputs, row: int, *, conf: float, iou: float, max_det: int) -> torch.Tensor:
        """Class-wise NMS survivors above ``conf`` (boxes clipped to the image), at least 1 px wide and high."""
        from torchvision.ops import batched_nms

        boxes = clip_boxes(out, row)
        scores, labels = out.probs[row].max(-1)
        anchor = (scores > conf).nonzero()[:, 0]
        kept = anchor[batched_nms(boxes[anchor], scores[anchor], labels[anchor], iou)[:max_det]]
        return kept[(boxes[kept, 2] - boxes[kept, 0] >= 1) & (boxes[kept, 3] - boxes[kept, 1] >= 1)]

    def assign(
        self, out: DetectorOutputs, row: int, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ground-truth box gets its winning anchor."""
        return torch.arange(len(gt_boxes)), winning_anchors(out.boxes[row], gt_boxes.to(out.boxes.device)).cpu()


# ----------------------------------------------------------------------------------------------- DETR family
def detr_match_cost(
    pred_boxes: torch.Tensor, probs: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
    image_size: tuple[int, int], *, l1: float = 5.0, giou: float = 2.0, cls: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """DETR's matching cost (M, Q) of ground truth (M, 4) xyxy px vs predictions (Q, 4) xyxy px, probs (Q, K)."""
    from torchvision.ops import box_convert, generalized_box_iou

    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=pred_boxes.dtype, device=pred_boxes.device)
    pred_n, gt_n = box_convert(pred_boxes / scale, "xyxy", "cxcywh"), box_convert(gt_boxes / scale, "xyxy", "cxcywh")
    cost = l1 * torch.cdist(gt_n, pred_n, p=1) - giou * generalized_box_iou(gt_boxes, pred_boxes)
    return cost - cls * probs[:, gt_labels].T


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one (row, column) pairs of a (M, Q) cost, rows sorted (scipy ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    if cost.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class DetrFrozen:
    """Detections and Hungarian assignment shared by every DETR-style adapter; subclasses implement ``outputs``."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    feature_channels: tuple[int, int]
    embed_dims: tuple[int, ...]

    def outputs(self, x: torch.Tensor) -> DetectorOutputs:
        raise NotImplementedError

    def detections(self, out: DetectorOutputs, row: int, *, conf: float, iou: float, max_det: int) -> torch.Tensor:
        """Queries whose best class score exceeds ``conf``, best first, at most ``max_det`` (``iou`` unused: no NMS)."""
        scores = out.probs[row].max(-1).values
        keep = (scores > conf).nonzero()[:, 0]
        keep = keep[scores[keep].argsort(descending=True, stable=True)][:max_det]
        boxes = clip_boxes(out, row)
        return keep[(boxes[keep, 2] - boxes[keep, 0] >= 1) & (boxes[keep, 3] - boxes[keep, 1] >= 1)]

    def assign(
        self, out: DetectorOutputs, row: int, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hungarian matching of the ground truth to the queries on DETR's cost (module doc)."""
        device = out.boxes.device
        cost = detr_match_cost(out.boxes[row], out.probs[row], gt_boxes.to(device).float(), gt_labels.to(device),
                               out.image_size)  # fmt: skip
        return hungarian_match(cost)


def _cxcywh_to_pixels(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    from torchvision.ops import box_convert

    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return box_convert(boxes, "cxcywh", "xyxy") * scale


class HFDetrFrozen(DetrFrozen):
    """``FrozenDetector`` over a transformers DETR / Conditional DETR / Deformable DETR ``*ForObjectDetection``.

    Example:
        >>> model = DetrForObjectDetection.from_pretrained("path/to/local/checkpoint")  # no download offline
        >>> frozen = HFDetrFrozen(model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        self.module = model
        self.mean, self.std = tuple(mean), tuple(std)
        self.softmax = type(model).__name__ == "DetrForObjectDetection"  # the others score classes by sigmoid
        self.num_classes = model.config.num_labels
        d_model = model.config.d_model
        channels = list(model.model.backbone.intermediate_channel_sizes)
        self.multi_level_memory = "Deformable" in type(model).__name__
        self.feature_channels = (channels[0], channels[-1] if self.multi_level_memory else d_model)
        self.embed_dims = (d_model,)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> DetectorOutputs:
        """Backbone stride-4 map, encoder memory, last-decoder-layer query states, boxes and class scores."""
        if self.module.training:
            raise PotpourriError("the frozen detector must be in eval mode (call .eval()) so dropout stays off")
        maps: list[torch.Tensor] = []
        handle = self.module.model.backbone.register_forward_hook(
            lambda _m, _i, out: maps.extend(f for f, _mask in out)
        )
        try:
            out = self.module(pixel_values=x)
        finally:
            handle.remove()
        height, width = x.shape[-2:]
        fine, last = maps[0], maps[-1]
        if self.multi_level_memory:
            coarse = last
        else:  # (B, h·w, d) memory of the last backbone map
            coarse = out.encoder_last_hidden_state.transpose(1, 2).reshape(len(x), -1, *last.shape[-2:])
        logits = out.logits.float()
        probs = logits.softmax(-1)[..., :-1] if self.softmax else logits.sigmoid()
        boxes = _cxcywh_to_pixels(out.pred_boxes.float(), height, width)
        strides = (height / fine.shape[-2], height / last.shape[-2])
        return DetectorOutputs([fine, coarse], strides, boxes, probs, [out.last_hidden_state], (height, width))


def load_hf_detr(folder: str | os.PathLike) -> HFDetrFrozen:
    """A transformers DETR-family checkpoint saved in ``folder`` (``save_pretrained``; never downloaded), in eval mode
    behind the contract, with the mean/std of its ``preprocessor_config.json`` when there is one (else ImageNet's)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PotpourriError(f"'{folder}' holds no config.json; pass a folder written by save_pretrained")
    from transformers import AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(str(folder), local_files_only=True).eval()
    processor = folder / "preprocessor_config.json"
    norm = json.loads(processor.read_text()) if processor.is_file() else {}
    return HFDetrFrozen(model, mean=norm.get("image_mean", (0.485, 0.456, 0.406)),
                        std=norm.get("image_std", (0.229, 0.224, 0.225)))  # fmt: skip


def as_frozen(detector: nn.Module | FrozenDetector) -> FrozenDetector:
    """``detector`` itself when it already follows the contract, our YOLO detector or a transformers DETR wrapped."""
    if isinstance(detector, FrozenDetector):
        return detector
    if hasattr(detector, "backbone") and hasattr(detector, "head") and hasattr(detector, "reg_max"):
        return YoloFrozen(detector)
    if type(detector).__name__.endswith("DetrForObjectDetection"):
        return HFDetrFrozen(detector)
    raise PotpourriError(
        f"no FrozenDetector adapter for {type(detector).__name__}; wrap it in a class with the "
        "potpourri.detect.frozen.FrozenDetector attributes (see DetrFrozen)"
    )
