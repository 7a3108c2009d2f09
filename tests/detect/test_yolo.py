"""YOLOv6-style detector: assigner and losses on hand-made cases, COCO mAP on a hand-computed case, training on a
planted example, re-parameterisation and ONNX parity, checkpoint resume, and the CLI end to end."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from potpourri import create_model
from potpourri.core.boxes import box_iou_elementwise
from potpourri.core.errors import PotpourriError
from potpourri.data.boxes import DetectionSample, boxes_from_mask
from potpourri.detect.train import (
    ATSSAssigner,
    DetectTrainConfig,
    TaskAlignedAssigner,
    augment,
    coco_map,
    distribution_focal_loss,
    load_detector,
    make_assigner,
    save_detector,
    train_detector,
    varifocal_loss,
)
from potpourri.models.yolo import (
    EfficientRep,
    YoloDetector,
    decode,
    make_anchors,
    postprocess,
)


def _tiny(num_classes: int = 2, seed: int = 0) -> YoloDetector:
    torch.manual_seed(seed)
    return YoloDetector(EfficientRep((8, 8, 16, 16, 32), (1, 1, 1, 1)), num_classes=num_classes,
                        neck_widths=(16, 16, 32), reg_max=8)  # fmt: skip


def _planted(n: int, size: int = 64, seed: int = 0) -> list[DetectionSample]:
    """Dark images with one or two bright rectangles; red = class 0, blue = class 1."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        image = np.full((size, size, 3), 40, np.uint8)
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            w, h = rng.integers(10, 24, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            cls = int(rng.integers(0, 2))
            image[y : y + h, x : x + w] = (220, 40, 40) if cls == 0 else (40, 40, 220)
            boxes.append((x, y, x + w, y + h))
            labels.append(cls)
        samples.append(DetectionSample(image, boxes, labels))
    return samples


def _randomise(model: YoloDetector, seed: int = 0) -> None:
    """Non-trivial BN statistics and prediction weights (the head's output convs start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for conv in [*model.head.reg_preds, *model.head.cls_preds]:
        conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))


# ----------------------------------------------------------------------------------------------- assigner
def _assign(anchors, pd_boxes, gt_boxes, gt_labels, *, topk, beta=1.0, scores=0.5, mask=None, classes=2):
    anchors = torch.tensor(anchors, dtype=torch.float32)
    pd_scores = torch.full((1, len(anchors), classes), scores)
    gt_boxes = torch.tensor([gt_boxes], dtype=torch.float32)
    mask = torch.ones(gt_boxes.shape[:2], dtype=torch.bool) if mask is None else torch.tensor([mask])
    assigner = TaskAlignedAssigner(classes, topk=topk, alpha=1.0, beta=beta)
    return assigner(pd_scores, torch.tensor([pd_boxes], dtype=torch.float32), anchors, torch.tensor([gt_labels]),
                    gt_boxes, mask)  # fmt: skip


def test_assigner_picks_topk_aligned_candidates_inside_the_box() -> None:
    # gt (0, 0, 30, 10) holds anchor centres x = 5, 15, 25 but not 35; predicted IoUs 1, 1/2, 1/3 and 1 (outside)
    anchors = [(5, 5), (15, 5), (25, 5), (35, 5)]
    preds = [(0, 0, 30, 10), (0, 0, 15, 10), (20, 0, 30, 10), (0, 0, 30, 10)]
    result = _assign(anchors, preds, [(0, 0, 30, 10)], [1], topk=2)
    assert result.fg[0].tolist() == [True, True, False, False]  # anchor 3 overlaps fully but its centre is outside
    assert result.labels[0, :2].tolist() == [1, 1]
    # alignment 0.5·IoU = 0.5, 0.25; rescaled so the best equals the best IoU (1): 1.0, 0.5
    torch.testing.assert_close(result.scores[0, :, 1], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert result.scores[0, :, 0].abs().sum() == 0
    torch.testing.assert_close(result.boxes[0, 0], torch.tensor([0.0, 0, 30, 10]))


def test_assigner_resolves_shared_anchors_by_iou_and_ignores_padding() -> None:
    anchors = [(10, 10), (30, 30)]
    preds = [(0, 0, 20, 20), (25, 25, 35, 35)]
    gts = [(0, 0, 20, 20), (5, 5, 40, 40), (0, 0, 64, 64)]  # the last row is padding
    # IoU(pred 0, gt A) = 1, IoU(pred 0, gt B) = 225/1400; IoU(pred 1, gt B) = 100/1225: B's top-1 is anchor 0 too
    one = _assign(anchors, preds, gts, [0, 1, 1], topk=1, mask=[True, True, False])
    assert one.fg[0].tolist() == [True, False] and one.labels[0, 0] == 0 and one.gt_index[0, 0] == 0
    two = _assign(anchors, preds, gts, [0, 1, 1], topk=2, mask=[True, True, False])
    assert two.fg[0].tolist() == [True, True] and two.labels[0].tolist() == [0, 1]
    assert two.gt_index[0].tolist() == [0, 1]


def test_assigner_gives_a_box_smaller_than_a_cell_its_nearest_anchor() -> None:
    anchors = [(x, y) for y in (4, 12, 20) for x in (4, 12, 20)]
    preds = [(a[0] - 4, a[1] - 4, a[0] + 4, a[1] + 4) for a in anchors]
    result = _assign(anchors, preds, [(13, 13, 15, 15)], [0], topk=3)  # no anchor centre inside; nearest: (12, 12)
    assert result.fg[0].nonzero().flatten().tolist() == [anchors.index((12, 12))]
    empty = _assign(anchors, preds, [(0, 0, 1, 1)], [0], topk=3, mask=[False])
    assert not empty.fg.any() and empty.scores.sum() == 0


def _atss(gt_boxes, gt_labels, *, pd_boxes=None, size=64, strides=(8, 16), topk=4, scale=2.0, mask=None):
    anchors, stride_of = make_anchors((size, size), strides)
    pd = torch.zeros(1, len(anchors), 4) if pd_boxes is None else pd_boxes
    gt = torch.tensor([gt_boxes], dtype=torch.float32)
    mask = torch.ones(gt.shape[:2], dtype=torch.bool) if mask is None else torch.tensor([mask])
    result = ATSSAssigner(2, topk=topk, anchor_scale=scale)(
        torch.zeros(1, len(anchors), 2), pd, anchors, torch.tensor([gt_labels]), gt, mask, strides=stride_of
    )
    return result, anchors, stride_of


def _index(anchors, stride_of, point, stride) -> int:
    hit = ((anchors == torch.tensor(point, dtype=torch.float32)).all(1) & (stride_of == stride)).nonzero()
    return int(hit[0, 0])


def test_atss_picks_the_level_that_fits_the_box_and_resolves_shared_anchors() -> None:
    # 64 px, strides 8 and 16, anchor boxes 2·stride (16 and 32 px), 4 candidates per level. Box A (8, 8, 40, 36):
    # candidates coarse (24,24) IoU 0.875, (24,8) 0.364, (8,24) and (40,24) 0.304; fine (20|28, 20|28) 0.286 each;
    # mean 0.374 + std 0.204 = 0.578: only the coarse (24,24), though four fine anchors lie inside the box too.
    # Box B (8, 8, 56, 40): coarse (24,24) and (40,24) 2/3, (24|40, 8) 0.25; fine (28|36, 20|28) 1/6;
    # mean 0.3125 + std 0.222 = 0.534: coarse (24,24) and (40,24).
    box_a, box_b = [8, 8, 40, 36], [8, 8, 56, 40]
    only_a, anchors, stride_of = _atss([box_a], [0])
    coarse = _index(anchors, stride_of, (24, 24), 16)
    right = _index(anchors, stride_of, (40, 24), 16)
    assert only_a.fg[0].nonzero().flatten().tolist() == [coarse]
    assert not only_a.fg[0, _index(anchors, stride_of, (20, 20), 8)]  # inside the box, but on the wrong level
    only_b, _, _ = _atss([box_b], [1])
    assert only_b.fg[0].nonzero().flatten().tolist() == [coarse, right]
    # both: (24,24) is claimed by A (0.875) and B (2/3) and goes to A; B keeps (40,24). Class targets are the IoU of
    # the anchor's predicted box with its box: 1 for (24,24), (8,8,56,24) against B = 768/1536 = 0.5 for (40,24)
    pd = torch.zeros(1, len(anchors), 4)
    pd[0, coarse], pd[0, right] = torch.tensor(box_a, dtype=torch.float32), torch.tensor([8.0, 8, 56, 24])
    both, _, _ = _atss([box_a, box_b], [0, 1], pd_boxes=pd)
    assert both.fg[0].nonzero().flatten().tolist() == [coarse, right]
    assert both.gt_index[0, [coarse, right]].tolist() == [0, 1] and both.labels[0, [coarse, right]].tolist() == [0, 1]
    torch.testing.assert_close(both.scores[0, coarse], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(both.scores[0, right], torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(both.boxes[0, right], torch.tensor(box_b, dtype=torch.float32))


def test_atss_gives_a_box_smaller_than_a_cell_its_nearest_anchor_and_ignores_padding() -> None:
    # 24 px, one level of stride 8 (points 4, 12, 20), 40 px anchor boxes: every anchor box holds the 2 px box (equal
    # IoU) and no point lies inside it, so the fallback takes the nearest point (12, 12)
    result, anchors, stride_of = _atss([[13, 13, 15, 15]], [1], size=24, strides=(8,), topk=9, scale=5.0)
    assert result.fg[0].nonzero().flatten().tolist() == [_index(anchors, stride_of, (12, 12), 8)]
    padded, _, _ = _atss([[13, 13, 15, 15]], [1], size=24, strides=(8,), topk=9, scale=5.0, mask=[False])
    assert not padded.fg.any() and padded.scores.sum() == 0
    with pytest.raises(PotpourriError, match="stride"):
        ATSSAssigner(2)(torch.zeros(1, 9, 2), torch.zeros(1, 9, 4), anchors, torch.tensor([[0]]),
                        torch.tensor([[[13.0, 13, 15, 15]]]), torch.ones(1, 1, dtype=torch.bool))  # fmt: skip


def _atss_reference(anchors, strides, gts, topk, scale):
    """ATSS written out per box with Python loops (numpy float64): the positives' box index per anchor, −1 if none."""
    anchors, strides, gts = (np.asarray(v, np.float64) for v in (anchors, strides, gts))
    owner, owner_iou = np.full(len(anchors), -1), np.full(len(anchors), -1.0)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)

    for g, box in enumerate(gts):
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        cands = []
        for stride in np.unique(strides):
            level = [i for i in range(len(anchors)) if strides[i] == stride]
            level.sort(key=lambda i: math.dist(anchors[i], centre))
            cands += level[:topk]
        half = {i: strides[i] * scale / 2 for i in cands}
        ious = {i: iou(box, (*(anchors[i] - half[i]), *(anchors[i] + half[i]))) for i in cands}
        values = list(ious.values())
        threshold = np.mean(values) + np.std(values, ddof=1)
        for i in cands:
            inside = box[0] < anchors[i][0] < box[2] and box[1] < anchors[i][1] < box[3]
            if ious[i] >= threshold and inside and ious[i] > owner_iou[i]:
                owner[i], owner_iou[i] = g, ious[i]
    return owner


