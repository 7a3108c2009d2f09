"""The LM writes SEED image tokens: vocabulary extension, what trains, planted caption -> codes -> nearest image."""

from __future__ import annotations

import pytest
import torch

from potpourri import PotpourriError
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, retrieve_nearest
from potpourri.models.vlm import char_tokenizer, tiny_llama
from potpourri.vlm.seed import ImageTokenWriter, ImageWriterTrainConfig, train_image_writer

K, Q = 8, 4  # codebook size, tokens per image
CAPTIONS = ["a brick with a scratch", "a moss surface, clean"]
CODES = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4]])


pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _writer(lora_rank: int = 4) -> ImageTokenWriter:
    tokenizer = char_tokenizer()
    return ImageTokenWriter(tiny_llama(len(tokenizer), seed=0), tokenizer, K, lora_rank=lora_rank)


def test_vocabulary_gains_k_single_tokens_and_ids_map_back_to_codes() -> None:
    tokenizer = char_tokenizer()
    base = len(tokenizer)
    writer = ImageTokenWriter(tiny_llama(base, seed=0), tokenizer, K)
    assert len(tokenizer) == base + K
    assert writer.lm.get_input_embeddings().weight.shape[0] == base + K
    assert writer.lm.get_output_embeddings().weight.shape[0] == base + K
    ids = tokenizer("x<img_5><img_0>y", add_special_tokens=False)["input_ids"]
    assert ids[1:3] == [writer.vocab.ids[5], writer.vocab.ids[0]]  # one token each, never split into characters
    assert writer.vocab.ids_to_codes(writer.vocab.codes_to_ids(CODES)).tolist() == CODES.tolist()
    assert writer.vocab.ids_to_codes(torch.tensor([ids[0]])).item() == -1  # an ordinary character is no code
    with pytest.raises(PotpourriError, match="already has image tokens"):
        ImageTokenWriter(writer.lm, tokenizer, K)


def test_only_new_vocabulary_rows_and_lora_train() -> None:
    writer = _writer()
    before = {n: p.detach().clone() for n, p in writer.lm.named_parameters()}
    train_image_writer(writer, CAPTIONS, CODES, ImageWriterTrainConfig(steps=2, batch_size=2, progress=False))
    first = writer.first_new
    for name, param in writer.lm.named_parameters():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(param[:first], before[name][:first]), f"old rows of {name} moved"
            assert not torch.equal(param[first:], before[name][first:]), f"new rows of {name} did not train"
        elif ".lora_B" in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        elif ".lora_" not in name:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"


def test_planted_captions_generate_their_codes_and_retrieve_the_same_image() -> None:
    writer = _writer()
    history = train_image_writer(
        writer, CAPTIONS, CODES,
        ImageWriterTrainConfig(steps=60, batch_size=2, vocab_lr=3e-2, lr=3e-3, warmup_steps=5, progress=False),
    )  # fmt: skip
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    codes, valid = writer.generate_codes(CAPTIONS, Q)
    assert codes.tolist() == CODES.tolist() and valid.all()
    free, free_valid = writer.generate_codes(CAPTIONS, Q, constrained=False)
    assert free.tolist() == CODES.tolist() and free_valid.all()  # the LM chooses image tokens on its own
    torch.manual_seed(0)
    tokenizer = SEEDTokenizer(SEEDConfig(feature_dim=16, num_queries=Q, dim=32, heads=2, layers=1, codebook_size=K,
                                         code_dim=8, num_feature_tokens=4)).eval()  # fmt: skip
    gallery = torch.randn(5, 16, 2, 2)
    assert torch.equal(retrieve_nearest(tokenizer, codes, gallery), retrieve_nearest(tokenizer, CODES, gallery))


def test_an_allowed_mask_narrows_each_position_to_its_own_codes() -> None:
    writer = _writer()
    allowed = torch.zeros(Q, K, dtype=torch.bool)
    allowed[:2, :4], allowed[2:, 4:] = True, True  # two "semantic" codes, then two "colour" codes
    codes, valid = writer.generate_codes(CAPTIONS, Q, allowed=allowed)
    assert valid.all() and (codes[:, :2] < 4).all() and (codes[:, 2:] >= 4).all()
    only = torch.zeros(Q, K, dtype=torch.bool)
    only[:, 3] = True  # a single allowed code: greedy must pick it whatever the logits say
    assert writer.generate_codes(CAPTIONS, Q, allowed=only)[0].eq(3).all()
    with pytest.raises(PotpourriError, match="without any image token"):
        writer.generate_codes(CAPTIONS, Q, allowed=torch.zeros(Q, K, dtype=torch.bool))
    with pytest.raises(PotpourriError, match="constrained=True"):
        writer.generate_codes(CAPTIONS, Q, constrained=False, allowed=allowed)
