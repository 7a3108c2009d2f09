"""Sentences as prompts (``segment/words.py``): the prior's prompts land where the words say, and the evaluation
scores the filled tight box exactly as a hand computation does."""

from __future__ import annotations

import numpy as np

from potpourri.data.describe import parse_description
from potpourri.segment.words import (
    description_accuracy,
    evaluate_words,
    kind_regions,
    prior_box_prompt,
    prior_click,
    prior_segmenter_mask,
)


def test_prompts_from_a_prior_follow_the_words_and_the_evidence() -> None:
    sentence = "a small round hole in the lower left of the image, about a fifth of the image across"
    prior = parse_description(sentence, 90)
    box = prior_box_prompt(prior)["boxes"]
    assert box[0] < 15 < box[2] and box[1] < 75 < box[3]  # the lower left cell's centre is (15, 75)
    click = prior_click(prior)
    assert click["labels"].tolist() == [1] and np.abs(click["points"][0] - [15, 75]).max() <= 1
    evidence = np.zeros((90, 90), np.float32)
    evidence[70, 22] = 1.0  # inside the prior: the evidence moves the click there
    evidence[10, 80] = 1.0  # far outside it: ignored, the prior is ~0 there
    assert prior_click(prior, evidence)["points"][0].tolist() == [22.0, 70.0]
    class_map = np.zeros((90, 90), np.int64)
    class_map[70:73, 20:23] = 4
    class_map[5:8, 80:83] = 4  # same class far away
    kept = prior_segmenter_mask(prior, class_map, 4)
    assert kept.sum() == 9 and kept[70:73, 20:23].all()


def test_kind_regions_and_description_accuracy_on_true_masks() -> None:
    names = ("good", "scratch", "hole")
    masks = np.zeros((2, 60, 60), np.int64)
    masks[0, 10:12, 5:40] = 1
    masks[1, 40:50, 40:50] = 2
    masks[1, 0:2, 0:2] = 1  # 4 px: below min_pixels
    items = kind_regions(masks, names)
    assert [(i, k, int(r.sum())) for i, k, r in items] == [(0, "scratch", 70), (1, "hole", 100)]
    truths = [(masks[0] == 1, "scratch"), (masks[1] == 2, "hole")]
    assert description_accuracy(truths, masks, names)["cell"] == 1.0  # the 4 px scratch is not the largest class
    moved = masks.copy()
    moved[1] = np.roll(masks[1], (-35, -35), axis=(0, 1))  # the hole predicted in the upper left: cell wrong
    assert description_accuracy(truths, moved, names)["cell"] == 0.5
    exact = description_accuracy(truths, np.stack([masks[0], np.where(masks[1] == 2, 2, 0)]), names)
    assert all(exact[f] == 1.0 for f in ("kind", "cell", "shape", "size", "extent"))
    empty = description_accuracy(truths, np.zeros_like(masks), names)
    assert empty["kind"] == 0.0  # no predicted defect counts as wrong


def test_evaluate_words_scores_the_filled_box_by_hand() -> None:
    from potpourri.models.sam import Sam, SamConfig

    sam = Sam(SamConfig(backbone="none", image_size=64, prompt_dim=16, mlp_dim=32, iou_hidden=16), backbone=None)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    masks = np.zeros((2, 64, 64), np.int64)
    masks[0, 9:12, 0:21] = 1  # centred in the upper left cell, as is the hole in the centre
    yy, xx = np.mgrid[0:64, 0:64]
    masks[1][(xx - 32) ** 2 + (yy - 32) ** 2 <= 36] = 2
    names = ("good", "scratch", "hole")
    items = kind_regions(masks, names)
    predicted = masks.copy()
    predicted[1, 58:62, 2:6] = 2  # a perfect segmenter but for a false 16-px hole in a far corner of image 1
    probs = np.stack([(predicted == k) for k in range(3)], 1).astype(np.float32)
    result = evaluate_words(sam.eval(), images, items, probs=probs, class_names=names)
    assert result["regions"] == 2 and result["box filled (baseline)"] == 1.0 * 0.5 + (113 / 169) * 0.5
    assert result["words + segmenter mask"] == 1.0  # regions at their cells' centres: the prior keeps them whole
    assert result["kind word + segmenter mask (no place)"] == (1.0 + 113 / (113 + 16)) / 2  # the false hole counts
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if isinstance(v, float))
