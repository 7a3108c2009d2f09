"""The V2L tokenizer on tiny shapes: brute-force nearest rows, straight-through gradient, a frozen codebook, and the
in-context scorer against a fake LM whose log-likelihoods are known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.v2l import (
    V2LConfig,
    V2LTokenizer,
    global_words,
    label_logliks,
    nearest_rows,
    prefix_cache,
    word_vocabulary,
)


def _tokenizer(seed: int = 0) -> tuple[V2LTokenizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    table = torch.randn(50, 16)  # a stand-in LLM input-embedding matrix
    ids = torch.arange(10, 40)  # a vocabulary subset
    tok = V2LTokenizer(table[ids], ids, V2LConfig(feature_dim=8, stride=4, decoder_width=8))
    return tok, table, ids


def test_quantised_ids_are_the_brute_force_nearest_rows() -> None:
    tok, table, ids = _tokenizer()
    features = torch.randn(2, 8, 3, 3)
    out = tok(features)
    z = tok.projection(features).detach().permute(0, 2, 3, 1).reshape(-1, 16)
    centre = table[ids].mean(0)  # the codebook is the subset's rows minus their mean row
    for vector, chosen in zip(z, out.ids.flatten(), strict=True):
        rows = [table[i] - centre for i in ids.tolist()]
        cosines = [float(torch.dot(vector, row) / (vector.norm() * row.norm())) for row in rows]
        assert int(chosen) == ids.tolist()[max(range(len(cosines)), key=cosines.__getitem__)]
    assert out.reconstruction.shape == (2, 3, 12, 12)
    assert torch.equal(tok.tokenize(features), out.ids.flatten(1))


def test_nearest_rows_chunks_agree_with_one_block() -> None:
    torch.manual_seed(1)
    z, book = torch.randn(37, 5), torch.randn(11, 5)
    assert torch.equal(nearest_rows(z, book, chunk=4), nearest_rows(z, book, chunk=1000))


def test_straight_through_gradient_reaches_the_projection_and_the_codebook_stays_bit_identical() -> None:
    tok, table, _ = _tokenizer()
    frozen = table.clone()
    book_before = tok.codebook.clone()
    opt = torch.optim.Adam(tok.parameters(), lr=1e-2)
    assert all(p.data_ptr() != tok.codebook.data_ptr() for p in tok.parameters())
    for _ in range(3):
        out = tok(torch.randn(2, 8, 2, 2))
        loss = out.reconstruction.abs().mean()  # the reconstruction alone: its gradient must pass the quantiser
        opt.zero_grad()
        loss.backward()
        grad = tok.projection[0].weight.grad
        assert grad is not None and grad.abs().sum() > 0
        opt.step()
    assert torch.equal(table, frozen) and torch.equal(tok.codebook, book_before)
    assert "codebook" not in tok.state_dict()  # never saved: rebuilt from the LLM


def test_decode_ids_matches_decode_index_and_rejects_foreign_ids() -> None:
    tok, _, _ = _tokenizer()
    out = tok(torch.randn(1, 8, 2, 2))
    assert torch.allclose(tok.decode_ids(out.ids), tok.decode_index(out.index))
    with pytest.raises(PotpourriError, match="not in this tokenizer"):
        tok.decode_ids(torch.zeros(1, 2, 2, dtype=torch.long))


def test_vocab_projector_starts_as_the_frozen_quantiser_and_only_the_codebook_loss_moves_it() -> None:
    tok, table, ids = _tokenizer()
    torch.manual_seed(0)
    projected = V2LTokenizer(table[ids], ids, V2LConfig(feature_dim=8, stride=4, decoder_width=8, vocab_projector=True))
    projected.projection.load_state_dict(tok.projection.state_dict())
    features = torch.randn(2, 8, 3, 3)
    assert torch.equal(projected(features).ids, tok(features).ids)  # identity at the start: the same words
    frozen, rows = table.clone(), projected.rows.clone()
    out = projected(features)
    z = F.normalize(projected.projection(features), dim=1).permute(0, 2, 3, 1).reshape(-1, 16).detach()
    chosen = projected.codebook[out.index.flatten()]
    expected = 0.25 * F.mse_loss(z, chosen.detach()) + F.mse_loss(chosen, z)  # beta·commitment + codebook loss
    torch.testing.assert_close(out.vq_loss, expected)
    out.vq_loss.backward()
    assert projected.vocab_projector.weight.grad.abs().sum() > 0  # the codebook loss trains the projector
    opt = torch.optim.SGD(projected.vocab_projector.parameters(), lr=1.0)
    opt.step()
    assert not torch.equal(projected.codebook, rows)  # the codebook moved ...
    assert torch.equal(projected.rows, rows) and torch.equal(table, frozen)  # ... the vocabulary rows did not
    assert {"vocab_projector.weight", "vocab_projector.bias"} <= set(projected.state_dict())
    assert "rows" not in projected.state_dict()
    assert set(projected(features).ids.unique().tolist()) <= set(ids.tolist())  # still the LLM's words


def test_global_words_are_the_most_similar_vocabulary_words_in_order() -> None:
    words = torch.eye(4)  # four orthogonal word embeddings, ids 100..103
    ids = torch.tensor([100, 101, 102, 103])
    image = torch.tensor([[0.1, 0.9, 0.0, 0.5], [2.0, 0.0, 1.0, 0.0]])  # scale does not matter: cosine
    assert global_words(image, words, ids, 2).tolist() == [[101, 103], [100, 102]]
    with pytest.raises(PotpourriError, match="3 word embeddings for 4"):
        global_words(image, words[:3], ids, 2)


class BigramLM(nn.Module):
    """A fake causal LM: the next-token logits depend on the current token only (a known table)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        history = (past_key_values or []) + input_ids[0].tolist()  # a "cache" that the scorer must copy, not share
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=history)


