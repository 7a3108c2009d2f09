"""SSPrompt on a tiny random SAM: shapes, the learned space contains the click prompt, only the prompt trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.models.sam import Sam, SamConfig
from potpourri.segment.sam_prompt import (
    LearnedPrompt,
    PromptConfig,
    decode_embeddings,
    image_embeddings,
    learn_prompt,
    segment_with_prompt,
)

SIZE = 64  # tiny stand-in encoder: stride 16 → 4×4 embeddings, masks at 16×16


def tiny_sam(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    config = SamConfig(backbone="none", image_size=SIZE, prompt_dim=16, num_heads=2, mlp_dim=32, iou_hidden=16)
    return Sam(config, backbone=None).eval()


def planted(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images with a bright square at a random place; the target is the square."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 120, (n, SIZE, SIZE, 3)).astype(np.uint8)
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        y, x = rng.integers(4, SIZE - 28, 2)
        masks[i, y : y + 24, x : x + 24] = True
        images[i][masks[i]] = (240, 230, 30)
    return images, masks


def test_prompt_shapes_and_masks():
    sam = tiny_sam()
    prompt = LearnedPrompt(sam.prompt_encoder, anchor_points=torch.tensor([[10.0, 20.0], [40.0, 30.0]]))
    sparse, dense = prompt(sam.prompt_encoder, 3)
    assert sparse.shape == (3, 3, 16)  # two clicks and the "not a point" pad
    assert dense.shape == (3, 16, 4, 4)
    images, _ = planted(5)
    masks = segment_with_prompt(sam, prompt, image_embeddings(sam, images))
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == bool


def test_initial_prompt_equals_the_encoders_click_prompt():
    sam = tiny_sam()
    click = torch.tensor([[[21.0, 37.0]]])
    prompt = LearnedPrompt(sam.prompt_encoder, anchor_points=click[0])
    sparse, dense = prompt(sam.prompt_encoder, 1)
    expected_sparse, expected_dense = sam.prompt_encoder(click, torch.tensor([[1]]), None, 1)
    torch.testing.assert_close(sparse, expected_sparse, rtol=0, atol=1e-6)  # a·e + (1-a)·e = e up to rounding
    torch.testing.assert_close(dense, expected_dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("branch", ["learned tokens", "learned tokens, dense vector", "encoder branch"])
def test_learned_embedding_reproduces_the_coordinate_prompt_exactly(branch):
    sam = tiny_sam()
    images, _ = planted(2)
    features = sam.backbone_features(images)
    click, labels = torch.tensor([[[45.0, 12.0]]]), torch.tensor([[1]])
    expected_masks, expected_iou = sam.decode(features, click.expand(2, -1, -1), labels.expand(2, -1),
                                              multimask_output=False)  # fmt: skip
    with torch.no_grad():
        if branch.startswith("learned tokens"):  # anchor elsewhere; the learned tokens carry the click, blend 0
            vector = branch.endswith("vector")
            prompt = LearnedPrompt(sam.prompt_encoder, anchor_points=torch.tensor([[3.0, 60.0]]), dense_map=not vector)
            sparse, dense = sam.prompt_encoder(click, labels, None, 1)
            prompt.spatial_tokens.copy_(sparse[0])
            prompt.semantic_dense.copy_(dense[0, :, :1, :1] if vector else dense[0])
            assert prompt.semantic_dense.shape == ((16, 1, 1) if vector else (16, 4, 4))
            prompt.sparse_blend.fill_(0.0)
            prompt.dense_blend.fill_(0.0)
        else:  # the anchor is the click and the blend weight 1: the encoder's own tokens
            prompt = LearnedPrompt(sam.prompt_encoder, anchor_points=click[0])
            prompt.spatial_tokens.normal_()
            prompt.semantic_dense.normal_()
            prompt.sparse_blend.fill_(1.0)
            prompt.dense_blend.fill_(1.0)
        embeddings = sam.image_encoder.neck(features)
        sparse, dense = prompt(sam.prompt_encoder, 2)
        masks, iou = decode_embeddings(sam, embeddings, sparse, dense)
    assert torch.equal(masks, expected_masks) and torch.equal(iou, expected_iou)


def test_only_the_prompt_trains_and_the_sam_stays_bit_identical():
    sam = tiny_sam()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    images, masks = planted(4)
    start = LearnedPrompt(sam.prompt_encoder)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    prompt, _ = learn_prompt(sam, image_embeddings(sam, images), masks, PromptConfig(steps=2, batch_size=2),
                             prompt=start)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())
    assert all(not p.requires_grad for p in sam.parameters())
    changed = {k for k, v in prompt.state_dict().items() if not torch.equal(initial[k], v)}
    assert changed == {"anchor_points", "spatial_tokens", "semantic_dense", "sparse_blend", "dense_blend"}


def test_coordinate_mode_moves_only_the_clicks():
    sam = tiny_sam()
    images, masks = planted(4)
    start = LearnedPrompt(sam.prompt_encoder)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    prompt, _ = learn_prompt(sam, image_embeddings(sam, images), masks,
                             PromptConfig(mode="coordinates", steps=2, batch_size=2), prompt=start)  # fmt: skip
    changed = {k for k, v in prompt.state_dict().items() if not torch.equal(initial[k], v)}
    assert changed == {"anchor_points", "sparse_blend", "dense_blend"}  # blends pinned to 1 by set_mode
    assert torch.all(prompt.sparse_blend == 1) and torch.all(prompt.dense_blend == 1)
    with pytest.raises(PotpourriError, match="unknown prompt mode"):
        prompt.set_mode("text")


def test_learning_recovers_a_planted_prompt():
    """The target masks are the frozen SAM's own output for a hidden prompt, so a perfect prompt exists."""
    sam = tiny_sam()
    images, _ = planted(8)
    embeddings = image_embeddings(sam, images)
    hidden = LearnedPrompt(sam.prompt_encoder, anchor_points=torch.tensor([[45.0, 12.0]]))
    with torch.no_grad():
        hidden.spatial_tokens.normal_()
        hidden.semantic_dense.normal_()
        hidden.sparse_blend.fill_(0.0)
        hidden.dense_blend.fill_(0.0)
    targets = segment_with_prompt(sam, hidden, embeddings)
    prompt, losses = learn_prompt(sam, embeddings, targets, PromptConfig(steps=80, batch_size=4, lr=0.1))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])

    def miou(pred: np.ndarray) -> float:
        return float(np.mean([(p & t).sum() / max(1, (p | t).sum()) for p, t in zip(pred, targets, strict=True)]))

    before = miou(segment_with_prompt(sam, LearnedPrompt(sam.prompt_encoder), embeddings))
    after = miou(segment_with_prompt(sam, prompt, embeddings))
    assert after > before + 0.15, (before, after)


