"""Training the pixel decoder of a SEED-style tokenizer: frozen tokenizer codes → images (``models/pixel_decoder``).

The tokenizer stays frozen; its code vectors are computed once (``token_codes``), then one readable loop (AdamW,
cosine schedule, L1 + MSE on [-1, 1] pixels) steps through ``core.training.Trainer`` (checkpoints, resume after a
kill to the same weights, an optional wall-clock cap that a re-run with resume continues). ``decode_tokens`` turns
any token sequence, real or written by an LM, into an image.

Example:
    codes = token_codes(tokenizer, features)                     # (N, Q, d)
    losses = train_pixel_decoder(decoder, codes, pixels, PixelDecoderTrainConfig(steps=1500))
    image = decode_tokens(decoder, tokenizer, tokens)            # (B, 3, S, S) in [-1, 1]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.pixel_decoder import CodePixelDecoder
from potpourri.models.visual_tokenizer import SEEDTokenizer

__all__ = ["PixelDecoderTrainConfig", "decode_tokens", "token_codes", "train_pixel_decoder"]


@dataclass
class PixelDecoderTrainConfig:
    """AdamW with a cosine schedule on random batches; ``max_seconds`` caps one invocation's wall clock."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    max_seconds: float | None = None
    progress: bool = True


@torch.no_grad()
def token_codes(tokenizer: SEEDTokenizer, features: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The code vectors ``(N, Q, d)`` of the tokens a frozen tokenizer gives cached features ``(N, ...)``."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    parts = [tokenizer.quantizer.codebook[tokenizer.tokenize(f.to(device))].cpu() for f in features.split(batch)]
    return torch.cat(parts)


@torch.no_grad()
def decode_tokens(decoder: CodePixelDecoder, tokenizer: SEEDTokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, S, S)`` in [-1, 1] of image tokens ``(B, Q)`` (indices into the tokenizer's codebook)."""
    size = tokenizer.config.codebook_size
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= size):
        raise PotpourriError(f"image tokens must lie in [0, {size}); got [{int(tokens.min())}, {int(tokens.max())}]")
    decoder.eval()
    return decoder(tokenizer.quantizer.codebook[tokens].to(next(decoder.parameters()).device))


def train_pixel_decoder(
    decoder: CodePixelDecoder,
    codes: torch.Tensor,
    images: torch.Tensor,
    config: PixelDecoderTrainConfig | None = None,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Fit ``decoder`` so that ``codes`` ``(N, Q, d)`` give ``images`` ``(N, 3, S, S)`` in [-1, 1]; the loss of
    every step (a resumed run returns the whole history). Under torchrun each process takes its slice of a batch."""
    cfg = config or PixelDecoderTrainConfig()
    if len(codes) != len(images) or len(codes) == 0:
        raise PotpourriError(f"{len(codes)} code sequences for {len(images)} images; pass one per image (and some)")
    size = decoder.config.image_size
    if images.shape[1:] != (3, size, size):
        raise PotpourriError(f"images of shape {tuple(images.shape[1:])}; this decoder makes (3, {size}, {size})")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    options = options or TrainOptions(progress=cfg.progress)
    trainer = Trainer(decoder, optimizer, total_steps=cfg.steps, options=options, folder=checkpoints,
                      generators={"batches": generator}, desc="seed pixel decoder")  # fmt: skip
    history = trainer.state
    history.setdefault("loss", [])
    started = time.perf_counter()
    decoder.train()
    for step in trainer.steps():
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        batch = torch.randint(len(codes), (min(cfg.batch_size, len(codes)),), generator=generator)
        local, share = trainer.shard(batch)
        x, y = codes[local].to(trainer.device), images[local].to(trainer.device)
        with trainer.autocast():
            out = decoder(x)
            loss = F.l1_loss(out.float(), y) + F.mse_loss(out.float(), y)
        history["loss"].append(trainer.update(loss * share))
        if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
            break  # the final checkpoint lets a resumed run continue from here
    trainer.finish()
    decoder.eval()
    return list(history["loss"])
