"""Mask head on a frozen detector: only the head trains, RoI geometry, losses by hand, mask AP on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from potpourri.core.registry import create_model
from potpourri.data.boxes import boxes_from_mask
from potpourri.detect.mask_head import (
    InstanceSample,
    MaskHead,
    MaskHeadConfig,
    dice_loss,
    frozen_outputs,
    instance_masks_from_mask,
    mask_coco_map,
    mask_losses,
    mask_targets,
    paste_masks,
    predict_instances,
    train_mask_head,
    winning_anchors,
)

SIZE = 64


def _tiny_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("yolo_rep_n", num_classes=2).eval()


def _planted(n: int, seed: int = 0) -> list[InstanceSample]:
    """Noise images with one or two bright rectangles, each its own instance (class 0 or 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        masks, boxes, labels = [], [], []
        for k in range(1 + i % 2):
            h, w = (int(v) for v in rng.integers(8, 20, 2))
            y, x = int(rng.integers(32 * k, 32 * k + 32 - h)), int(rng.integers(0, SIZE - w))
            m = np.zeros((SIZE, SIZE), bool)
            m[y : y + h, x : x + w] = True
            m[y : y + h // 2, x : x + w // 2] = False  # an L shape: the mask is not its box
            image[m] = (240, 200, 40)
            masks.append(m), boxes.append((x, y, x + w, y + h)), labels.append(k)
        out.append(InstanceSample(image, np.stack(masks), np.asarray(boxes, np.float32), np.asarray(labels)))
    return out


def test_only_mask_head_trains_detector_bit_identical() -> None:
    detector = _tiny_detector().train()  # train mode on purpose: freezing must switch BN to eval
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    head = MaskHead.for_detector(detector, dim=16, roi_size=14)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    head, history = train_mask_head(detector, _planted(4), MaskHeadConfig(max_steps=2, batch_size=2, progress=False),
                                    head=head)  # fmt: skip
    after = detector.state_dict()
    assert history["steps"] == 2
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats / counters
    assert not any(p.requires_grad for p in detector.parameters())
    assert any(not torch.equal(head_before[k], v) for k, v in head.state_dict().items())
    assert history["trainable_params"] == sum(p.numel() for p in head.parameters())


def test_frozen_outputs_match_detector_forward() -> None:
    detector = _tiny_detector()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = frozen_outputs(detector, x)
    assert torch.allclose(out.raw, detector(x), atol=1e-6)
    assert out.fine.shape[-1] == SIZE // 4 and out.p3.shape[-1] == SIZE // 8
    assert sum(e.shape[1] for e in out.embeds) == detector.num_anchors((SIZE, SIZE))


def test_winning_anchor_is_the_best_overlap() -> None:
    pred = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [22, 22, 40, 40]])
    assert winning_anchors(pred, torch.tensor([[21.0, 21, 40, 40], [0, 0, 9, 9]])).tolist() == [1, 0]


def test_pasted_mask_lands_in_the_box() -> None:
    box = torch.tensor([[10.0, 20.0, 66.0, 76.0]])  # 56 px = 2 px per texel at S = 28
    probs = torch.zeros(1, 28, 28)
    probs[0, :, :14] = 1.0  # left half of the box
    pasted = paste_masks(probs, box, (96, 96))[0] > 0.5
    expected = torch.zeros(96, 96, dtype=torch.bool)
    expected[20:76, 10:38] = True
    assert torch.equal(pasted, expected)


def test_roi_targets_then_paste_recover_the_instance() -> None:
    sample = _planted(1, seed=3)[0]
    masks = torch.from_numpy(sample.masks)
    boxes = torch.from_numpy(sample.boxes)
    targets = mask_targets(masks, boxes, 28)
    back = paste_masks(targets, boxes, (SIZE, SIZE)) > 0.5
    inter = (back & masks).sum().item()
    union = (back | masks).sum().item()
    assert inter / union > 0.9
    # a box twice as wide, extending right: the instance lies in the left half of the target
    wide = boxes.clone()
    wide[:, 2] = wide[:, 0] + 2 * (wide[:, 2] - wide[:, 0])
    t = mask_targets(masks, wide, 28)
    assert t[:, :, 14:].sum() == 0 and t[:, :, :14].sum() > 0


