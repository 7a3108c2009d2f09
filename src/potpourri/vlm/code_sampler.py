"""A caption-conditioned sampler of SEED image tokens: a small causal transformer that writes an image's codes.

The stand-in, at CPU scale, for "the LM writes an image" (``vlm/seed.py``'s ImageTokenWriter puts the codes into
SmolLM2): here a 2-layer causal transformer trained from scratch reads a frozen caption embedding (MiniLM-L6) as its
first position and predicts the image's Q codes left to right (next-token cross-entropy, teacher forcing). Sampling
draws the codes one at a time (temperature, optional top-k); the pixel decoder (``vlm/seed_decoder``) then turns them
into pixels, so a caption gives a new image instead of the nearest stored one.

Example:
    sampler = CodeSampler(CodeSamplerConfig(codebook_size=256, num_codes=32, cond_dim=384))
    train_code_sampler(sampler, caption_embeddings, tokens, CodeSamplerTrainConfig(steps=400))
    tokens = sampler.sample(new_caption_embeddings, generator=torch.Generator().manual_seed(0))   # (B, 32)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.visual_tokenizer import causal_mask

__all__ = ["CodeSampler", "CodeSamplerConfig", "CodeSamplerTrainConfig", "train_code_sampler"]


@dataclass
class CodeSamplerConfig:
    """Shapes of the sampler."""

    codebook_size: int = 256  # K: the tokenizer's codebook
    num_codes: int = 32  # Q: tokens per image
    cond_dim: int = 384  # width of the caption embedding
    dim: int = 128
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1


class CodeSampler(nn.Module):
    """Caption embedding ``(B, cond_dim)`` + codes ``(B, Q)`` → next-code logits ``(B, Q, K)`` (position i predicts
    code i from the caption and codes < i)."""

    def __init__(self, config: CodeSamplerConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or CodeSamplerConfig()
        self.cond = nn.Linear(cfg.cond_dim, cfg.dim)
        self.embed = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.num_codes, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)

    def forward(self, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cond.ndim != 2 or cond.shape[1] != cfg.cond_dim or codes.ndim != 2 or codes.shape[0] != cond.shape[0]:
            raise PotpourriError(f"captions (B, {cfg.cond_dim}) and codes (B, <= {cfg.num_codes}); got "
                                 f"{tuple(cond.shape)} and {tuple(codes.shape)}")  # fmt: skip
        if codes.shape[1] > cfg.num_codes:
            raise PotpourriError(f"{codes.shape[1]} codes; this sampler writes {cfg.num_codes} per image")
        prefix = codes[:, : cfg.num_codes - 1]  # the last code is never an input
        x = torch.cat([self.cond(cond)[:, None], self.embed(prefix)], 1)  # (B, 1 + n, D)
        x = x + self.pos[: x.shape[1]]
        mask = causal_mask(x.shape[1], x.device)
        return self.head(self.norm(self.blocks(x, mask=mask)))  # (B, 1 + n, K)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        allowed: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Write ``(B, Q)`` codes for captions ``(B, cond_dim)``, one position at a time; ``temperature`` 0 is
        greedy, ``top_k`` > 0 keeps the k most likely codes at each step, ``allowed`` ``(Q, K)`` bool restricts
        each position to some codes (e.g. a part of the vocabulary)."""
        if temperature < 0 or top_k < 0:
            raise PotpourriError(f"temperature {temperature} and top_k {top_k} must be >= 0")
        shape = (self.config.num_codes, self.config.codebook_size)
        if allowed is not None and (allowed.shape != shape or not bool(allowed.any(1).all())):
            raise PotpourriError(f"allowed must be a {shape} bool mask with some code allowed at every position")
        was_training = self.training
        self.eval()
        codes = torch.zeros(cond.shape[0], 0, dtype=torch.long, device=cond.device)
        for _ in range(self.config.num_codes):
            logits = self(cond, codes)[:, -1].float()  # (B, K)
            if allowed is not None:
                logits = logits.masked_fill(~allowed[codes.shape[1]].to(logits.device), -float("inf"))
            if temperature == 0:
                nxt = logits.argmax(1)
            else:
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                probs = (logits / temperature).softmax(1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(cond.device)
            codes = torch.cat([codes, nxt[:, None]], 1)
        self.train(was_training)
        return codes


@dataclass
class CodeSamplerTrainConfig:
    """AdamW with a cosine schedule on random batches of (caption, codes) pairs."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = True


def train_code_sampler(
    sampler: CodeSampler,
    cond: torch.Tensor,
    codes: torch.Tensor,
    config: CodeSamplerTrainConfig | None = None,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Teach ``sampler`` to write ``codes`` ``(N, Q)`` from captions ``cond`` ``(N, cond_dim)`` (next-code
    cross-entropy); the loss of every step (a resumed run returns the whole history)."""
    cfg = config or CodeSamplerTrainConfig()
    if len(cond) != len(codes) or len(codes) == 0:
        raise PotpourriError(f"{len(cond)} captions for {len(codes)} code sequences; pass one per image (and some)")
    if codes.shape[1] != sampler.config.num_codes:
        raise PotpourriError(f"code sequences of {codes.shape[1]}; this sampler writes {sampler.config.num_codes}")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(sampler.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    options = options or TrainOptions(progress=cfg.progress)
    trainer = Trainer(sampler, optimizer, total_steps=cfg.steps, options=options, folder=checkpoints,
                      generators={"batches": generator}, desc="seed code sampler")  # fmt: skip
    history = trainer.state
    history.setdefault("loss", [])
    sampler.train()
    for step in trainer.steps():
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        batch = torch.randint(len(codes), (min(cfg.batch_size, len(codes)),), generator=generator)
        local, share = trainer.shard(batch)
        c, y = cond[local].to(trainer.device), codes[local].to(trainer.device)
        with trainer.autocast():
            logits = sampler(c, y)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        history["loss"].append(trainer.update(loss * share))
    trainer.finish()
    sampler.eval()
    return list(history["loss"])