def test_atss_matches_a_loop_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(0)
    anchors, stride_of = make_anchors((96, 96), (8, 16, 32))
    checked = 0
    for _ in range(12):
        sides = rng.uniform(14, 60, (3, 2))
        corners = rng.uniform(0, 96 - sides)
        gts = np.concatenate([corners, corners + sides], 1)
        expected = _atss_reference(anchors.numpy(), stride_of.numpy(), gts, topk=5, scale=5.0)
        if any((expected == g).sum() == 0 for g in range(len(gts))):
            continue  # a box without a positive gets the fallback, which the loop does not model
        result = ATSSAssigner(3, topk=5, anchor_scale=5.0)(
            torch.zeros(1, len(anchors), 3), torch.zeros(1, len(anchors), 4), anchors, torch.tensor([[0, 1, 2]]),
            torch.tensor(gts[None], dtype=torch.float32), torch.ones(1, 3, dtype=torch.bool), strides=stride_of,
        )  # fmt: skip
        got = torch.where(result.fg[0], result.gt_index[0], -1).numpy()
        np.testing.assert_array_equal(got, expected)
        checked += 1
    assert checked >= 6


def test_make_assigner_names_and_the_atss_training_path() -> None:
    assert isinstance(make_assigner("tal", 2), TaskAlignedAssigner) and make_assigner("tal", 2).topk == 13
    assert isinstance(make_assigner("atss", 2), ATSSAssigner) and make_assigner("atss", 2, topk=3).topk == 3
    with pytest.raises(PotpourriError, match="tal, atss"):
        make_assigner("simota", 2)
    torch.set_num_threads(1)
    train = _planted(16)
    cfg = DetectTrainConfig(class_names=("red", "blue"), image_size=64, epochs=30, batch_size=8, lr=5e-3,
                            warmup_steps=5, assigner="atss", progress=False)  # fmt: skip
    result = train_detector(train, train, cfg, model=_tiny())
    losses = [row["loss"] for row in result.history]
    assert all(math.isfinite(v) for v in losses) and min(row["positives"] for row in result.history) > 0
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert result.final["test_map50"] > 0.25  # random ≈ 0; ATSS learns this example more slowly than TAL (0.36)


