"""SAM-CLIP merging on tiny random models: head shapes, which parts train per stage, the rehearsal sampler's mix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.segment.sam_clip import (
    PARTS,
    RehearsalSampler,
    StageConfig,
    build_student,
    distill_loss,
    photo_crops,
    prompt_miou,
    teacher_b_patches,
    train_stage,
    zero_shot_segment,
)

SIZE = 64


def tiny_data(n: int = 12, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two sources whose targets come from a fixed random teacher (reachable by construction)."""
    torch.manual_seed(seed)
    teacher = build_student("tiny", sam_dim=8, clip_dim=6, seed=seed + 100).eval()
    a, b = torch.randn(n, 3, SIZE, SIZE), torch.randn(n, 3, SIZE, SIZE) * 0.5 + 1
    with torch.no_grad():
        return {"sam": (a, teacher(a)["sam"]), "clip": (b, teacher(b)["clip"])}


def test_heads_shapes():
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    out = student(torch.randn(2, 3, SIZE, SIZE))
    assert out["sam"].shape == (2, 8, SIZE // 16, SIZE // 16) and out["clip"].shape == (2, 6)
    assert set(student(torch.randn(1, 3, SIZE, SIZE), heads=("clip",))) == {"clip"}


def test_timm_student_is_cut_at_stride_16():
    student = build_student("mobilenetv3_small_050", sam_dim=8, clip_dim=6)
    out = student(torch.randn(1, 3, 96, 96))
    assert out["sam"].shape == (1, 8, 6, 6) and out["clip"].shape == (1, 6)
    with pytest.raises(PotpourriError, match="unknown student"):
        build_student("no_such_net", sam_dim=8, clip_dim=6)


STAGES = [
    ("A only", ("backbone", "sam_head"), {"sam": 1.0}),
    ("probe B", ("clip_head",), {"clip": 1.0}),
    ("B, no rehearsal", ("backbone", "clip_head"), {"clip": 1.0}),
    ("B + rehearsal", PARTS, {"sam": 0.5, "clip": 0.5}),
]


@pytest.mark.parametrize(("name", "trainable", "shares"), STAGES)
def test_only_the_stage_parts_train(name, trainable, shares):
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train_stage(student, tiny_data(), StageConfig(name, trainable, shares, steps=2, batch_size=4))
    changed = {part for part in PARTS if any(not torch.equal(before[k], v) for k, v in student.state_dict().items()
                                             if k.startswith(part + "."))}  # fmt: skip
    assert changed == set(trainable)
    assert {n.split(".")[0] for n, p in student.named_parameters() if p.requires_grad} == set(trainable)


def test_sampler_mixes_sources_in_the_stated_share():
    sampler = RehearsalSampler({"sam": 10, "clip": 37}, {"sam": 0.3, "clip": 0.7}, batch_size=8, seed=1)
    batches = [sampler.next_batch() for _ in range(50)]
    sam_counts = [len(b.get("sam", [])) for b in batches]
    assert all(sum(len(v) for v in b.values()) == 8 for b in batches)
    assert sum(sam_counts) == 120 and set(sam_counts) == {2, 3}  # 0.3 · 8 · 50, spread as 2s and 3s
    first_epoch = torch.cat([b["sam"] for b in batches if "sam" in b])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # each epoch visits every sample once
    clip = torch.cat([b["clip"] for b in batches])
    assert clip.min() >= 0 and clip.max() < 37
    even = RehearsalSampler({"sam": 5, "clip": 5}, {"sam": 0.25, "clip": 0.75}, batch_size=8)
    assert all(len(even.next_batch()["sam"]) == 2 for _ in range(5))
    with pytest.raises(PotpourriError, match="sum to 1"):
        RehearsalSampler({"sam": 5, "clip": 5}, {"sam": 0.5, "clip": 0.6}, batch_size=8)


def test_distillation_lowers_both_losses():
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    losses = train_stage(student, tiny_data(), StageConfig("both", PARTS, {"sam": 0.5, "clip": 0.5}, steps=60,
                                                           lr=1e-2, batch_size=8))  # fmt: skip
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_photo_crops_are_seeded_and_split():
    train = photo_crops("train", 4, size=32, seed=0, photos=("astronaut", "camera"))
    again = photo_crops("train", 4, size=32, seed=0, photos=("astronaut", "camera"))
    test = photo_crops("test", 4, size=32, seed=0, photos=("astronaut", "camera"))
    assert train.shape == (4, 32, 32, 3) and train.dtype == np.uint8
    assert np.array_equal(train, again) and not np.array_equal(train, test)


@pytest.mark.slow
def test_reproduce_sam_clip_quick(tmp_path):
    from potpourri.cli import main

    assert main(["reproduce", "sam-clip", "--quick", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    arms = [r["arm"] for r in summary["rows"]]
    assert arms[:2] == ["teacher A (small SAM)", "teacher B alone (clip patch–text cosine)"]
    assert arms[2].startswith("supervised segmenter") and any("no rehearsal" in a for a in arms)
    assert any("rehearse A" in a for a in arms)
    assert summary["held_out"] == ["moon", "tissue"] and not set(summary["held_out"]) & set(summary["clip_trained_on"])
    base = next(r for r in summary["rows"] if r["arm"].startswith("1:"))
    for row in summary["rows"][summary["rows"].index(base) + 1 :]:  # forgetting is click mIoU after minus before
        assert row["forgetting"] == pytest.approx(row["A: 1-click mIoU"] - base["A: 1-click mIoU"])
        assert set(row["per_class"]) == {"good", "scratch", "crack", "stain", "hole", "contamination", "dent"}
    verdict, no_rehearsal = summary["verdict"], next(r for r in summary["rows"] if "no rehearsal" in r["arm"])
    assert verdict["miou_dropped_without_rehearsal"] == (no_rehearsal["forgetting"] < 0)
    assert verdict["nmse_no_rehearsal"] == no_rehearsal["A: embedding nMSE"]


def test_teacher_initialised_student_reproduces_teacher_a_and_keeps_batchnorm_statistics():
    from potpourri.models.sam import Sam, SamConfig

    torch.manual_seed(0)
    sam = Sam(SamConfig(backbone="none", image_size=SIZE, prompt_dim=8, num_heads=2, mlp_dim=16, iou_hidden=8),
              backbone=None).eval()  # fmt: skip
    sam.image_encoder.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 16, 16), torch.nn.BatchNorm2d(16))
    sam.eval()
    student = build_student("sam", sam_dim=8, clip_dim=6, sam=sam).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(student(x)["sam"], sam.image_encoder(x))
    stats = student.backbone[1].running_mean.clone()
    weight = student.backbone[0].weight.clone()
    teacher = {k: v.clone() for k, v in sam.state_dict().items()}
    data = {"sam": (x, sam.image_encoder(x).detach()), "clip": (x, torch.randn(2, 6))}
    train_stage(student, data, StageConfig("B", ("backbone", "clip_head"), {"clip": 1.0}, steps=2, batch_size=2))
    assert torch.equal(student.backbone[1].running_mean, stats)  # frozen statistics, as in the teacher
    assert not torch.equal(student.backbone[0].weight, weight)
    assert all(torch.equal(teacher[k], v) for k, v in sam.state_dict().items())  # a copy trains, not the teacher


# ----------------------------------------------------------------------------------------------- with language
def test_patch_clip_head_keeps_the_stride_16_grid():
    student = build_student("tiny", sam_dim=8, clip_dim=6, clip_head="patch")
    out = student(torch.randn(2, 3, SIZE, 2 * SIZE))
    assert out["sam"].shape == (2, 8, SIZE // 16, SIZE // 8) and out["clip"].shape == (2, 6, SIZE // 16, SIZE // 8)
    with pytest.raises(PotpourriError, match="unknown clip head"):
        build_student("tiny", sam_dim=8, clip_dim=6, clip_head="cls")


def test_clip_distillation_loss_is_one_minus_the_mean_patch_cosine():
    torch.manual_seed(0)
    prediction, target = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    cosines = [
        float(prediction[b, :, i, j] @ target[b, :, i, j] / (prediction[b, :, i, j].norm() * target[b, :, i, j].norm()))
        for b in range(2) for i in range(3) for j in range(4)
    ]  # fmt: skip
    assert float(distill_loss("clip", prediction, target)) == pytest.approx(1 - np.mean(cosines), abs=1e-6)
    pooled = prediction.mean((2, 3))  # the Lite0 path: one (B, D) feature per image, the same formula
    expected = 1 - np.mean([float(F.cosine_similarity(pooled[b], target.mean((2, 3))[b], dim=0)) for b in range(2)])
    assert float(distill_loss("clip", pooled, target.mean((2, 3)))) == pytest.approx(expected, abs=1e-6)
    assert float(distill_loss("clip", 3 * target, target)) == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_patch_head_distillation_reaches_a_planted_teacher():
    teacher = build_student("tiny", sam_dim=8, clip_dim=6, seed=100, clip_head="patch").eval()
    x = torch.randn(12, 3, SIZE, SIZE)
    with torch.no_grad():
        data = {"clip": (x, teacher(x)["clip"])}
    student = build_student("tiny", sam_dim=8, clip_dim=6, clip_head="patch")
    losses = train_stage(student, data, StageConfig("B", ("backbone", "clip_head"), {"clip": 1.0}, steps=60, lr=1e-2,
                                                    batch_size=6))  # fmt: skip
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_zero_shot_segmentation_labels_planted_patches_with_their_class():
    torch.manual_seed(0)
    text = torch.linalg.qr(torch.randn(8, 4))[0].T  # (4, 8): orthonormal class embeddings, class 0 = background
    labels = torch.tensor([[0, 1], [2, 3]])  # the planted class of each patch of a 2×2 grid
    patches = (2.5 * text[labels]).permute(2, 0, 1)[None]  # (1, 8, 2, 2): each patch equals its class's text (scaled)
    out = zero_shot_segment(patches, text, size=8)
    expected = labels.repeat_interleave(4, 0).repeat_interleave(4, 1)  # each patch covers a 4×4 block
    corners = (slice(0, 2), slice(6, 8))  # away from the bilinear blend between patches
    for rows in corners:
        for cols in corners:
            assert torch.equal(out[0, rows, cols], expected[rows, cols])
    mixed = (text[1] + 0.9 * text[0])[:, None, None][None]  # defect 1 beats the background by 0.1 / norm
    assert int(zero_shot_segment(mixed, text, size=2)[0, 0, 0]) == 1
    assert int(zero_shot_segment(mixed, text, size=2, margin=0.2)[0, 0, 0]) == 0  # ... but not by the margin


def test_teacher_b_patches_are_the_projected_patch_tokens_in_row_major_order():
    from potpourri.core.registry import create_model

    torch.manual_seed(0)
    clip = create_model("clip_vit_tiny_minilm", vision={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                        "num_heads": 2}, text={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                        "intermediate_size": 64}, embed_dim=16).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 64)  # a 4×8 grid: rows and columns cannot be swapped unnoticed
    out = teacher_b_patches(clip, x, batch=1)
    assert out.shape == (2, 16, 4, 8)
    with torch.no_grad():
        tokens = clip.image_projection(clip.visual.forward_features(x))  # (2, 1 + 32, 16), class token first
    assert torch.allclose(out[1, :, 2, 5], tokens[1, 1 + 2 * 8 + 5], atol=1e-5)
    assert torch.allclose(out[0, :, 3, 0], tokens[0, 1 + 3 * 8], atol=1e-5)


def test_box_and_click_miou_match_evaluate_sam():
    from potpourri.segment.sam import evaluate_sam
    from potpourri.segment.sam_prompt import image_embeddings
    from tests.segment.test_sam import planted, tiny_sam

    sam = tiny_sam()
    image, region = planted()
    items = [(0, region)]
    reference = evaluate_sam(sam, image[None], items, progress=False)
    embeddings = image_embeddings(sam, image[None])
    assert prompt_miou(sam, embeddings, items, "box") == pytest.approx(reference["box"])
    assert prompt_miou(sam, embeddings, items, "click") == pytest.approx(reference["1 click"])


@pytest.mark.slow
def test_lite0_teacher_path_is_kept_and_held_out_surfaces_must_be_unseen(tmp_path):
    import dataclasses

    from potpourri.papers.sam_clip import QUICK, run_sam_clip_experiment, run_sam_clip_language

    run = run_sam_clip_experiment(dataclasses.replace(QUICK, teacher_b="lite0"), out=tmp_path / "lite0", progress=False)
    rows = json.loads((run.path / "summary.json").read_text())["rows"]
    assert rows[0]["arm"].startswith("teachers (A: small SAM, B: Lite0)") and "B: top-1 agreement" in rows[-1]
    with pytest.raises(PotpourriError, match="held-out surfaces \\['brick'\\]"):
        run_sam_clip_language(dataclasses.replace(QUICK, held_out=("brick", "moon")), out=tmp_path / "bad",
                              progress=False, quick=True)  # fmt: skip


def test_teacher_b_dpam_patches_equal_the_anomalyclip_towers_v_v_maps():
    from potpourri.core.registry import create_model
    from potpourri.inspect.clip_towers import OwnClipTowers

    torch.manual_seed(0)
    clip = create_model("clip_vit_tiny_minilm", vision={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                        "num_heads": 2}, text={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                        "intermediate_size": 64}, embed_dim=16).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    out = teacher_b_patches(clip, x, batch=1, dpam_from=2)  # (2, 16, 4, 4)
    towers = OwnClipTowers(clip, dual_from=2, feature_layers=[3])  # the other path to the same V-V tokens
    maps = towers.frozen_image_features(x)["layer0"]  # (2, 4, 4, 16)
    torch.testing.assert_close(out, maps.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, teacher_b_patches(clip, x), atol=1e-3)  # the V-V stream is not the q-k one
    with pytest.raises(PotpourriError, match="not a block of this 3-block ViT"):
        teacher_b_patches(clip, x, dpam_from=4)


def test_teacher_b_dpam_flag_is_checked_before_anything_is_written(tmp_path, capsys):
    from potpourri.cli import main

    out = tmp_path / "run"
    assert main(["sam-clip", "--teacher-b-dpam", "9", "--out", str(out)]) == 2
    assert "the clip's ViT has blocks 1..6" in capsys.readouterr().err and not out.exists()
    assert main(["sam-clip", "--teacher-b", "lite0", "--teacher-b-dpam", "3", "--out", str(out)]) == 2
    assert "applies to --teacher-b clip" in capsys.readouterr().err and not out.exists()
    assert main(["sam-clip", "--teacher-b-dpam", "0", "--out", str(out)]) == 2  # argparse: a positive int
    assert not out.exists()