def test_scorer_picks_the_planted_label_with_the_bigram_log_likelihoods() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 12)
    lm = BigramLM(logits.clone())
    logp = logits.log_softmax(-1)
    query, labels = [3, 4, 5], [[7], [8, 9], [10, 11, 2]]
    expected = torch.tensor([logp[5, 7], logp[5, 8] + logp[8, 9], logp[5, 10] + logp[10, 11] + logp[11, 2]])
    prefix = prefix_cache(lm, [1, 2])
    scores = label_logliks(lm, prefix, query, labels)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert prefix[1] == [1, 2]  # scoring extended a copy of the prefix cache
    planted = torch.full((12, 12), -5.0)
    planted[5, 8], planted[8, 9] = 5.0, 5.0  # label 1 is the only likely continuation
    assert int(label_logliks(BigramLM(planted), prefix, query, labels).argmax()) == 1


def test_word_vocabulary_keeps_spaced_lower_case_words_in_id_order() -> None:
    vocab = {"Ġthe": 5, "Ġcat": 9, "ĠDog": 3, "Ġa": 1, "Ġ12ab": 7, "word": 2, "Ġcrack": 4}
    ids = word_vocabulary(SimpleNamespace(get_vocab=lambda: vocab), limit=2, min_letters=3)
    assert ids.tolist() == [4, 5]  # "crack", "the": lower-case words with >= 3 letters, lowest ids first


def test_cached_scores_equal_one_uncached_forward_of_a_tiny_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    prefix, query, labels = [1, 5, 6, 7], [8, 9], [[10], [11, 12], [13, 14, 15]]
    expected = []
    for label in labels:  # the reference: one forward of the whole sequence, no cache
        with torch.no_grad():
            logp = lm(input_ids=torch.tensor([prefix + query + label])).logits[0].log_softmax(-1)
        start = len(prefix) + len(query)
        expected.append(sum(float(logp[start - 1 + i, t]) for i, t in enumerate(label)))
    cached = prefix_cache(lm, prefix)
    first = label_logliks(lm, cached, query, labels)
    assert torch.allclose(first, torch.tensor(expected), atol=1e-4)
    assert torch.allclose(label_logliks(lm, cached, query, labels), first)  # the shared prefix cache is unchanged
