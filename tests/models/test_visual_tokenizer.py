"""SEED-style visual tokenizer: causal queries, straight-through VQ, EMA formula, dead-code restarts, LM vocabulary."""

from __future__ import annotations

import pytest
import torch

from potpourri import PotpourriError
from potpourri.models.visual_tokenizer import (
    CausalQFormer,
    SEEDConfig,
    SEEDTokenizer,
    VectorQuantizer,
    add_image_tokens,
    codebook_usage,
    load_tokenizer,
    retrieve_nearest,
    save_tokenizer,
)
from potpourri.models.vlm import char_tokenizer, tiny_llama
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _tiny(**kwargs) -> SEEDTokenizer:
    torch.manual_seed(0)
    cfg = dict(feature_dim=16, num_queries=8, dim=32, heads=2, layers=2, codebook_size=16, code_dim=8)
    return SEEDTokenizer(SEEDConfig(**{**cfg, **kwargs}))


def test_query_self_attention_is_causal():
    torch.manual_seed(0)
    qformer = CausalQFormer(16, num_queries=6, dim=32, heads=2, layers=2).eval()
    features = torch.randn(2, 9, 16)
    queries = qformer.queries.detach().expand(2, -1, -1).clone()
    base = qformer(features, queries)
    for j in range(6):
        changed = queries.clone()
        changed[:, j] += torch.randn(2, 32)
        out = qformer(features, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j])  # earlier queries never see query j
        assert (out[:, j:] - base[:, j:]).abs().amax() > 1e-4  # query j (and later) do
    # and the mask is really in use: without it an early query would move
    for block in qformer.blocks:
        block.causal = False
    changed = queries.clone()
    changed[:, 5] += torch.randn(2, 32)  # (a constant shift would vanish in LayerNorm)
    assert (qformer(features, changed)[:, 0] - qformer(features, queries)[:, 0]).abs().amax() > 1e-4


def test_quantizer_picks_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8).eval()
    z = torch.randn(5, 7, 8)
    quantised, indices, _ = vq(z)
    expected = torch.cdist(z.reshape(-1, 8), vq.codebook.detach()).argmin(1).view(5, 7)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(quantised, vq.codebook.detach()[expected])


