"""SAM-CLIP merging on tiny random models: head shapes, which parts train per stage, the rehearsal sampler's mix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.segment.sam_clip import PARTS, RehearsalSampler, StageConfig, build_student, photo_crops, train_stage

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
    assert arms[0].startswith("teachers") and any("no rehearsal" in a for a in arms)
    assert any("rehearse A" in a for a in arms)


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
