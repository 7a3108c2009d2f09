"""YOLOv6 v3 training parts: the anchor-aided training (AAT) loss and the ATSS warm-up → TAL assigner schedule.

After ``meituan/YOLOv6`` v3 (``yolov6/models/losses/loss_fuseab.py``, ``yolov6/models/heads/effidehead_fuseab.py``,
``atss_warmup_epoch`` in ``yolov6/models/losses/loss.py``); our own code.

* **AAT**: the head's anchor-based branch (``EffiDeHead(anchor_aided=True)``) predicts, per point and anchor shape,
  class logits and YOLOv5-style box offsets: centre ``point + (2σ(t_xy) − 1)·stride``, size ``(2σ(t_wh))²·anchor``.
  ``AnchorAidedLoss`` assigns ground truth to those anchors with the anchor-free branch's current assigner (ATSS
  with the real anchor boxes, or TAL) and adds a varifocal class loss and a GIoU box loss (weights 1 : 2.5). The
  branch only shapes the shared features during training; ``reparameterize()`` deletes it.
* **Schedule** ``assigner_at``: ATSS for the first ``atss_warmup_epochs`` epochs (static, geometric: stable while
  predictions are still noise), then the configured assigner (TAL) once predictions carry information.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.layers import varifocal_loss
from potpourri.models.yolo import make_anchors

__all__ = ["AnchorAidedLoss", "anchor_boxes", "assigner_at", "decode_anchor_boxes"]


def assigner_at(epoch: int, assigner: str, atss_warmup_epochs: int) -> str:
    """The assigner's name for 0-based ``epoch``: ``atss`` during the warm-up epochs, ``assigner`` after."""
    if atss_warmup_epochs < 0:
        raise PotpourriError(f"atss_warmup_epochs must be 0 or more, got {atss_warmup_epochs}")
    return "atss" if epoch < atss_warmup_epochs else assigner


def anchor_boxes(
    image_size: tuple[int, int], strides: Sequence[int], shapes: Sequence[tuple[float, float]], device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points (N, 2), strides (N,) and anchor boxes (N, 4) xyxy in pixels of the AAT branch, N = A·len(shapes),
    laid out as the head's ``raw_anchor``: per level, point-major, anchor-minor."""
    points, stride_of = make_anchors(image_size, strides, device)
    na = len(shapes)
    points, stride_of = points.repeat_interleave(na, 0), stride_of.repeat_interleave(na)
    sizes = torch.tensor(shapes, dtype=points.dtype, device=points.device).repeat(len(points) // na, 1)  # (N, 2)
    half = sizes * stride_of[:, None] / 2
    return points, stride_of, torch.cat([points - half, points + half], -1)


def decode_anchor_boxes(
    offsets: torch.Tensor, points: torch.Tensor, stride_of: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """``(..., N, 4)`` raw offsets → xyxy boxes: centre ``point + (2σ − 1)·stride``, size ``(2σ)²·anchor size``."""
    centre = points + (2 * offsets[..., :2].sigmoid() - 1) * stride_of[:, None]  # (..., N, 2)
    size = (2 * offsets[..., 2:].sigmoid()).square() * (boxes[:, 2:] - boxes[:, :2])  # (..., N, 2)
    return torch.cat([centre - size / 2, centre + size / 2], -1)


class AnchorAidedLoss:
    """Varifocal class + GIoU box loss of the AAT branch's ``raw_anchor`` (B, N, 4+K) against padded ground truth."""

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int],
        shapes: Sequence[tuple[float, float]],
        *,
        weights: tuple[float, float] = (1.0, 2.5),
    ):
        if not shapes:
            raise PotpourriError("AnchorAidedLoss needs the head's anchor shapes; build the detector with aat=True")
        self.num_classes, self.strides, self.shapes, self.weights = num_classes, tuple(strides), tuple(shapes), weights
        self.total: Callable[[torch.Tensor], torch.Tensor] | None = None  # as DetectionLoss.total

    def __call__(
        self,
        raw_anchor: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
        image_size: tuple[int, int],
        assigner,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total AAT loss and its parts, assigned by ``assigner`` (``ATSSAssigner`` or ``TaskAlignedAssigner``)."""
        from torchvision.ops import generalized_box_iou_loss

        points, stride_of, boxes = anchor_boxes(image_size, self.strides, self.shapes, raw_anchor.device)
        if raw_anchor.shape[1] != len(points) or raw_anchor.shape[-1] != 4 + self.num_classes:
            raise PotpourriError(f"anchor-branch output {tuple(raw_anchor.shape)} does not match {len(points)} "
                                 f"anchors and {self.num_classes} classes")  # fmt: skip
        offsets, logits = raw_anchor[..., :4], raw_anchor[..., 4:]  # (B, N, 4), (B, N, K)
        pd_boxes = decode_anchor_boxes(offsets, points, stride_of, boxes)  # (B, N, 4) pixels
        assigned = assigner(logits.detach().sigmoid(), pd_boxes.detach(), points, gt_labels, gt_boxes, gt_mask,
                            strides=stride_of, anchor_boxes=boxes)  # fmt: skip
        score_sum = assigned.scores.sum()
        score_sum = (self.total(score_sum) if self.total is not None else score_sum).clamp_min(1.0)
        positive = F.one_hot(assigned.labels, self.num_classes).float() * assigned.fg[..., None]
        loss_cls = varifocal_loss(logits, assigned.scores, positive) / score_sum
        fg = assigned.fg
        if fg.any():
            weight = assigned.scores.sum(-1)[fg]  # (P,)
            giou = generalized_box_iou_loss(pd_boxes[fg], assigned.boxes[fg], reduction="none")  # (P,)
            loss_box = (giou * weight).sum() / score_sum
        else:
            loss_box = offsets.sum() * 0.0  # keeps the graph connected on a batch without boxes
        total = self.weights[0] * loss_cls + self.weights[1] * loss_box
        return total, {"loss_ab_cls": loss_cls.item(), "loss_ab_giou": loss_box.item(), "positives_ab": int(fg.sum())}
