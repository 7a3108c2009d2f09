"""A V2L-style tokenizer: an image becomes words of a FROZEN LLM's own vocabulary (local tokens) plus a decoder.

After *Beyond Text: Frozen Large Language Models in Visual Signal Comprehension* (Zhu et al., CVPR 2024,
arXiv:2403.07874). Reading order: ``nearest_rows`` (cosine nearest neighbour, the quantiser's core) →
``V2LTokenizer`` (frozen feature map → trainable projection into the LLM's token-embedding space → quantisation
against the frozen input-embedding rows of a vocabulary subset, straight-through estimator, commitment loss →
a small conv decoder back to pixels) → ``word_vocabulary`` (which rows form the codebook) → ``label_logliks``
(in-context scoring of candidate labels by a frozen causal LM, prefix cached once).

Differences from the paper, on purpose: the frozen encoder is EfficientNet-Lite0 (not CLIP-ViT); the codebook is
the SmolLM2 input-embedding rows, centred (mean row subtracted) and compared by cosine, optionally through a
trainable linear projector of the vocabulary rows as in the paper (``vocab_projector``: identity at the start,
trained by the VQ codebook loss; the ids stay the LLM's words); the decoder is a small conv stack trained here (no
VQGAN / perceptual / GAN losses).
The vocabulary rows are a non-persistent buffer copied from the LLM: nothing here can change the LLM's weights.

Example:
    table = lm.lm.get_input_embeddings().weight                     # (49152, 576), frozen
    ids = word_vocabulary(lm.tokenizer, limit=8000)                   # (V,) real vocabulary ids
    tok = V2LTokenizer(table[ids], ids, V2LConfig(feature_dim=112, stride=16))
    out = tok(features)                                               # features: (B, 112, h, w) from frozen Lite0
    out.ids                                                           # (B, h, w) vocabulary ids -> detokenise
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.vlm import cache_kwarg

__all__ = ["V2LConfig", "V2LOutput", "V2LTokenizer", "global_words", "label_logliks", "nearest_rows", "prefix_cache",
           "word_vocabulary"]  # fmt: skip


def nearest_rows(z: torch.Tensor, codebook: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Index (N,) of the codebook row (V, D) with the largest cosine similarity to each row of ``z`` (N, D)."""
    z = F.normalize(z, dim=-1)
    book = F.normalize(codebook, dim=-1)
    return torch.cat([(z[i : i + chunk] @ book.T).argmax(dim=-1) for i in range(0, z.shape[0], chunk)])


@dataclass
class V2LConfig:
    """Shapes and loss weights; the codebook's width comes from the LLM."""

    feature_dim: int = 112  # channels of the frozen map (Lite0 blocks.4: 112 at stride 16)
    stride: int = 16  # image pixels per token side; the decoder upsamples by this (a power of two)
    decoder_width: int = 64
    beta: float = 0.25  # commitment weight
    vocab_projector: bool = False  # the paper's trainable projector of the frozen rows (then a codebook loss trains it)
    codebook_weight: float = 1.0  # weight of the codebook loss ||sg(z) - P(e)||² (with the projector only)
    centre: bool = True  # subtract the mean row first: raw LLM embeddings share one direction, and cosine
    # against them snaps every projected vector to a handful of hub words (4 of 8,000 in our first run)


@dataclass
class V2LOutput:
    """What one forward pass gives: vocabulary ids, the reconstruction, and the loss parts."""

    ids: torch.Tensor  # (B, h, w) LLM vocabulary ids
    index: torch.Tensor  # (B, h, w) rows of the codebook subset
    reconstruction: torch.Tensor  # (B, 3, H, W) in the encoder's normalised pixel space
    vq_loss: torch.Tensor  # () commitment (+ the projector's codebook loss)