# ----------------------------------------------------------------------------------------------- losses
def test_box_iou_and_giou_loss_hand_computed() -> None:
    from torchvision.ops import generalized_box_iou_loss

    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1]])
    torch.testing.assert_close(box_iou_elementwise(a, b), torch.tensor([1 / 7, 0.0]))
    # GIoU = IoU − (enclosing − union)/enclosing: 1/7 − 2/9 and 0 − 1/3
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3])
    torch.testing.assert_close(generalized_box_iou_loss(a, b, reduction="none"), expected)


def test_distribution_focal_loss_hand_computed() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))  # probabilities (1/4, 1/2, 1/4), uniform
    loss = distribution_focal_loss(logits, torch.tensor([0.75, 0.5]))
    # 0.25·(−ln 1/4) + 0.75·(−ln 1/2) = 1.25 ln 2;  0.5·ln 3 + 0.5·ln 3 = ln 3
    torch.testing.assert_close(loss, torch.tensor([1.25 * math.log(2), math.log(3)]))


def test_varifocal_loss_hand_computed() -> None:
    logits = torch.zeros(1, 2)  # p = 0.5 for both classes
    target = torch.tensor([[0.8, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])
    # positive: weight q = 0.8, BCE(0.5, 0.8) = ln 2; negative: weight 0.75·0.5² = 0.1875, BCE(0.5, 0) = ln 2
    expected = (0.8 + 0.1875) * math.log(2)
    assert varifocal_loss(logits, target, positive).item() == pytest.approx(expected, rel=1e-6)


def test_training_on_a_planted_example_lowers_the_loss_and_finds_the_boxes() -> None:
    torch.set_num_threads(1)
    train = _planted(16)
    cfg = DetectTrainConfig(class_names=("red", "blue"), image_size=64, epochs=30, batch_size=8, lr=5e-3,
                            warmup_steps=5, progress=False)  # fmt: skip
    result = train_detector(train, train, cfg, model=_tiny())
    losses = [row["loss"] for row in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert result.final["test_map50"] > 0.5  # a random detector scores ≈ 0 on these boxes


# ----------------------------------------------------------------------------------------------- metrics
def _sample(boxes, labels, size=100) -> DetectionSample:
    return DetectionSample(np.zeros((size, size, 3), np.uint8), boxes, labels)


def test_coco_map_matches_a_hand_computed_case() -> None:
    # class 0: two truths; detections 0.9 (IoU 1), 0.8 (no overlap), 0.7 (IoU 0.72 with the second truth)
    truths = [_sample([[0, 0, 10, 10]], [0]), _sample([[50, 50, 60, 60]], [0])]
    second = [50, 50, 60, 57.2]  # 72 / 100 = IoU 0.72: a match at thresholds 0.50 … 0.70 only
    preds = [
        {"boxes": np.array([[0, 0, 10, 10], [80, 80, 90, 90]]), "scores": np.array([0.9, 0.8]), "labels": np.zeros(2)},
        {"boxes": np.array([second]), "scores": np.array([0.7]), "labels": np.zeros(1)},
    ]
    result = coco_map(preds, truths, num_classes=1)
    # 101-point interpolated AP: recall ≤ 0.5 at precision 1 (51 points), recall 0.51 … 1 at precision 2/3 (50 points)
    ap_match = (51 + 50 * 2 / 3) / 101
    ap_miss = 51 / 101  # above IoU 0.7 the third detection is a false positive: recall stops at 0.5
    assert result["map50"] == pytest.approx(ap_match, abs=1e-6)
    assert result["map"] == pytest.approx((5 * ap_match + 5 * ap_miss) / 10, abs=1e-6)
    assert result["per_class_ap50"][0] == pytest.approx(ap_match, abs=1e-6)


def test_coco_map_averages_classes_and_handles_no_detections() -> None:
    truths = [_sample([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])]
    preds = [{"boxes": np.array([[0, 0, 10, 10]]), "scores": np.array([0.9]), "labels": np.array([0])}]
    result = coco_map(preds, truths, num_classes=3)  # class 1 missed entirely; class 2 absent
    assert result["map50"] == pytest.approx(0.5)
    assert result["per_class_ap50"][:2] == pytest.approx([1.0, 0.0]) and math.isnan(result["per_class_ap50"][2])
    none = coco_map([{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}], truths, 3)
    assert none["map50"] == 0.0 and none["map"] == 0.0


# ----------------------------------------------------------------------------------------------- model
def test_anchors_and_decode_recover_a_planted_box() -> None:
    points, strides = make_anchors((64, 32))
    assert len(points) == 8 * 4 + 4 * 2 + 2 * 1
    torch.testing.assert_close(points[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))
    assert strides[-1] == 32 and points[-1].tolist() == [16.0, 48.0]
    reg_max, classes = 4, 1
    raw = torch.full((1, len(points), 4 * (reg_max + 1) + classes), -20.0)
    raw[0, 0, : 4 * (reg_max + 1)] = -20
    for side, distance in enumerate((1, 0, 3, 2)):  # one-hot bins: left 1, top 0, right 3, bottom 2 strides
        raw[0, 0, side * (reg_max + 1) + distance] = 20
    boxes, probs = decode(raw, num_classes=classes, reg_max=reg_max, image_size=(64, 32))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4.0 - 8, 4.0, 4.0 + 24, 4.0 + 16]))
    assert probs.shape == (1, len(points), 1)