def test_losses_against_hand_computation() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sig = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0, 3.0])))
    t = np.array([1.0, 0.0, 0.0, 1.0])
    bce = -np.mean(t * np.log(sig) + (1 - t) * np.log(1 - sig))
    dice = 1 - (2 * (sig * t).sum() + 1) / (sig.sum() + t.sum() + 1)
    out = mask_losses(logits, targets)
    assert out["bce"].item() == pytest.approx(bce, rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert out["total"].item() == pytest.approx(bce + dice, rel=1e-5)
    assert dice_loss(torch.full((1, 4, 4), 30.0).sigmoid(), torch.ones(1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_decreases_on_planted_example() -> None:
    detector = _tiny_detector()
    cfg = MaskHeadConfig(dim=16, roi_size=14, max_steps=40, batch_size=4, lr=5e-3, progress=False)
    head, history = train_mask_head(detector, _planted(8), cfg)
    first, last = np.mean(history["losses"][:5]), np.mean(history["losses"][-5:])
    assert last < 0.7 * first, (first, last)
    found = predict_instances(detector, head, [s.image for s in _planted(2, seed=9)], conf=0.0, max_det=3)
    assert all(f["masks"].shape[1:] == (SIZE, SIZE) and len(f["masks"]) == len(f["scores"]) for f in found)


def test_instances_are_the_regions_boxes_are_made_of() -> None:
    from potpourri.data.synth import make_samples

    for s in make_samples("brick", "test", 7, seed=1, size=128):
        masks, boxes, labels = instance_masks_from_mask(s.mask)
        ref_boxes, ref_labels = boxes_from_mask(s.mask)
        assert np.array_equal(boxes, ref_boxes) and np.array_equal(labels, ref_labels)
        for m, box, label in zip(masks, boxes.astype(int), labels, strict=True):
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
            assert np.all(s.mask[m] == label + 1)


def _square(y: int, x: int, side: int = 10) -> np.ndarray:
    m = np.zeros((40, 40), bool)
    m[y : y + side, x : x + side] = True
    return m


def test_mask_ap_on_hand_made_cases() -> None:
    gt = _square(5, 5)
    target = [InstanceSample(np.zeros((40, 40, 3), np.uint8), gt[None], np.array([[5, 5, 15, 15]], np.float32),
                             np.array([0]))]  # fmt: skip

    def pred(masks, scores):
        return [{"masks": np.stack(masks), "scores": np.array(scores), "labels": np.zeros(len(scores), int)}]

    perfect = mask_coco_map(pred([gt], [0.9]), target, 1)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    shifted = gt.copy()
    shifted[5:15, 15:21] = True  # 160 px predicted, 100 overlap: IoU 0.625, passes thresholds 0.5, 0.55, 0.6
    partial = mask_coco_map(pred([shifted], [0.9]), target, 1)
    assert partial["map50"] == pytest.approx(1.0) and partial["map"] == pytest.approx(0.3)
    ranked = mask_coco_map(pred([_square(25, 25), gt], [0.9, 0.5]), target, 1)  # a confident false positive first
    assert ranked["map50"] == pytest.approx(0.5) and not math.isnan(ranked["map"])


def test_mask_train_cli_saves_a_head_that_loads(tmp_path) -> None:
    from potpourri.cli import main
    from potpourri.detect.mask_head import load_mask_head
    from potpourri.detect.train import save_detector

    detector = create_model("yolo_rep_n", num_classes=6)
    names = ["scratch", "crack", "stain", "hole", "contamination", "dent"]
    save_detector(tmp_path / "det", detector, {"model": "yolo_rep_n", "class_names": names, "image_size": SIZE})
    code = main(["detect", "mask-train", str(tmp_path / "det"), "--data", "ds-synth:brick", "--steps", "2",
                 "--per-kind", "1", "--out", str(tmp_path / "mask"), "--threads", "1"])  # fmt: skip
    assert code == 0
    head, meta = load_mask_head(tmp_path / "mask")
    assert meta["detector_run"] == str(tmp_path / "det") and head.roi_size == 28
    summary = json.loads((tmp_path / "mask" / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["map"] <= 1.0