class V2LTokenizer(nn.Module):
    """Local tokens: project a frozen feature map onto the frozen vocabulary rows, quantise, decode to pixels."""

    def __init__(self, codebook: torch.Tensor, vocab_ids: torch.Tensor, config: V2LConfig | None = None) -> None:
        super().__init__()
        self.config = config or V2LConfig()
        if codebook.ndim != 2 or codebook.shape[0] != vocab_ids.shape[0]:
            raise PotpourriError(f"codebook {tuple(codebook.shape)} must be (V, D) with V = {vocab_ids.shape[0]} ids")
        stages = self.config.stride.bit_length() - 1
        if self.config.stride != 2**stages or stages < 1:
            raise PotpourriError(f"stride {self.config.stride} must be a power of two >= 2 (16 for Lite0 blocks.4)")
        dim, width = codebook.shape[1], self.config.decoder_width
        # frozen: a buffer, never a parameter; not saved (rebuilt from the LLM + vocab_ids on load)
        rows = codebook.detach().clone().float()
        rows = rows - rows.mean(0) if self.config.centre else rows
        self.register_buffer("rows", F.normalize(rows, dim=-1), persistent=False)
        self.vocab_projector = None
        if self.config.vocab_projector:  # starts as the identity: the first quantisation is the frozen one
            self.vocab_projector = nn.Linear(dim, dim)
            with torch.no_grad():
                self.vocab_projector.weight.copy_(torch.eye(dim))
                self.vocab_projector.bias.zero_()
        self.register_buffer("vocab_ids", vocab_ids.detach().clone().long())
        self.projection = nn.Sequential(
            nn.Conv2d(self.config.feature_dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 1)
        )  # into the token-embedding space
        layers: list[nn.Module] = [nn.Conv2d(dim, width, 3, padding=1), nn.GELU()]
        for _ in range(stages):  # the width halves as the resolution doubles (down to 16): the cost stays flat
            narrower = max(16, width // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, narrower, 3, padding=1), nn.GELU()]
            width = narrower
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    @property
    def codebook(self) -> torch.Tensor:
        """The unit rows (V, D) that tokens are quantised against: the frozen vocabulary rows, through the projector
        when there is one (then differentiable in the projector only)."""
        if self.vocab_projector is None:
            return self.rows
        return F.normalize(self.vocab_projector(self.rows), dim=-1)

    def quantise(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through quantised (B, D, h, w), codebook index (B, h, w), VQ loss: β·commitment, plus the
        codebook loss that trains the projector when there is one)."""
        z = F.normalize(self.projection(features), dim=1)  # (B, D, h, w), unit length like the codebook rows
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        book = self.codebook
        index = nearest_rows(flat.detach(), book.detach())  # (B*h*w,)
        chosen = book[index]  # (B*h*w, D); the LLM's rows stay as they are either way
        vq_loss = self.config.beta * F.mse_loss(flat, chosen.detach())
        if self.vocab_projector is not None:
            vq_loss = vq_loss + self.config.codebook_weight * F.mse_loss(chosen, flat.detach())
        straight = flat + (chosen - flat).detach()  # forward: the word's row; backward: identity to the projection
        return straight.view(b, h, w, d).permute(0, 3, 1, 2), index.view(b, h, w), vq_loss

    def decode_index(self, index: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) from codebook indices (B, h, w)."""
        return self.decoder(self.codebook[index].permute(0, 3, 1, 2))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) from LLM vocabulary ids (B, h, w) that belong to the codebook."""
        match = ids.unsqueeze(-1) == self.vocab_ids  # (B, h, w, V)
        if not bool(match.any(-1).all()):
            raise PotpourriError("some ids are not in this tokenizer's vocabulary subset; decode ids it produced")
        return self.decode_index(match.float().argmax(-1))

    def forward(self, features: torch.Tensor) -> V2LOutput:
        quantised, index, vq_loss = self.quantise(features)  # (B, D, h, w)
        return V2LOutput(self.vocab_ids[index], index, self.decoder(quantised), vq_loss)

    @torch.no_grad()
    def tokenize(self, features: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (B, h*w), row-major: the image's local words."""
        _, index, _ = self.quantise(features)
        return self.vocab_ids[index].flatten(1)


def word_vocabulary(tokenizer: Any, *, limit: int = 8000, min_letters: int = 3) -> torch.Tensor:
    """Ids (V,) of the first ``limit`` vocabulary entries that are a space + a lower-case alphabetic word (BPE
    merges come roughly in frequency order, so the lowest ids are the most frequent words)."""
    vocab = tokenizer.get_vocab()  # token string -> id; "Ġ" marks a leading space in byte-level BPE
    words = sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower()
                   and len(t) > min_letters and t[1:].isascii())  # fmt: skip
    if not words:
        raise PotpourriError("the tokenizer has no 'Ġword' entries; pass a byte-level BPE tokenizer (SmolLM2)")
    return torch.tensor(words[:limit], dtype=torch.long)


def global_words(image_emb: torch.Tensor, word_emb: torch.Tensor, vocab_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's global tokens: per image (N, D), the ids (N, k) of the ``k`` vocabulary words whose text
    embedding (V, D), in the same image-text space, is most cosine-similar, most similar first."""
    if word_emb.shape[0] != vocab_ids.shape[0]:
        raise PotpourriError(f"{word_emb.shape[0]} word embeddings for {vocab_ids.shape[0]} vocabulary ids")
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(word_emb, dim=-1).T  # (N, V)
    return vocab_ids[sims.topk(k, dim=-1).indices]


def _extend(lm: nn.Module, ids: Sequence[int], cache: Any) -> tuple[torch.Tensor, Any]:
    """Run ``ids`` after ``cache`` (None: from scratch); (log-probs (T, vocab), the new cache)."""
    device = next(lm.parameters()).device
    out = lm(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{cache_kwarg(lm): cache})
    cache = getattr(out, "cache", None)  # transformers >= 5.24 names it ``cache``
    return out.logits[0].float().log_softmax(-1), cache if cache is not None else out.past_key_values


@torch.no_grad()
def prefix_cache(lm: nn.Module, ids: Sequence[int]) -> tuple[torch.Tensor, Any]:
    """(log-probs of the next token after ``ids`` (vocab,), the key/value cache of ``ids``), to share a prompt."""
    logprobs, cache = _extend(lm, ids, None)
    return logprobs[-1], cache


@torch.no_grad()
def label_logliks(
    lm: nn.Module, prefix: tuple[torch.Tensor, Any] | None, query: Sequence[int], labels: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Summed log-likelihood (L,) of each label's tokens after ``prefix`` (from ``prefix_cache``, or None) +
    ``query``; the LM is a Hugging Face causal LM (``input_ids``, ``use_cache`` and its KV-cache keyword)."""
    if not query:
        raise PotpourriError("the query is empty; it must at least hold the image's tokens and the separator")
    cache = copy.deepcopy(prefix[1]) if prefix is not None else None  # the LM extends a cache in place
    logprobs, cache = _extend(lm, query, cache)
    last = logprobs[-1]
    scores = []
    for label in labels:
        if not label:
            raise PotpourriError("a label has no tokens; every class name must tokenise to at least one id")
        total = float(last[label[0]])
        if len(label) > 1:
            rest, _ = _extend(lm, label[:-1], copy.deepcopy(cache))  # (m-1, vocab): predicts tokens 2..m
            total += float(sum(rest[i, t] for i, t in enumerate(label[1:])))
        scores.append(total)
    return torch.tensor(scores)
