"""SimDETR-style pretraining pieces: proposals find a planted region, purity and recall on hand cases, the
self-training label update keeps only confident boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.detect.simdetr import (
    ProposalConfig,
    chance_purity,
    confident_labels,
    outlier_scores,
    proposal_recall,
    propose_boxes,
    purity,
    region_descriptors,
)

pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _planted_map(seed: int = 0, rows: int = 5, cols: int = 4) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """A (8, 16, 16) feature map: a two-tone striped 'texture' plus a distinct ``rows`` x ``cols`` block."""
    generator = torch.Generator().manual_seed(seed)
    tone_a, tone_b, planted = torch.eye(8)[0], torch.eye(8)[1], torch.eye(8)[5]
    fmap = torch.empty(8, 16, 16)
    for col in range(16):
        fmap[:, :, col] = (tone_a if (col // 2) % 2 else tone_b)[:, None]
    fmap[:, 4 : 4 + rows, 9 : 9 + cols] = planted[:, None, None]
    fmap += 0.05 * torch.randn(fmap.shape, generator=generator)
    return fmap, (9, 4, 9 + cols, 4 + rows)  # cell box (x1, y1, x2, y2)


def test_proposals_recover_a_planted_region_box():
    fmap, (x1, y1, x2, y2) = _planted_map()
    proposals = propose_boxes(fmap, (64, 64), ProposalConfig(max_proposals=5))
    expected = np.array([x1, y1, x2, y2], np.float32) * 4  # 16-cell map of a 64-px image: 4 px per cell
    np.testing.assert_allclose(proposals.boxes[0], expected)
    assert proposals.scores[0] == proposals.scores.max()


def test_outlier_scores_are_highest_on_the_planted_cells():
    # a block that fits in the (2·2+1)² window: none of its cells has a similar cell outside its own window
    fmap, (x1, y1, x2, y2) = _planted_map(seed=1, rows=3, cols=3)
    scores = outlier_scores(fmap).reshape(16, 16)
    inside = np.zeros((16, 16), bool)
    inside[y1:y2, x1:x2] = True
    assert scores[inside].min() > scores[~inside].max()


def test_purity_matches_the_formula_on_a_hand_case():
    clusters = [0, 0, 0, 1, 1, 2]
    truth = [3, 3, 1, 1, 1, 2]  # cluster 0: two 3s; cluster 1: two 1s; cluster 2: one 2
    assert purity(clusters, truth) == pytest.approx(5 / 6)
    assert purity([0] * 6, truth) == pytest.approx(3 / 6)  # one cluster: the majority class share
    assert chance_purity([0] * 6, truth) == pytest.approx(3 / 6)  # shuffling cannot change a single cluster
    with pytest.raises(PotpourriError):
        purity([0, 1], [0])


def test_proposal_recall_counts_ground_truth_boxes_hit_at_iou_half():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([[0, 0, 4, 4]], np.float32)]
    proposals = [np.array([[50, 50, 60, 60], [0, 0, 10, 8]], np.float32), np.array([[0, 0, 4, 8]], np.float32)]
    # image 0: box 1 hit by the 2nd proposal (IoU 0.8), box 2 missed; image 1: IoU exactly 0.5 counts
    assert proposal_recall(proposals, truth) == pytest.approx(2 / 3)
    assert proposal_recall(proposals, truth, top=1) == pytest.approx(1 / 3)


def test_region_descriptors_read_the_planted_block():
    fmap, (x1, y1, x2, y2) = _planted_map(seed=2)
    box = np.array([[x1, y1, x2, y2]], np.float32) * 4
    raw = region_descriptors(fmap, box, (64, 64), subtract_image_mean=False)
    np.testing.assert_allclose(raw[0], fmap[:, y1:y2, x1:x2].mean((1, 2)).numpy(), atol=0.03)
    centred = region_descriptors(fmap, box, (64, 64))
    np.testing.assert_allclose(centred[0], raw[0] - fmap.mean((1, 2)).numpy(), atol=1e-5)


def test_self_training_label_update_keeps_only_confident_boxes():
    detections = [
        {"boxes": np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]]), "scores": np.array([0.9, 0.2, 0.5]),
         "labels": np.array([3, 1, 0])},
        {"boxes": np.array([[0, 0, 2, 2]]), "scores": np.array([0.1]), "labels": np.array([2])},
    ]  # fmt: skip
    fallback = [(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)), (np.array([[7, 7, 9, 9]], np.float32),
                np.array([4]))]  # fmt: skip
    updated = confident_labels(detections, conf=0.5, fallback=fallback)
    np.testing.assert_array_equal(updated[0][0], [[0, 0, 5, 5], [2, 2, 4, 4]])
    np.testing.assert_array_equal(updated[0][1], [3, 0])
    np.testing.assert_array_equal(updated[1][0], [[7, 7, 9, 9]])  # nothing confident: the previous labels stay
    without = confident_labels(detections, conf=0.5)
    assert without[1][0].shape == (0, 4) and without[1][1].shape == (0,)
