"""Label assignment for the ``potpourri.models.yolo`` detectors: which anchors learn which ground-truth box.

* **Assigner** ``TaskAlignedAssigner`` (TOOD / YOLOv6 TAL): an anchor is a candidate for a ground-truth box when its
  centre lies inside the box (plus, so that a box smaller than a cell is never left without one, the anchor nearest
  the box centre); alignment ``t = s^α · IoU^β`` (``s``: predicted score of the box's class); the ``topk``
  candidates with the largest ``t`` are positives; an anchor claimed by several boxes keeps the one it overlaps most;
  class targets are soft, ``t`` rescaled per box so that its best anchor gets the box's best IoU.
* **Simpler alternative** ``ATSSAssigner`` (ATSS, Zhang et al. 2020; YOLOv6 uses it for its warm-up epochs): static,
  from geometry alone. Each anchor point gets a square anchor box of side ``anchor_scale · stride``; per box and
  pyramid level the ``topk`` anchor points nearest the box centre are candidates; the positives are the candidates
  whose anchor-box IoU with the box reaches ``mean + std`` of the candidates' IoUs and whose point lies inside the
  box (a box left without one gets its best candidate, the nearest on ties); an anchor claimed by several boxes
  keeps the one with the larger anchor-box IoU; class targets are the IoU of the anchor's *predicted* box with its
  box (as YOLOv6's ``ATSSAssigner``). No α, β; the assignment of an image never changes during training.
  ``make_assigner`` builds either by name (``--assigner tal|atss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potpourri.core.boxes import box_iou_elementwise
from potpourri.core.errors import PotpourriError

__all__ = ["ASSIGNERS", "ATSSAssigner", "AssignResult", "TaskAlignedAssigner", "make_assigner"]


@dataclass
class AssignResult:
    """Per anchor: target class, box (xyxy pixels), soft class scores, foreground flag and assigned box index."""

    labels: torch.Tensor  # (B, A) int64
    boxes: torch.Tensor  # (B, A, 4)
    scores: torch.Tensor  # (B, A, K)
    fg: torch.Tensor  # (B, A) bool
    gt_index: torch.Tensor  # (B, A) int64, meaningful where fg


class TaskAlignedAssigner:
    """Task-aligned assignment (TOOD): top-k candidates by ``score^alpha · IoU^beta`` per ground-truth box."""

    def __init__(self, num_classes: int, *, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9):
        self.num_classes, self.topk, self.alpha, self.beta, self.eps = num_classes, topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_boxes: torch.Tensor,
        anchors: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
        strides: torch.Tensor | None = None,
        anchor_boxes: torch.Tensor | None = None,
    ) -> AssignResult:
        """``pd_scores`` (B, A, K) probabilities, ``pd_boxes`` (B, A, 4), ``anchors`` (A, 2) as (x, y);
        ``gt_labels`` (B, M), ``gt_boxes`` (B, M, 4), ``gt_mask`` (B, M) marks real (not padding) boxes;
        ``strides`` (A,) and ``anchor_boxes`` are accepted for a common signature with ``ATSSAssigner``, not used."""
        batch, num_anchors, num_classes = pd_scores.shape
        num_gt = gt_boxes.shape[1]
        device = pd_scores.device
        if num_gt == 0 or not gt_mask.any():
            return AssignResult(
                torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
                torch.zeros(batch, num_anchors, 4, device=device),
                torch.zeros(batch, num_anchors, num_classes, device=device),
                torch.zeros(batch, num_anchors, dtype=torch.bool, device=device),
                torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
            )
        gt_labels = gt_labels.long().clamp(0, num_classes - 1)  # padding rows hold any valid index; masked below
        # candidates: anchor centres inside the box, and the anchor nearest the box centre
        offsets = torch.cat(
            [anchors[None, None] - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - anchors[None, None]], -1
        )  # (B, M, A, 4)
        candidates = offsets.amin(-1) > self.eps  # (B, M, A)
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, M, 2)
        nearest = (anchors[None, None] - centres[:, :, None]).square().sum(-1).argmin(-1)  # (B, M)
        candidates.scatter_(2, nearest[..., None], True)
        candidates &= gt_mask[..., None].bool()

        overlaps = box_iou_elementwise(gt_boxes[:, :, None], pd_boxes[:, None]) * candidates  # (B, M, A)
        class_scores = pd_scores.transpose(1, 2).gather(1, gt_labels[..., None].expand(-1, -1, num_anchors))
        align = class_scores.pow(self.alpha) * overlaps.pow(self.beta) * candidates  # (B, M, A)

        # the top-k candidates of each box (non-candidates rank below every candidate)
        ranked = torch.where(candidates, align, torch.full_like(align, -1.0))
        top = ranked.topk(min(self.topk, num_anchors), dim=-1).indices  # (B, M, k)
        positive = torch.zeros_like(candidates).scatter_(2, top, True) & candidates  # (B, M, A)

        # an anchor claimed by several boxes keeps the one it overlaps most
        claimed = positive.sum(1, keepdim=True) > 1  # (B, 1, A)
        if claimed.any():
            best = torch.where(positive, overlaps, torch.full_like(overlaps, -1.0)).argmax(1)  # (B, A)
            best_one_hot = F.one_hot(best, num_gt).transpose(1, 2).bool()  # (B, M, A)
            positive = torch.where(claimed, best_one_hot & positive, positive)

        fg = positive.any(1)  # (B, A)
        gt_index = positive.float().argmax(1)  # (B, A)
        labels = gt_labels.gather(1, gt_index)  # (B, A)
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # (B, A, 4)

        # soft targets: alignment rescaled per box so its best positive scores the box's best IoU
        align = align * positive
        best_align = align.amax(-1, keepdim=True)  # (B, M, 1)
        best_iou = (overlaps * positive).amax(-1, keepdim=True)  # (B, M, 1)
        norm = (align * best_iou / (best_align + self.eps)).amax(1)  # (B, A)
        scores = F.one_hot(labels, num_classes).float() * (fg.float() * norm)[..., None]  # (B, A, K)
        return AssignResult(labels, boxes, scores, fg, gt_index)


def _empty_assignment(batch: int, num_anchors: int, num_classes: int, device: torch.device) -> AssignResult:
    return AssignResult(
        torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
        torch.zeros(batch, num_anchors, 4, device=device),
        torch.zeros(batch, num_anchors, num_classes, device=device),
        torch.zeros(batch, num_anchors, dtype=torch.bool, device=device),
        torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
    )


class ATSSAssigner:
    """Adaptive training-sample selection (ATSS): per level the ``topk`` anchors nearest the box centre, kept when
    their anchor-box IoU reaches the candidates' ``mean + std`` and their point lies inside the box."""

    def __init__(self, num_classes: int, *, topk: int = 9, anchor_scale: float = 5.0, eps: float = 1e-9):
        self.num_classes, self.topk, self.anchor_scale, self.eps = num_classes, topk, anchor_scale, eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_boxes: torch.Tensor,
        anchors: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
        strides: torch.Tensor | None = None,
        anchor_boxes: torch.Tensor | None = None,
    ) -> AssignResult:
        """As ``TaskAlignedAssigner``; ``strides`` (A,) gives each anchor's stride (levels are runs of equal stride,
        as ``make_anchors`` lays them out); ``anchor_boxes`` (A, 4) replaces the square ``anchor_scale·stride`` boxes
        (the AAT branch's anchors). ``pd_scores`` only sets the shape: the assignment ignores predictions."""
        batch, num_anchors, num_classes = pd_scores.shape
        device = pd_scores.device
        if gt_boxes.shape[1] == 0 or not gt_mask.any():
            return _empty_assignment(batch, num_anchors, num_classes, device)
        if strides is None or strides.shape != (num_anchors,):
            raise PotpourriError(f"ATSSAssigner needs the stride of each of the {num_anchors} anchors")
        num_gt = gt_boxes.shape[1]
        gt_labels = gt_labels.long().clamp(0, num_classes - 1)
        valid = gt_mask.bool()[..., None]  # (B, M, 1)
        if anchor_boxes is None:
            half = strides[:, None] * self.anchor_scale / 2
            anchor_boxes = torch.cat([anchors - half, anchors + half], -1)  # (A, 4)
        ious = box_iou_elementwise(gt_boxes[:, :, None], anchor_boxes[None, None])  # (B, M, A)
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, M, 2)
        distances = (anchors[None, None] - centres[:, :, None]).square().sum(-1)  # (B, M, A)

        # candidates: the topk nearest anchor points on each level
        candidates = torch.zeros_like(ious, dtype=torch.bool)
        levels = torch.unique_consecutive(strides, return_counts=True)[1].tolist()
        start = 0
        for count in levels:
            nearest = distances[..., start : start + count].topk(min(self.topk, count), -1, largest=False).indices
            candidates[..., start : start + count].scatter_(-1, nearest, True)
            start += count
        candidates &= valid

        # adaptive threshold: mean + (sample) std of the candidates' IoUs, per box
        n = candidates.sum(-1, keepdim=True).clamp_min(1)  # (B, M, 1)
        mean = (ious * candidates).sum(-1, keepdim=True) / n
        var = ((ious - mean).square() * candidates).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
        threshold = mean + var.sqrt()
        offsets = torch.cat(
            [anchors[None, None] - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - anchors[None, None]], -1
        )  # (B, M, A, 4)
        inside = offsets.amin(-1) > self.eps
        positive = candidates & (ious >= threshold) & inside
        # a box left without a positive (e.g. smaller than a cell) gets its best candidate, the nearest on ties
        ranked = torch.where(candidates, ious, torch.full_like(ious, -1.0))
        tied = candidates & (ranked >= ranked.amax(-1, keepdim=True) - self.eps)
        best = torch.where(tied, distances, torch.full_like(distances, float("inf"))).argmin(-1)  # (B, M)
        lonely = ~positive.any(-1, keepdim=True)  # (B, M, 1)
        positive |= torch.zeros_like(positive).scatter_(2, best[..., None], True) & lonely
        positive &= valid

        # an anchor claimed by several boxes keeps the one whose anchor box it overlaps most
        claimed = positive.sum(1, keepdim=True) > 1  # (B, 1, A)
        if claimed.any():
            winner = torch.where(positive, ious, torch.full_like(ious, -1.0)).argmax(1)  # (B, A)
            one_hot = F.one_hot(winner, num_gt).transpose(1, 2).bool()  # (B, M, A)
            positive = torch.where(claimed, one_hot & positive, positive)

        fg = positive.any(1)  # (B, A)
        gt_index = positive.float().argmax(1)  # (B, A)
        labels = gt_labels.gather(1, gt_index)  # (B, A)
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # (B, A, 4)
        quality = box_iou_elementwise(pd_boxes, boxes) * fg  # (B, A): IoU of the predicted box with its target
        scores = F.one_hot(labels, num_classes).float() * quality[..., None]  # (B, A, K)
        return AssignResult(labels, boxes, scores, fg, gt_index)


ASSIGNERS = ("tal", "atss")


def make_assigner(name: str, num_classes: int, *, topk: int | None = None) -> TaskAlignedAssigner | ATSSAssigner:
    """The assigner called ``name`` (``tal`` or ``atss``) with its default ``topk`` (13 and 9) unless given."""
    if name == "tal":
        return TaskAlignedAssigner(num_classes, topk=topk or 13)
    if name == "atss":
        return ATSSAssigner(num_classes, topk=topk or 9)
    raise PotpourriError(f"unknown assigner '{name}'; choose one of {', '.join(ASSIGNERS)}")


# ----------------------------------------------------------------------------------------------- losses
