"""Inspection metrics against scikit-learn, a brute-force sweep, and hand-computed cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, jaccard_score, precision_recall_curve, roc_auc_score

from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import (
    MetricUndefinedWarning,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    iou_per_class,
    mean_iou,
    pixel_auroc,
)

pytestmark = pytest.mark.one_thread  # moved out of a one-thread folder: keep its thread count (tests/conftest.py)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding creates many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[2, 10:14, 10:12] = 1
    maps = rng.random(masks.shape) + 0.8 * masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_auroc_without_defects_is_nan_with_note() -> None:
    with pytest.warns(MetricUndefinedWarning, match="no defect image"):
        assert np.isnan(image_auroc([0, 0, 0], [0.1, 0.5, 0.2]))


def test_aupro_hand_computed() -> None:
    # one row: region A = pixels 0-1 (size 2), region B = pixel 4 (size 1), normal pixels 2, 3, 5.
    # sweep: 0.9 -> (fpr 0, pro 1/4); 0.8 -> (1/3, 1/4); 0.7 -> (1/3, 3/4); 0.2 -> (1/3, 1); then fpr 2/3, 1.
    mask = np.array([[1, 1, 0, 0, 1, 0]])
    scores = np.array([[0.9, 0.2, 0.8, 0.1, 0.7, 0.05]])
    assert aupro(mask, scores, fpr_limit=0.3) == pytest.approx(0.25)  # PRO is 1/4 on all of [0, 0.3]
    assert aupro(mask, scores, fpr_limit=0.5) == pytest.approx((1 / 3 * 0.25 + (0.5 - 1 / 3) * 1.0) / 0.5)
    assert aupro(mask, scores, fpr_limit=1.0) == pytest.approx(1 / 3 * 0.25 + 2 / 3 * 1.0)


def test_aupro_regions_are_8_connected() -> None:
    # a diagonal pair (ONE 8-connected region of 2) + an isolated pixel; only the isolated one scores 1.
    # curve: (fpr 0, PRO 1/2) then (1, 1); PRO at fpr 0.3 is 0.65, so AUPRO = (0.5 + 0.65) / 2.
    # With 4-connectivity there would be 3 regions and PRO would start at 1/3 instead.
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = 1
    mask[4, 4] = 1
    scores = np.zeros((5, 5))
    scores[4, 4] = 1.0
    assert aupro(mask, scores, fpr_limit=0.3) == pytest.approx((0.5 + 0.65) / 2)


def _aupro_brute_force(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Independent slow reference: threshold by threshold, label regions, average overlaps, integrate."""
    regions = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        overlaps = []
        for labelled, p in zip(regions, pred, strict=True):
            overlaps += [p[labelled == r].mean() for r in range(1, labelled.max() + 1)]
        points.append(((pred & normal).sum() / normal.sum(), float(np.mean(overlaps))))
    fpr, pro = map(np.array, zip(*points, strict=True))
    grid_x = np.r_[fpr[fpr <= fpr_limit], fpr_limit]
    # PRO at fpr_limit, interpolated on the segment that crosses it
    i = np.searchsorted(fpr, fpr_limit, side="right")
    at_limit = pro[i - 1] + (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1]) * (pro[i] - pro[i - 1])
    grid_y = np.r_[pro[fpr <= fpr_limit], at_limit]
    return float(np.sum(np.diff(grid_x) * (grid_y[1:] + grid_y[:-1]) / 2) / fpr_limit)


def test_aupro_matches_brute_force_on_random_maps() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 12, 12), dtype=np.uint8)
    masks[0, 1:4, 1:6] = 1
    masks[0, 8:11, 8:9] = 1
    masks[1, 5:9, 2:5] = 1
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)
    assert aupro(masks, maps) == pytest.approx(_aupro_brute_force(masks, maps, 0.3), abs=1e-9)


def test_aupro_perfect_map_is_one_and_no_regions_is_nan() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[1, 2:5, 2:5] = 1
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    with pytest.warns(MetricUndefinedWarning):
        assert np.isnan(aupro(np.zeros((2, 8, 8)), np.ones((2, 8, 8))))


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_sklearn_pr_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(labels, 1.0), 1)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(expected, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)  # the threshold realises it


def test_f1_max_without_defects_is_nan() -> None:
    with pytest.warns(MetricUndefinedWarning):
        f1, threshold = f1_max([0, 0], [0.2, 0.3])
    assert np.isnan(f1) and np.isnan(threshold)


def test_iou_matches_sklearn_and_hand_case() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (2, 10, 10))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    expected = jaccard_score(target.ravel(), pred.ravel(), average=None, labels=range(4))
    np.testing.assert_allclose(iou_per_class(pred, target, 4), expected)
    # hand case: class 1 intersect 1 / union 3; class 2 never occurs -> NaN; class 0: 2 / 4
    target = np.array([0, 0, 1, 1, 0])
    pred = np.array([0, 1, 1, 0, 0])
    ious = iou_per_class(pred, target, 3)
    np.testing.assert_allclose(ious[:2], [2 / 4, 1 / 3])
    assert np.isnan(ious[2])
    assert mean_iou(pred, target, 3) == pytest.approx((0.5 + 1 / 3) / 2)
    assert mean_iou(pred, target, 3, include_background=False) == pytest.approx(1 / 3)


def test_iou_unknown_class_id_is_a_clear_error() -> None:
    with pytest.raises(PotpourriError, match=r"unknown class ids \[7\]"):
        iou_per_class(np.array([0, 7]), np.array([0, 1]), 3)


def test_evaluate_collects_notes_instead_of_crashing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape evaluate
        result = evaluate(np.zeros(4), np.arange(4.0), np.zeros((4, 4, 4)), np.random.rand(4, 4, 4))
    assert np.isnan(result.image_auroc) and np.isnan(result.aupro) and np.isnan(result.pixel_auroc)
    assert any("no defect image" in note for note in result.notes)


def test_frechet_distance_matches_the_closed_form() -> None:
    from potpourri.core.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (4000, 1)), rng.normal(-0.5, 0.5, (3000, 1))
    sa, sb = a.std(ddof=1), b.std(ddof=1)  # 1-D: (μa − μb)² + (σa − σb)²
    assert frechet_distance(a, b) == pytest.approx((a.mean() - b.mean()) ** 2 + (sa - sb) ** 2, rel=1e-9)
    x = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 3))  # correlated features
    y = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 3)) + [1.0, 0.0, -1.0]
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(ca)  # tr((Ca Cb)^½) = Σ √eig(Ca^½ Cb Ca^½): symmetric, by eigh alone
    half = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cb @ half), 0, None)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(PotpourriError, match="same D"):
        frechet_distance(x, y[:, :2])