def test_straight_through_passes_gradients_to_encoder():
    model = _tiny()
    model.train()
    out = model(torch.randn(4, 16, 2, 2))
    out.recon_loss.backward()  # reconstruction only: any encoder gradient must come through the quantiser
    grad = model.qformer.queries.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.to_code.weight.grad.abs().sum() > 0
    # the straight-through identity: d recon / d z equals d recon / d quantised
    z = torch.randn(3, 8, requires_grad=True)
    quantised, _, _ = model.quantizer(z)
    weights = torch.randn(3, 8)
    (quantised * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_ema_update_matches_formula_by_hand():
    vq = VectorQuantizer(2, 1, ema=True, ema_decay=0.5, eps=0.0)
    with torch.no_grad():
        vq.codebook.data = torch.tensor([[0.0], [10.0]])
        vq.ema_sum.copy_(torch.tensor([[0.0], [10.0]]))
        vq.ema_count.copy_(torch.tensor([1.0, 1.0]))
    vq.train()
    vq(torch.tensor([[1.0], [3.0], [8.0]]))  # codes 0, 0, 1
    # N = 0.5*[1,1] + 0.5*[2,1] = [1.5, 1.0]; m = 0.5*[0,10] + 0.5*[4,8] = [2, 9]; total 2.5, eps 0 -> e = m/N
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(vq.ema_sum, torch.tensor([[2.0], [9.0]]))
    torch.testing.assert_close(vq.codebook.detach(), torch.tensor([[2.0 / 1.5], [9.0]]))


def test_dead_code_is_restarted_from_recent_outputs():
    vq = VectorQuantizer(3, 2, recent_size=8)
    with torch.no_grad():
        vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])  # code 2 is out of reach
    vq.train()
    z = torch.tensor([[0.1, 0.0], [0.9, 1.1], [0.0, 0.2], [1.2, 0.8]])
    _, indices, _ = vq(z)
    assert 2 not in indices.tolist()
    dead = vq.restart_dead_codes(1.0, generator=torch.Generator().manual_seed(0))
    assert dead.tolist() == [2]
    new_code = vq.codebook.detach()[2]
    assert any(torch.equal(new_code, row) for row in z)  # restarted to one of the recent encoder outputs
    torch.testing.assert_close(vq.codebook.detach()[:2], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert vq.usage.sum() == 0


def test_loss_decreases_on_planted_task_and_tokens_retrieve_kind():
    torch.manual_seed(0)
    prototypes = torch.randn(6, 16, 2, 2) * 3  # planted: 6 image "kinds", small noise around each
    labels = torch.arange(120) % 6
    features = prototypes[labels] + 0.1 * torch.randn(120, 16, 2, 2)
    cfg = TokenizerTrainConfig(steps=120, batch_size=24, lr=3e-3, restart_every=20, progress=False)
    model = _tiny(target="tokens", num_feature_tokens=4)
    history = train_tokenizer(model, features, cfg)
    assert sum(history.loss[-10:]) / 10 < 0.5 * sum(history.loss[:10]) / 10
    # decoded tokens retrieve an image of the same planted kind far above chance (1/6)
    found = retrieve_nearest(model, model.tokenize(features), features)
    assert (labels[found] == labels).double().mean() > 0.9
    usage = codebook_usage(model.tokenize(features), 16)
    assert 0 < usage["used_fraction"] <= 1 and 1 <= usage["perplexity"] <= 16


def test_codebook_usage_formula():
    usage = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert usage["used_fraction"] == 0.5
    assert usage["perplexity"] == pytest.approx(2.0)


def test_vocabulary_extension_adds_exactly_k_tokens():
    tokenizer = char_tokenizer()
    lm = tiny_llama(len(tokenizer), hidden=32, layers=1)
    before_vocab, before_rows = len(tokenizer), lm.get_input_embeddings().weight.shape[0]
    old_rows = lm.get_input_embeddings().weight.detach().clone()
    vocab = add_image_tokens(lm, tokenizer, 16)
    assert len(tokenizer) == before_vocab + 16
    assert lm.get_input_embeddings().weight.shape[0] == before_rows + 16
    assert lm.get_output_embeddings().weight.shape[0] == before_rows + 16
    torch.testing.assert_close(lm.get_input_embeddings().weight[:before_rows].detach(), old_rows)
    codes = torch.tensor([[3, 0, 15, 7]])
    ids = vocab.codes_to_ids(codes)
    assert ids.min() >= before_vocab
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    # the string form tokenises to the same ids, one token per code
    text_ids = tokenizer(vocab.text(codes[0]), add_special_tokens=False)["input_ids"]
    assert text_ids == ids[0].tolist()
    assert vocab.ids_to_codes(torch.tensor([0, 5])).tolist() == [-1, -1]  # text ids are not image codes
    logits = lm(input_ids=ids).logits  # the LM can score (hence emit) image tokens
    assert logits.shape[-1] == before_rows + 16
    with pytest.raises(PotpourriError, match="already has image tokens"):
        add_image_tokens(lm, tokenizer, 16)


def test_save_load_roundtrip(tmp_path):
    model = _tiny(ema=True).eval()
    features = torch.randn(3, 16, 2, 2)
    path = save_tokenizer(model, tmp_path / "seed.safetensors")
    loaded = load_tokenizer(path)
    assert loaded.config == model.config
    assert torch.equal(loaded.tokenize(features), model.tokenize(features))
    torch.testing.assert_close(loaded.decode(model.tokenize(features)), model.decode(model.tokenize(features)))
    (tmp_path / "seed.json").unlink()
    with pytest.raises(PotpourriError, match="missing"):
        load_tokenizer(path)


def test_bad_inputs_raise_one_line():
    with pytest.raises(PotpourriError, match="unknown reconstruction target"):
        SEEDTokenizer(SEEDConfig(target="pixels"))
    model = _tiny()
    with pytest.raises(PotpourriError, match="image tokens must lie"):
        model.decode(torch.tensor([[16] * 8]))
