"""Inspection metrics: image/pixel AUROC, AUPRO (FPR ≤ 0.3), F1-max and per-class IoU / mIoU.

Every curve comes from one exact sweep over the distinct score values (ties share a threshold). A metric that is
undefined on the given data (e.g. AUROC without any defect) returns NaN and emits a ``MetricUndefinedWarning``
whose text says why; ``evaluate`` collects those texts into ``notes`` instead of crashing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from potpourri.core.errors import PotpourriError

__all__ = [
    "MetricUndefinedWarning",
    "aupro",
    "evaluate",
    "f1_max",
    "frechet_distance",
    "image_auroc",
    "iou_per_class",
    "mean_iou",
    "pixel_auroc",
    "roc_curve",
    "two_std_apart",
]


class MetricUndefinedWarning(UserWarning):
    """A metric cannot be computed on this data (its value is NaN); the message says why."""


def _undefined(reason: str) -> float:
    warnings.warn(reason, MetricUndefinedWarning, stacklevel=3)
    return float("nan")


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    # np.trapezoid is numpy>=2 only
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _as_binary(labels: np.ndarray | Sequence, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    values = np.unique(labels)
    if not np.isin(values, (0, 1)).all():
        raise PotpourriError(f"{name} must be 0/1 (normal/defect); found values {values[:5].tolist()}")
    return labels.astype(bool)


def roc_curve(
    scores: np.ndarray, positive_weight: np.ndarray, negative_weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted ROC: cumulative positive and negative weight above each distinct threshold, highest first.

    Returns (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf; weights are normalised to sum 1.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(positive_weight[order], dtype=np.float64)
    fp = np.cumsum(negative_weight[order], dtype=np.float64)
    # the last index of each run of equal scores: a threshold admits all tied pixels at once
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tpr = np.r_[0.0, tp[last] / tp[-1]]
    fpr = np.r_[0.0, fp[last] / fp[-1]]
    return fpr, tpr, np.r_[np.inf, sorted_scores[last]]


def _auroc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
    labels = _as_binary(labels, f"{what} labels")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = labels.ravel()
    if labels.shape != scores.shape:
        raise PotpourriError(f"{what}: {labels.size} labels but {scores.size} scores")
    if labels.all() or not labels.any():
        kind = "defect" if not labels.any() else "normal"
        return _undefined(f"{what} AUROC is undefined: the test set has no {kind} {what}s")
    fpr, tpr, _ = roc_curve(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    return float(_trapezoid(tpr, fpr))


def image_auroc(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC of image scores (1 = defect); NaN with a note when only one class is present."""
    return _auroc(np.asarray(labels), np.asarray(scores), "image")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC over all pixels of (N, H, W) ground-truth masks and anomaly maps."""
    return _auroc(np.asarray(masks), np.asarray(maps), "pixel")


def aupro(masks: np.ndarray, maps: np.ndarray, *, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 is perfect).

    Regions are 8-connected components of each ground-truth mask; PRO at a threshold is the mean over all regions
    of the fraction of the region above it, FPR the fraction of all normal pixels above it. Example:
        aupro(masks, maps)  # masks (N, H, W) in {0, 1}, maps (N, H, W) float
    """
    masks = _as_binary(masks, "masks")
    maps = np.asarray(maps, dtype=np.float64)
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.shape != maps.shape:
        raise PotpourriError(f"AUPRO: masks {masks.shape} and maps {maps.shape} differ in shape")
    if not 0 < fpr_limit <= 1:
        raise PotpourriError(f"AUPRO fpr_limit={fpr_limit} must be in (0, 1]")
    # PRO is a weighted TPR: each defect pixel weighs 1 / (its region's size * number of regions)
    positive_weight = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for index, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(regions.ravel())
            positive_weight[index][mask] = 1.0 / sizes[regions[mask]]
            n_regions += count
    if n_regions == 0:
        return _undefined("AUPRO is undefined: the test set has no defect regions")
    if masks.all():
        return _undefined("AUPRO is undefined: the test set has no normal pixels")
    fpr, pro, _ = roc_curve(maps.ravel(), positive_weight.ravel() / n_regions, (~masks).ravel().astype(np.float64))
    # cut the curve at fpr_limit, interpolating PRO there (the curve is a step where FPR repeats)
    keep = fpr <= fpr_limit
    end = np.searchsorted(fpr, fpr_limit, side="right")
    fpr_cut, pro_cut = fpr[keep], pro[keep]
    if end < fpr.size and fpr_cut[-1] < fpr_limit:
        step = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro[end - 1] + step * (pro[end] - pro[end - 1])]
    return float(_trapezoid(pro_cut, fpr_cut) / fpr_limit)


