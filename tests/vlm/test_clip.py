"""Our CLIP-style model (clip_vit_tiny_minilm) and its contrastive loop, on tiny random towers: the cached text trunk
equals the full MiniLM forward, the loss is CLIP's where captions are distinct, chance levels are exact, a saved
model reloads to the same embeddings, caption pairs keep their words, and a killed run resumes bitwise."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from potpourri import PotpourriError, create_model
from potpourri.core.training import TrainOptions
from potpourri.data.captions import CaptionPairs, clutter_pairs, concat_pairs, defect_words, synth_pairs
from potpourri.data.synth import make_sample
from potpourri.models.clip_small import load_small_clip
from potpourri.vlm.clip import (
    ClipTrainConfig,
    contrastive_loss,
    embed_images,
    retrieval_scores,
    save_small_clip,
    train_small_clip,
)
from tests.resume import assert_resumes_bitwise

pytestmark = pytest.mark.one_thread

TINY = {
    "vision": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
    "text": {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    "embed_dim": 16,
}


def tiny_clip(tuned: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("clip_vit_tiny_minilm", **TINY, tuned_text_layers=tuned).eval()


@pytest.mark.parametrize("tuned", [0, 1, 3])
def test_cached_trunk_plus_tuned_layers_equals_the_full_minilm_forward(tuned: int) -> None:
    model = tiny_clip(tuned)
    ids, mask = model.tokenize(["a brick surface with no defect", "a close-up of a moon surface with a long crack"])
    with torch.no_grad():
        hidden = model.text.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # the untouched forward
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = model.text_projection(F.normalize(pooled, dim=-1))
        got = model.encode_text(ids, mask)
    assert torch.allclose(got, expected, atol=1e-6)
    trainable = {n.split(".")[3] for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable == {str(i) for i in range(3 - tuned, 3)}  # exactly the last `tuned` layers train


def test_loss_is_clips_cross_entropy_when_captions_are_distinct_and_merges_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(contrastive_loss(image, text, torch.arange(6), scale), clip)
    # two rows with one caption and identical text: each image's target is spread over both columns
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    text_dup = torch.cat([text[:1], text[:1], text[2:]])
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text_dup, dim=-1).T
    targets = (ids[:, None] == ids[None]).float()
    targets = targets / targets.sum(1, keepdim=True)
    manual = (
        -(targets * logits.log_softmax(1)).sum(1).mean() / 2 - (targets * logits.T.log_softmax(1)).sum(1).mean() / 2
    )
    assert torch.allclose(contrastive_loss(image, text_dup, ids, scale), manual)


def test_retrieval_chance_levels_match_enumeration_and_a_planted_match_scores_one() -> None:
    captions = ["a", "a", "b", "c", "c", "c"]
    gallery = ["a", "b", "c"]
    text = torch.eye(3)
    image = torch.stack([text[gallery.index(c)] for c in captions])  # every image on its own caption
    scores = retrieval_scores(image, captions, text, gallery, kinds=["k1", "k1", "k2", "k3", "k3", "k3"], ks=(1, 2))
    assert scores["i2t_r1"] == scores["t2i_r1"] == scores["i2t_kind"] == 1.0
    assert scores["i2t_r1_chance"] == pytest.approx(1 / 3)
    for k in (1, 2):  # P(a random order puts an image of the caption in the first k), over all orders
        orders = list(itertools.permutations(range(6)))
        expected = np.mean([np.mean([any(captions[i] == c for i in order[:k]) for order in orders]) for c in gallery])
        assert scores[f"t2i_r{k}_chance"] == pytest.approx(expected)
    shuffled = retrieval_scores(image[[2, 3, 0, 1, 5, 4]], captions, text, gallery)
    assert shuffled["i2t_r1"] < 1.0


def test_saved_model_reloads_to_identical_embeddings_and_bad_folders_fail_in_one_line(tmp_path: Path) -> None:
    model = tiny_clip(1)
    with torch.no_grad():
        model.visual.pos_embed.add_(0.5)  # any trained change must survive the round trip
    config = {**TINY, "tuned_text_layers": 1, "text_pretrained": False}
    save_small_clip(model, tmp_path / "m", config, "# card\n")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    again = load_small_clip(tmp_path / "m")
    assert torch.equal(embed_images(again, images), embed_images(model, images))
    with torch.no_grad():
        assert torch.equal(again.encode_texts(["a crack"]), model.encode_texts(["a crack"]))
    with pytest.raises(PotpourriError, match="reproduce clip-small"):
        load_small_clip(tmp_path)
    with pytest.raises(PotpourriError, match="no downloadable weights"):
        create_model("clip_vit_tiny_minilm", pretrained=True)
    save_file({"visual.cls_token": torch.zeros(1, 1, 8)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(PotpourriError):
        load_small_clip(tmp_path / "m")


def test_caption_pairs_name_each_defect_without_location_and_clutter_by_shape() -> None:
    sample = make_sample("brick", "train", "crack", 0, size=64)
    words = defect_words(sample.defects[0], 64)
    assert words in sample.caption and "crack" in words and not words.endswith(("center", "left", "right", "top"))
    pairs = concat_pairs(synth_pairs(("brick",), "train", 1, size=64), clutter_pairs(10, size=64))
    assert pairs.images.shape[1:] == (64, 64, 3) and len(pairs) == len(pairs.captions) == len(pairs.sources)
    crops = [c for c, s in zip(pairs.captions, pairs.sources, strict=True) if s == "crop"]
    assert f"a close-up of a brick surface with {words}" in crops
    assert "a close-up of a brick surface with no defect" in crops
    clutter = [c for c, s in zip(pairs.captions, pairs.sources, strict=True) if s == "clutter"]
    assert all(c.endswith("among clutter") and c.split()[1] in ("warm-coloured", "cool-coloured") for c in clutter)
    with pytest.raises(PotpourriError, match="different image shapes"):
        concat_pairs(synth_pairs(("brick",), "train", 1, size=64), clutter_pairs(2, size=32))


def test_training_lowers_the_loss_on_a_planted_pairing() -> None:
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    rng = np.random.default_rng(0)
    names = [list(colours)[i % 4] for i in range(32)]
    images = np.stack([np.clip(np.array(colours[n]) + rng.normal(0, 20, (32, 32, 3)), 0, 255) for n in names])
    pairs = CaptionPairs(images.astype(np.uint8), [f"a {n} square" for n in names], ["image"] * 32)
    model = tiny_clip(0)
    losses = train_small_clip(model, pairs, ClipTrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=2),
                              options=TrainOptions(device="cpu", progress=False))  # fmt: skip
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert all(not p.requires_grad for p in model.text.parameters())


def clip_job(out: str, resume: bool) -> None:
    """Tiny clip, last text layer tuned, 6 steps with checkpoints every 2: what tests/resume.py compares."""
    random.seed(0)
    pairs = synth_pairs(("brick",), "train", 1, size=32)
    model = tiny_clip(1)
    options = TrainOptions(device="cpu", checkpoint_every=2, resume=resume, progress=False)
    losses = train_small_clip(model, pairs, ClipTrainConfig(steps=6, batch_size=8, warmup=1), options=options,
                              folder=Path(out) / "checkpoints")  # fmt: skip
    save_file({**model.trained_state(), "losses": torch.tensor(losses)}, f"{out}/final.safetensors")


@pytest.mark.slow
def test_clip_training_resumes_bitwise_after_a_kill(tmp_path: Path) -> None:
    assert_resumes_bitwise("tests.vlm.test_clip:clip_job", tmp_path, kill_at=3, outputs=["final.safetensors"],
                           checkpoints="checkpoints")  # fmt: skip