@pytest.mark.slow
def test_ssprompt_cli_on_a_saved_tiny_sam(tmp_path):
    from potpourri.cli import main

    tiny_sam().save(tmp_path / "sam")
    rc = main(["ssprompt", "--sam", str(tmp_path / "sam"), "--image-size", str(SIZE), "--steps", "2",
               "--segmenter-steps", "2", "--out", str(tmp_path / "run")])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sam_unchanged"] is True
    classes = [r["class"] for r in summary["rows"]]
    assert classes[-2:] == ["mean over classes", "mean over regions"] and len(classes) >= 4
    assert "oracle centre click (1 click)" in (tmp_path / "run" / "results.md").read_text()


def test_a_pretrained_here_sam_depends_on_the_run_seed_not_on_the_process_random_state(tmp_path):
    from types import SimpleNamespace

    from potpourri.core.training import TrainOptions
    from potpourri.segment.sam_prompt import load_or_pretrain_sam

    def build(process_seed: int, run_seed: int) -> dict:
        torch.manual_seed(process_seed)  # whatever ran before in this process
        cfg = SimpleNamespace(image_size=64, sam_steps=1, sam_per_category=1, seed=run_seed)
        sam = load_or_pretrain_sam(
            None, cfg, tmp_path / f"sam{process_seed}{run_seed}", options=TrainOptions(progress=False)
        )
        return sam.state_dict()

    first, second, other = build(1, 0), build(2, 0), build(1, 5)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []  # the same run seed: bit-identical SAM
    assert not all(torch.equal(first[k], other[k]) for k in first)  # another run seed: another SAM