def f1_max(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` and that threshold (the lowest score among the predicted positives).

    Returns (nan, nan) with a note when there is no defect to find.
    """
    labels = _as_binary(labels, "labels").ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not labels.any():
        return _undefined("F1-max is undefined: the validation set has no defects"), float("nan")
    _, tpr, thresholds = roc_curve(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    positives = labels.sum()
    tp = tpr[1:] * positives
    # predicted positives at each threshold: the number of scores >= threshold
    n_predicted = np.searchsorted(np.sort(-scores), -thresholds[1:], side="right")
    f1 = 2 * tp / (n_predicted + positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[1:][best])


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """IoU of every class id 0..num_classes-1 over all pixels; NaN for a class absent from both."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise PotpourriError(f"IoU: predicted masks {pred.shape} and targets {target.shape} differ in shape")
    for name, array in (("predicted", pred), ("target", target)):
        unknown = np.setdiff1d(np.unique(array), np.arange(num_classes))
        if unknown.size:
            raise PotpourriError(
                f"{name} mask has unknown class ids {unknown[:5].tolist()}; expected 0..{num_classes - 1} "
                "(pass the right num_classes or fix the mask encoding)"
            )
    pairs = np.bincount(target.ravel().astype(np.int64) * num_classes + pred.ravel(), minlength=num_classes**2)
    confusion = pairs.reshape(num_classes, num_classes)  # rows: target, columns: predicted
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int, *, include_background: bool = True) -> float:
    """Mean of the defined per-class IoUs (class 0 is background; leave it out with include_background=False)."""
    ious = iou_per_class(pred, target, num_classes)
    if not include_background:
        ious = ious[1:]
    if np.isnan(ious).all():
        return _undefined("mIoU is undefined: no class occurs in predictions or targets")
    return float(np.nanmean(ious))


@dataclass(frozen=True)
class Evaluation:
    """Threshold-free scores of one test set, with a note for each metric that could not be computed."""

    image_auroc: float
    pixel_auroc: float
    aupro: float
    image_f1_max: float
    image_f1_threshold: float
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, float | list[str]]:
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "aupro": self.aupro,
            "image_f1_max": self.image_f1_max,
            "image_f1_threshold": self.image_f1_threshold,
            "notes": list(self.notes),
        }


def evaluate(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None) -> Evaluation:
    """All detection metrics at once; undefined ones are NaN and explained in ``notes`` (never an exception)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricUndefinedWarning)
        image = image_auroc(labels, scores)
        f1, threshold = f1_max(labels, scores)
        if masks is not None and maps is not None:
            pixel, pro = pixel_auroc(masks, maps), aupro(masks, maps)
        else:
            pixel = pro = float("nan")
            warnings.warn("pixel metrics skipped: no ground-truth masks", MetricUndefinedWarning, stacklevel=1)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, MetricUndefinedWarning)))
    return Evaluation(image, pixel, pro, f1, threshold, notes)


def two_std_apart(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """Our rule for calling two seeded results different: means more than 2 (larger) standard deviations apart."""
    return abs(mean_a - mean_b) > 2 * max(std_a, std_b)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D) (FID's formula:
    |μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½)); with Lite0 features, a small-scale FID."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise PotpourriError(f"two (N, D) feature sets with N >= 2 and the same D; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if caught or not np.isfinite(root).all():  # a singular product: regularise as FID implementations do
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))