def test_registered_sizes_output_shape_and_input_check() -> None:
    model = create_model("yolo_rep_n", num_classes=3).eval()
    with torch.no_grad():
        raw = model(torch.randn(1, 3, 64, 96))
    assert raw.shape == (1, model.num_anchors((64, 96)), 4 * 17 + 3) == (1, 8 * 12 + 4 * 6 + 2 * 3, 71)
    with pytest.raises(PotpourriError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(PotpourriError, match="no pretrained weights"):
        create_model("yolo_rep_s", pretrained=True)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 64, 64)).shape[-1] == 4 * 17 + 5


def test_lite0_variant_loads_the_imagenet_backbone_only_when_asked() -> None:
    reference = create_model("efficientnet_lite0", pretrained=True)
    pretrained = create_model("yolo_lite0_pan", backbone_pretrained=True, num_classes=2)
    fresh = create_model("yolo_lite0_pan", num_classes=2)
    for name in ("conv_stem.weight", "blocks.6.0.conv_pw.weight", "bn1.running_var"):
        expected = reference.state_dict()[name]
        assert torch.equal(pretrained.backbone.state_dict()[name], expected)
        assert not torch.equal(fresh.backbone.state_dict()[name], expected)


def test_reparameterize_keeps_raw_outputs_and_detections() -> None:
    from potpourri.models.reparam import is_reparameterized

    model = _tiny()
    _randomise(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        fused = copy.deepcopy(model).reparameterize()
        after = fused(x)
    assert (before[0] - before[1]).abs().max() > 1e-2  # outputs depend on the input: the parity below means something
    assert is_reparameterized(fused)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # every conv-BN folded too
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    assert (after - before).abs().max() <= 1e-4
    fused.reparameterize()  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(fused(x), after)
    a = postprocess(before, model, image_size=(64, 64), conf=0.0)
    b = postprocess(after, fused, image_size=(64, 64), conf=0.0)
    assert [len(d["scores"]) for d in a] == [len(d["scores"]) for d in b]


def test_onnx_export_matches_the_fused_detector(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from potpourri.deploy.export import export_onnx

    model = _tiny()
    _randomise(model)
    result = export_onnx(model, tmp_path, input_size=(3, 64, 64), reparam=True, name="yolo_tiny")
    assert result.max_abs_diff <= 1e-4


# ----------------------------------------------------------------------------------------------- data and loop
def test_augment_moves_boxes_with_the_pixels() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[2:9, 20:30], mask[15:30, 3:6] = 1, 2
    boxes, labels = boxes_from_mask(mask, merge_gap=0)
    image = np.repeat(mask[..., None] * 100, 3, axis=2).astype(np.uint8)  # the mask travels inside the image
    for seed in range(8):
        moved = augment(DetectionSample(image, boxes, labels), np.random.default_rng(seed))
        expected_boxes, expected_labels = boxes_from_mask(moved.image[..., 0] // 100, merge_gap=0)
        assert _rows(moved.boxes, moved.labels) == _rows(expected_boxes, expected_labels)


def _rows(boxes: np.ndarray, labels: np.ndarray) -> list[tuple]:
    return sorted((int(c), *(round(float(v), 3) for v in b)) for b, c in zip(boxes, labels, strict=True))


def test_resume_ends_with_the_same_weights_and_save_load_roundtrip(tmp_path: Path) -> None:
    train = _planted(8)
    cfg = DetectTrainConfig(class_names=("red", "blue"), image_size=64, epochs=2, batch_size=4, progress=False)
    full = train_detector(train, None, cfg, model=_tiny(), run_path=tmp_path / "full")
    half_cfg = DetectTrainConfig(**{**cfg.__dict__, "epochs": 1})
    train_detector(train, None, half_cfg, model=_tiny(), run_path=tmp_path / "split")
    resumed = train_detector(train, None, cfg, model=_tiny(), run_path=tmp_path / "split", resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert (tmp_path / "split" / "checkpoints" / "last.json").is_file()

    model = create_model("yolo_rep_n", num_classes=2).eval()
    save_detector(tmp_path / "saved", model, {"model": "yolo_rep_n", "class_names": ["a", "b"], "image_size": 64})
    loaded, meta = load_detector(tmp_path / "saved")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["class_names"] == ["a", "b"]
    with pytest.raises(PotpourriError, match=r"no detector\.json"):
        load_detector(tmp_path)


@pytest.mark.slow
def test_cli_train_predict_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from PIL import Image

    from potpourri.cli import main

    out = tmp_path / "run"
    args = ["detect", "train", "--data", "ds-synth:brick", "--image-size", "64", "--epochs", "2", "--per-kind", "2",
            "--batch-size", "8", "--out", str(out), "--threads", "1", "--assigner", "atss"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["assigner"] == "atss"
    assert 0.0 <= summary["test_map50"] <= 1.0 and summary["reparam_max_abs_diff"] <= 1e-3
    assert (out / "detector.safetensors").is_file() and (out / "report.html").is_file()
    image = tmp_path / "img.png"
    Image.fromarray(np.full((96, 128, 3), 128, np.uint8)).save(image)
    assert main(["detect", "predict", str(out), str(image), "--conf", "0.0", "--out", str(tmp_path / "pred")]) == 0
    csv_text = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert csv_text[0] == "image,class,score,x1,y1,x2,y2" and len(csv_text) > 1
    assert Image.open(next((tmp_path / "pred" / "images").glob("*.png"))).size == (128, 96)
    from potpourri import load_run

    predictor = load_run(out)  # the run reloads by its metadata.json kind
    assert json.loads((out / "metadata.json").read_text())["kind"] == predictor.kind == "detector"
    found = predictor.predict([str(image)])[0]
    assert found["boxes"].shape[-1] == 4 and len(found["names"]) == len(found["scores"])
    assert main(["detect", "eval", str(out), "--data", "ds-synth:brick", "--per-kind", "2", "--reparam"]) == 0
    assert "mAP@0.5" in capsys.readouterr().out
    assert main(["detect", "eval", str(out), "--data", "ds-synth:nope"]) == 2
    assert main(["detect", "train", "--data", "ds-synth:brick", "--assigner", "simota"]) == 2  # one line, no exit
