"""The FrozenDetector contract: transformers DETR adapters against transformers' own post-processing, Hungarian
matching against brute force, and one mask-head code path on a YOLO and a DETR (frozen weights, head-only grads)."""

from __future__ import annotations

import itertools

import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.detect.frozen import (
    HFDetrFrozen,
    YoloFrozen,
    detr_match_cost,
    frozen_outputs,
    hungarian_match,
    load_hf_detr,
)
from potpourri.detect.mask_head import MaskHead, MaskHeadConfig, predict_instances, train_mask_head
from tests.detect.test_mask_head import _planted, _tiny_detector

transformers = pytest.importorskip("transformers")

SIZE = 64


def _tiny_hf(kind: str = "detr", num_labels: int = 2) -> torch.nn.Module:
    """A random transformers DETR-family detector with a 4-stage tiny ResNet (no download)."""
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    kw = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
              encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_labels=num_labels)  # fmt: skip
    if kind == "detr":
        model = transformers.DetrForObjectDetection(transformers.DetrConfig(**kw))
    elif kind == "conditional":
        model = transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(**kw))
    else:
        kw.update(num_feature_levels=4, encoder_n_points=2, decoder_n_points=2)
        return transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**kw)).eval()
    with torch.no_grad():  # spread the scores and boxes so that queries differ (the init makes them near-equal)
        for p in model.class_labels_classifier.parameters():
            p.normal_(0, 1)
        for p in model.bbox_predictor.layers[-1].parameters():
            p.normal_(0, 1)
        model.model.query_position_embeddings.weight.normal_(0, 3)
    return model.eval()


_tiny_yolo = _tiny_detector  # the mask-head tests' seeded yolo_rep_n with 2 classes


def test_detr_adapter_boxes_equal_transformers_post_processing() -> None:
    model = _tiny_hf("detr")
    frozen = HFDetrFrozen(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = frozen.outputs(x)
    with torch.no_grad():
        expected = transformers.DetrImageProcessor().post_process_object_detection(
            model(pixel_values=x), threshold=0.0, target_sizes=[(SIZE, SIZE)] * 2
        )
    for row in range(2):
        kept = frozen.detections(out, row, conf=0.0, iou=1.0, max_det=100)
        scores, labels = out.probs[row].max(-1)
        order = expected[row]["scores"].argsort(descending=True, stable=True)
        assert torch.allclose(out.boxes[row, kept], expected[row]["boxes"][order], atol=1e-4)
        assert torch.allclose(scores[kept], expected[row]["scores"][order], atol=1e-6)
        assert torch.equal(labels[kept], expected[row]["labels"][order])
    assert out.embeds[0].shape == (2, 6, 32)  # the last decoder layer's state per query
    assert out.features[0].shape[-1] == SIZE // 4 and out.strides == (4.0, 32.0)


def test_a_saved_checkpoint_loads_from_its_folder_with_its_normalisation(tmp_path) -> None:
    model = _tiny_hf("detr")
    model.save_pretrained(tmp_path)
    transformers.DetrImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(tmp_path)
    frozen = load_hf_detr(tmp_path)
    x = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(frozen.outputs(x).boxes, HFDetrFrozen(model).outputs(x).boxes)
    assert frozen.mean == (0.5, 0.4, 0.3) and frozen.std == (0.2, 0.2, 0.2)
    with pytest.raises(PotpourriError, match=r"no config\.json"):
        load_hf_detr(tmp_path / "missing")


def test_conditional_detr_adapter_detections_are_in_transformers_top_k() -> None:
    model = _tiny_hf("conditional")
    frozen = HFDetrFrozen(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    out = frozen.outputs(x)
    with torch.no_grad():
        expected = transformers.ConditionalDetrImageProcessor().post_process_object_detection(
            model(pixel_values=x), threshold=0.0, target_sizes=[(SIZE, SIZE)], top_k=12
        )[0]
    kept = frozen.detections(out, 0, conf=0.0, iou=1.0, max_det=100)
    scores, labels = out.probs[0].max(-1)
    assert len(kept) == 6  # one detection per query: its best class
    for q in kept.tolist():
        same = (expected["labels"] == labels[q]) & torch.isclose(expected["scores"], scores[q], atol=1e-6)
        same &= torch.isclose(expected["boxes"], out.boxes[0, q], atol=1e-4).all(-1)
        assert same.any()


def test_deformable_detr_adapter_follows_the_contract() -> None:
    frozen = HFDetrFrozen(_tiny_hf("deformable"))
    out = frozen.outputs(torch.randn(2, 3, SIZE, SIZE))
    assert out.boxes.shape == (2, 6, 4) and out.probs.shape == (2, 6, 2)
    assert out.features[0].shape[1] == frozen.feature_channels[0] and out.features[1].shape[1] == 16
    assert ((out.probs >= 0) & (out.probs <= 1)).all()  # sigmoid scores


def test_hungarian_match_is_the_brute_force_minimum() -> None:
    cost = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    rows, cols = hungarian_match(cost)
    best = min(sum(cost[i, p[i]].item() for i in range(3)) for p in itertools.permutations(range(5), 3))
    assert rows.tolist() == [0, 1, 2]
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-6)


def test_detr_cost_matches_each_ground_truth_to_its_own_box() -> None:
    gt = torch.tensor([[10.0, 10, 30, 30], [40, 5, 60, 25]])
    pred = torch.tensor([[0.0, 0, 5, 5], [41, 6, 60, 24], [11, 9, 30, 31], [30, 30, 64, 64]])
    probs = torch.full((4, 2), 0.5)
    _, cols = hungarian_match(detr_match_cost(pred, probs, gt, torch.tensor([0, 1]), (SIZE, SIZE)))
    assert cols.tolist() == [2, 1]


def test_yolo_adapter_is_frozen_outputs() -> None:
    detector = _tiny_yolo()
    x = torch.randn(1, 3, SIZE, SIZE)
    out, ref = YoloFrozen(detector).outputs(x), frozen_outputs(detector, x)
    assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.features[1], ref.p3)
    assert sum(e.shape[1] for e in out.embeds) == out.boxes.shape[1]


@pytest.mark.parametrize("make", [_tiny_yolo, lambda: _tiny_hf("detr")], ids=["yolo", "hf-detr"])
def test_the_same_head_trains_on_any_frozen_detector(make) -> None:
    detector = make().train()  # train mode on purpose: freezing must switch to eval
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    head = MaskHead.for_detector(detector, dim=16, roi_size=14)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    samples = _planted(4)
    head, history = train_mask_head(detector, samples, MaskHeadConfig(max_steps=2, batch_size=2, progress=False),
                                    head=head)  # fmt: skip
    assert history["steps"] == 2
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    assert all(p.grad is None for p in detector.parameters())
    # per-level query projections of YOLO levels with no instance get none; every shared part gets one
    assert all(p.grad is not None for n, p in head.named_parameters() if not n.startswith("level_proj"))
    assert any(not torch.equal(head_before[k], v) for k, v in head.state_dict().items())
    found = predict_instances(detector, head, [s.image for s in samples], conf=0.0, max_det=5)
    assert any(len(f["boxes"]) for f in found)
    centres = torch.arange(SIZE) + 0.5
    for f in found:
        assert f["masks"].shape == (len(f["boxes"]), SIZE, SIZE)
        for m, (x1, y1, x2, y2) in zip(f["masks"], f["boxes"], strict=True):
            inside = ((centres[:, None] >= y1) & (centres[:, None] <= y2)) & ((centres >= x1) & (centres <= x2))
            assert not (torch.from_numpy(m) & ~inside).any()  # nothing pasted outside the box
