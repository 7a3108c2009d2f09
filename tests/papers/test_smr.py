"""SMR toy: ToMe-style merging (count, size-weighted mean, unmerge), MAE masking, and that only the student trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.smr import bipartite_soft_matching
from potpourri.papers.smr import (
    FeatureDecoder,
    SMRConfig,
    SMRViT,
    encoder_macs,
    mae_visible_for_equal_macs,
    pretrain,
    random_masking,
    reproduce_smr,
    unmerge,
)

pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


@pytest.mark.parametrize(("n", "r"), [(16, 3), (17, 8), (9, 4)])
def test_merge_removes_r_tokens_and_keeps_the_size_weighted_mean(n: int, r: int) -> None:
    g = torch.Generator().manual_seed(n + r)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    merge = bipartite_soft_matching(torch.randn(3, n, 4, generator=g), r)
    merged, new_size = merge.merge(x, size)
    assert merged.shape == (3, n - r, 5) and new_size.shape == (3, n - r, 1)
    assert torch.equal(new_size.sum(1), size.sum(1))  # total size is conserved
    before = (x * size).sum(1) / size.sum(1)
    after = (merged * new_size).sum(1) / new_size.sum(1)
    torch.testing.assert_close(after, before)


def test_merge_joins_the_most_similar_pair_and_unmerge_puts_tokens_back() -> None:
    # A = positions 0, 2, 4; B = 1, 3, 5. Token 2 is a copy of token 5 (cosine 1): with r=1 exactly they merge.
    metric = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]])
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1)
    merge = bipartite_soft_matching(metric, 1)
    merged, size = merge.merge(x, torch.ones(1, 6, 1))
    position = merge.new_position()
    assert position[0, 2] == position[0, 5]  # tokens 2 and 5 share one merged token
    assert merged[0, position[0, 2], 0] == pytest.approx(3.5) and size[0, position[0, 2], 0] == 2
    back = unmerge(merged, position)  # (1, 6, 1)
    expected = x.clone()
    expected[0, 2] = expected[0, 5] = 3.5
    assert torch.equal(back, expected)


def test_student_merge_schedule_shapes_and_assignment() -> None:
    torch.manual_seed(0)
    vit = SMRViT(image_size=16, patch_size=4, dim=16, depth=3, heads=2)  # 16 tokens
    x = torch.rand(2, 3, 16, 16)
    tokens, size, assignment = vit.forward_tokens(x, r=3)
    assert vit.token_schedule(r=3) == [16, 13, 10]
    assert tokens.shape == (2, 7, 16) and size.shape == (2, 7, 1) and assignment.shape == (2, 16)
    assert torch.equal(size.sum(1), torch.full((2, 1), 16.0))
    counts = torch.stack([torch.bincount(a, minlength=7) for a in assignment]).unsqueeze(-1).float()
    assert torch.equal(counts, size)  # each merged token covers exactly `size` patches
    full = unmerge(tokens, assignment)  # (2, 16, 16)
    assert full.shape == (2, 16, 16)
    # no merging: the pooled feature is the plain token mean
    plain, _, _ = vit.forward_tokens(x)
    torch.testing.assert_close(vit.forward_features(x), plain.mean(1))


def test_mae_masking_ratio_is_exact() -> None:
    keep, hidden = random_masking(5, 64, 16, torch.Generator().manual_seed(0))
    assert keep.shape == (5, 16) and torch.equal(hidden.sum(1), torch.full((5,), 48))
    assert all(len(set(row.tolist())) == 16 for row in keep)
    assert not hidden.gather(1, keep).any()  # the kept indices are exactly the visible ones
    with pytest.raises(PotpourriError):
        random_masking(1, 8, 0, torch.Generator())


def test_equal_compute_matching() -> None:
    vit = SMRViT(image_size=32, patch_size=4, dim=64, depth=4, heads=4)
    assert vit.token_schedule(r=12) == [64, 52, 40, 28]
    # 4·N·d² + 8·N·d² + 2·N²·d per block, summed by hand for N = 64, 52, 40, 28
    assert encoder_macs([64, 52, 40, 28], 64) == sum(12 * n * 64**2 + 2 * n * n * 64 for n in (64, 52, 40, 28))
    visible = mae_visible_for_equal_macs(vit, 12)
    smr = encoder_macs(vit.token_schedule(r=12), 64)
    assert abs(encoder_macs([visible] * 4, 64) - smr) / smr < 0.03


class _TinyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, 6, H/4, W/4)


@pytest.mark.parametrize("objective", ["smr", "mae", "distill"])
def test_only_the_student_trains_and_the_loss_falls(objective: str) -> None:
    torch.manual_seed(0)
    teacher = _TinyTeacher().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = SMRViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2)
    decoder = FeatureDecoder(16, 6, student.num_tokens, decoder_dim=16, heads=2)
    student_before = [p.detach().clone() for p in student.parameters()]
    # smooth images (a 2 x 2 grid upsampled): hidden patches are predictable from visible ones, as in real images
    images = F.interpolate(torch.rand(8, 3, 2, 2), size=16, mode="bilinear", align_corners=False)
    losses = pretrain(student, decoder, teacher, images, objective, steps=40, batch_size=8, r=3, visible=6, lr=3e-3)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_pretrain_rejects_a_teacher_grid_that_does_not_match() -> None:
    student = SMRViT(image_size=16, patch_size=2, dim=8, depth=1, heads=2)  # 64 patches, the teacher gives 16
    decoder = FeatureDecoder(8, 6, student.num_tokens, decoder_dim=8, heads=2)
    with pytest.raises(PotpourriError, match="patch grid"):
        pretrain(student, decoder, _TinyTeacher(), torch.rand(2, 3, 16, 16), "smr", steps=1)


@pytest.mark.slow
def test_smoke_run_with_a_tiny_teacher(tmp_path) -> None:
    class Teacher32(nn.Module):  # 32 px -> an 8 x 8 grid, like Lite0 on the 4x upsampled image
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    cfg = SMRConfig().quick()
    cfg.dim, cfg.decoder_dim, cfg.depth = 16, 16, 2
    run = reproduce_smr(cfg, out=str(tmp_path / "run"), teacher=Teacher32())
    text = (run.path / "results.md").read_text()
    for arm in ("random-init", "distill", "smr", "mae-matched", "mae-75"):
        assert f"| {arm} |" in text
    assert "Teacher" in text and (run.path / "report.html").exists()
