"""All-Seeing-style region–text head: InfoNCE against a direct formula, RoIAlign pooling of a planted box, retrieval
accuracy on a hand case, region captions from DS-Synth masks, and training on a planted region–caption mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potpourri.vlm.allseeing import (
    RegionTextHead,
    info_nce,
    pool_regions,
    region_caption_pairs,
    retrieval_accuracy,
    train_head,
)

pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _direct_info_nce(region: torch.Tensor, text: torch.Tensor, scale: float, positives: list[list[bool]]) -> float:
    """Loops over rows and columns: −mean over targets of log(exp(s·cos) / Σ exp(s·cos)), both directions."""
    n = len(region)
    sim = [[scale * float(region[i] @ text[j]) for j in range(n)] for i in range(n)]

    def one_way(matrix: list[list[float]], pos: list[list[bool]]) -> float:
        total = 0.0
        for i in range(n):
            log_norm = math.log(sum(math.exp(v) for v in matrix[i]))
            targets = [j for j in range(n) if pos[i][j]]
            total += -sum(matrix[i][j] - log_norm for j in targets) / len(targets)
        return total / n

    transposed = [[sim[j][i] for j in range(n)] for i in range(n)]
    pos_t = [[positives[j][i] for j in range(n)] for i in range(n)]
    return (one_way(sim, positives) + one_way(transposed, pos_t)) / 2


def test_info_nce_matches_the_direct_formula():
    torch.manual_seed(0)
    region = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    logit_scale = torch.tensor(math.log(5.0))
    eye = [[i == j for j in range(4)] for i in range(4)]
    assert info_nce(region, text, logit_scale).item() == pytest.approx(_direct_info_nce(region, text, 5.0, eye), 1e-5)
    same = [[i == j or {i, j} == {1, 2} for j in range(4)] for i in range(4)]  # captions 1 and 2 are one string
    got = info_nce(region, text, logit_scale, torch.tensor(same)).item()
    assert got == pytest.approx(_direct_info_nce(region, text, 5.0, same), 1e-5)
    assert info_nce(region, text, torch.tensor(math.log(1e4))).item() == pytest.approx(
        _direct_info_nce(region, text, 100.0, eye), 1e-5
    )  # the scale is capped at 100, as CLIP does


def test_pool_regions_reads_the_cells_of_a_planted_box():
    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 8, 8)  # an 8x8 map of a 32-px image: 4 px per cell
    boxes = torch.tensor([[8.0, 12.0, 20.0, 24.0], [0.0, 0.0, 12.0, 12.0]])  # cells x 2..4, y 3..5; x 0..2, y 0..2
    pooled = pool_regions(fmap, torch.tensor([1, 0]), boxes, (32, 32), output_size=3, sampling_ratio=1)
    torch.testing.assert_close(pooled[0], fmap[1, :, 3:6, 2:5])  # bin centres fall on cell centres exactly
    torch.testing.assert_close(pooled[1], fmap[0, :, 0:3, 0:3])


def test_retrieval_accuracy_on_a_hand_case():
    similarity = torch.tensor([
        [0.9, 0.1, 0.0],  # target 0 ranked first
        [0.5, 0.4, 0.1],  # target 1 ranked second
        [0.3, 0.3, 0.3],  # target 2 tied with both others: counted last (rank 2)
    ])  # fmt: skip
    acc = retrieval_accuracy(similarity, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}


def test_region_caption_pairs_follow_the_masks():
    from potpourri.data.synth import CLASSES, make_sample

    sample = make_sample("brick", "test", "multi", 0, size=64)
    pairs = region_caption_pairs([sample])
    assert len(pairs) == len(sample.defects) >= 2
    for pair in pairs:
        ys, xs = np.nonzero(sample.mask == CLASSES.index(pair.defect))
        assert pair.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert pair.caption.endswith("of the brick") and pair.defect.split()[0] in pair.caption
        assert pair.location in pair.caption and pair.asm_text.startswith(f"<ref>{pair.caption}</ref><box>[[")


def test_training_learns_a_planted_region_caption_mapping():
    torch.manual_seed(0)
    n_captions, per_caption = 6, 5
    caption_ids = torch.arange(n_captions).repeat_interleave(per_caption)  # (30,)
    text = torch.nn.functional.normalize(torch.randn(n_captions, 16), dim=-1)
    pooled = torch.nn.functional.one_hot(caption_ids, n_captions).float() + 0.1 * torch.randn(30, n_captions)
    boxes = torch.rand(30, 4).sort(-1).values[:, [0, 1, 2, 3]]  # boxes carry no information
    head = RegionTextHead(n_captions, 16, embed_dim=8, hidden=32, use_box=False)
    before = retrieval_accuracy(head.encode_regions(pooled, boxes) @ head.encode_texts(text).T, caption_ids)[1]
    losses = train_head(head, pooled, boxes, text[caption_ids], caption_ids, steps=150, batch_size=16, lr=3e-3)
    with torch.no_grad():
        after = retrieval_accuracy(head.encode_regions(pooled, boxes) @ head.encode_texts(text).T, caption_ids)[1]
    assert after == 1.0 and before < 0.6
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
