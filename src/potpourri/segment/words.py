"""Sentences as prompts: a region described in words (``data/describe.py``) prompts the small SAM or the segmenter.

A ``RegionPrior`` is coarse (a 3x3 grid cell and an extent), so it can prompt in three ways:

* **words → box**: the prior's box as SAM's box prompt;
* **words → click**: one positive click where the prior is highest, or, given evidence (the segmenter's
  probability of the named kind), where prior x evidence is highest — the words say roughly where, the image says
  exactly where;
* **words → segmenter**: the segmenter's pixels of the named kind, kept inside the prior's box grown by half.

``evaluate_words`` scores these against the tight box and one centre click on held-out regions, and
``describe_prediction`` writes the sentence a *predicted* mask gets (``reproduce words-annotation``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from potpourri.data.describe import RegionPrior, describe_mask, parse_description, region_words
from potpourri.segment.sam import box_of, centre_click, predict_mask

__all__ = [
    "describe_prediction",
    "description_accuracy",
    "evaluate_words",
    "kind_regions",
    "prior_box_prompt",
    "prior_click",
    "prior_segmenter_mask",
]


def kind_regions(masks: np.ndarray, class_names: tuple[str, ...], min_pixels: int = 16) -> list[tuple[int, str, Any]]:
    """``(image index, kind, (H, W) bool region)`` for every defect class present in each class-id mask."""
    items = []
    for index, mask in enumerate(masks):
        for class_id in np.unique(mask):
            region = mask == class_id
            if class_id != 0 and region.sum() >= min_pixels:
                items.append((index, class_names[int(class_id)], region))
    return items


def prior_box_prompt(prior: RegionPrior) -> dict[str, np.ndarray]:
    """SAM's box prompt ``{"boxes": (4,)}`` in pixel corners from a prior's box (inclusive max corner)."""
    x1, y1, x2, y2 = prior.box
    return {"boxes": np.array([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], np.float32)}


def prior_click(prior: RegionPrior, evidence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One positive click at the argmax of the prior's soft map, times ``evidence`` ((H, W) in [0, 1]) if given."""
    score = prior.soft_map()
    if evidence is not None:
        score = score * (np.asarray(evidence, np.float32) + 1e-3)  # evidence decides; the prior breaks ties
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return {"points": np.array([[x, y]], np.float32), "labels": np.array([1], np.int64)}


def prior_segmenter_mask(prior: RegionPrior, class_map: np.ndarray, class_id: int, grow: float = 0.5) -> np.ndarray:
    """The segmenter's pixels of ``class_id`` inside the prior's box grown by ``grow`` of its size on each side."""
    x1, y1, x2, y2 = prior.box
    dx, dy = grow * (x2 - x1), grow * (y2 - y1)
    keep = np.zeros(class_map.shape, bool)
    keep[max(0, int(y1 - dy)) : int(np.ceil(y2 + dy)), max(0, int(x1 - dx)) : int(np.ceil(x2 + dx))] = True
    return keep & (class_map == class_id)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@torch.no_grad()
def evaluate_words(
    sam: Any,
    images: np.ndarray,
    items: list[tuple[int, str, np.ndarray]],
    *,
    probs: np.ndarray | None = None,
    class_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Mean mask IoU per prompt over ``items`` (from ``kind_regions``): tight box, centre click, and the sentence of
    the true region as box / click / click + segmenter evidence / segmenter in the prior (``probs``: the
    segmenter's (N, K, H, W) probabilities), the segmenter's pixels of the kind anywhere (the kind word without the
    place words), plus the filled boxes as baselines. Also per kind."""
    features = sam.backbone_features(images)
    size = images.shape[1]
    rows: list[dict[str, Any]] = []
    for index, kind, region in items:
        feats = features[index : index + 1]
        prior = parse_description(describe_mask(region, kind), size)
        row = {"kind": kind}
        box = box_of(region)
        row["box (tight)"] = _iou(predict_mask(sam, feats, {"boxes": box}), region)
        click = {"points": centre_click(region)[None], "labels": np.array([1])}
        row["1 click (centre)"] = _iou(predict_mask(sam, feats, click), region)
        row["words -> box"] = _iou(predict_mask(sam, feats, prior_box_prompt(prior)), region)
        row["words -> click"] = _iou(predict_mask(sam, feats, prior_click(prior)), region)
        filled = np.zeros_like(region)
        filled[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
        row["box filled (baseline)"] = _iou(filled, region)
        words_filled = np.zeros_like(region)
        x1, y1, x2, y2 = (round(v) for v in prior.box)
        words_filled[y1:y2, x1:x2] = True
        row["words box filled (baseline)"] = _iou(words_filled, region)
        if probs is not None:
            class_id = class_names.index(kind)
            evidence = probs[index, class_id]
            row["words + segmenter -> click"] = _iou(predict_mask(sam, feats, prior_click(prior, evidence)), region)
            class_map = probs[index].argmax(0)
            row["words + segmenter mask"] = _iou(prior_segmenter_mask(prior, class_map, class_id), region)
            row["kind word + segmenter mask (no place)"] = _iou(class_map == class_id, region)  # what place adds
        rows.append(row)
    methods = [k for k in rows[0] if k != "kind"] if rows else []
    summary: dict[str, Any] = {m: float(np.mean([r[m] for r in rows])) for m in methods}
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: class_names.index(k) if k in class_names else 0)
    summary["per_kind"] = {
        k: {"regions": sum(r["kind"] == k for r in rows)} | {m: float(np.mean([r[m] for r in rows if r["kind"] == k]))
                                                               for m in methods}
        for k in kinds
    }  # fmt: skip
    summary["regions"] = len(rows)
    return summary


def describe_prediction(class_map: np.ndarray, class_names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The sentence for the largest predicted defect class of an (H, W) class map, and its kind; (None, None) if the
    map holds no defect pixel."""
    counts = np.bincount(class_map.ravel(), minlength=len(class_names))
    counts[0] = 0
    if counts.sum() == 0:
        return None, None
    kind = class_names[int(counts.argmax())]
    return describe_mask(class_map == class_names.index(kind), kind), kind


def description_accuracy(
    truths: list[tuple[np.ndarray, str]], class_maps: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """Share of single-defect images whose predicted-mask sentence names the true kind / grid cell / shape / extent
    (the truth's words come from the true mask); images with no predicted defect count as wrong."""
    hits = {"kind": 0, "cell": 0, "shape": 0, "extent": 0, "size": 0}
    for (region, kind), class_map in zip(truths, class_maps, strict=True):
        sentence, _ = describe_prediction(class_map, class_names)
        if sentence is None:
            continue
        truth = region_words(region, kind)
        read = parse_description(sentence, class_map.shape[::-1]).words
        for name in hits:
            hits[name] += int(read.get(name) == getattr(truth, name))
    return {name: count / max(1, len(truths)) for name, count in hits.items()} | {"images": len(truths)}
