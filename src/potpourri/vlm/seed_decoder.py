"""Training the pixel decoder of a SEED-style tokenizer: frozen tokenizer codes → images (``models/pixel_decoder``).

The tokenizer stays frozen; its code vectors are computed once (``token_codes``), then one readable loop (AdamW,
cosine schedule, L1 + MSE on [-1, 1] pixels) steps through ``core.training.Trainer`` (checkpoints, resume after a
kill to the same weights, an optional wall-clock cap that a re-run with resume continues). ``decode_tokens`` turns
any token sequence, real or written by an LM, into an image.

``ColourTokens``: SEED's codes carry the surface and (aligned) the caption, not the image's coarse colours; these g²
extra tokens do (a thumbnail quantised to a k-means palette), and a decoder with ``skip_grid`` adds detail to them.

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

__all__ = [
    "ColourTokens",
    "PixelDecoderTrainConfig",
    "decode_tokens",
    "token_codes",
    "train_pixel_decoder",
]


class ColourTokens:
    """A g x g colour thumbnail as g² discrete tokens: each cell's mean RGB -> the nearest of a ``size``-colour palette
    (k-means over the training images' cells, seeded). ``decode`` gives the coarse image ``(N, 3, g, g)`` that a
    pixel decoder with ``skip_grid`` = g adds its detail to."""

    def __init__(self, grid: int = 4, size: int = 64) -> None:
        if grid < 1 or size < 1:
            raise PotpourriError(f"grid {grid} and palette size {size} must be >= 1")
        self.grid, self.size = grid, size
        self.palette: torch.Tensor | None = None  # (size, 3), in [-1, 1]

    def cells(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, S, S)`` in [-1, 1] -> their cell colours ``(N, g², 3)`` (area averages)."""
        return F.adaptive_avg_pool2d(pixels, self.grid).flatten(2).transpose(1, 2)

    def fit(self, pixels: torch.Tensor, *, seed: int = 0, iterations: int = 25) -> ColourTokens:
        """Lloyd's k-means on the cells of ``pixels``, started from distinct random cells; an empty cluster keeps
        its colour."""
        colours = self.cells(pixels).reshape(-1, 3).double()
        if len(colours) < self.size:
            raise PotpourriError(f"{len(colours)} cells cannot fit a palette of {self.size}; pass more images")
        pick = torch.randperm(len(colours), generator=torch.Generator().manual_seed(seed))[: self.size]
        palette = colours[pick].clone()
        for _ in range(iterations):
            nearest = torch.cdist(colours, palette).argmin(1)
            sums = torch.zeros_like(palette).index_add_(0, nearest, colours)
            counts = torch.bincount(nearest, minlength=self.size).double()[:, None]
            palette = torch.where(counts > 0, sums / counts.clamp(min=1), palette)
        self.palette = palette.float()
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, S, S)`` -> colour tokens ``(N, g²)`` (palette indices, row-major cells)."""
        palette = self._palette()
        cells = self.cells(pixels)  # (N, g², 3)
        return torch.cdist(cells.reshape(-1, 3), palette).argmin(1).view(len(pixels), -1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Colour tokens ``(N, g²)`` -> the coarse image ``(N, 3, g, g)``."""
        palette = self._palette()
        if tokens.ndim != 2 or tokens.shape[1] != self.grid**2:
            raise PotpourriError(f"colour tokens of shape {tuple(tokens.shape)}; pass (N, {self.grid**2})")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.size):
            raise PotpourriError(f"colour tokens must lie in [0, {self.size})")
        return palette[tokens].transpose(1, 2).reshape(len(tokens), 3, self.grid, self.grid)

    def _palette(self) -> torch.Tensor:
        if self.palette is None:
            raise PotpourriError("the colour palette is not fitted; call fit(training images) first")
        return self.palette


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
def decode_tokens(
    decoder: CodePixelDecoder,
    tokenizer: SEEDTokenizer,
    tokens: torch.Tensor,
    colours: ColourTokens | None = None,
    colour_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixels ``(B, 3, S, S)`` in [-1, 1] of image tokens ``(B, Q)`` (indices into the tokenizer's codebook); a
    decoder with ``skip_grid`` also takes the image's colour tokens ``(B, g²)`` and their palette ``colours``."""
    size = tokenizer.config.codebook_size
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= size):
        raise PotpourriError(f"image tokens must lie in [0, {size}); got [{int(tokens.min())}, {int(tokens.max())}]")
    if (colours is None or colour_tokens is None) != (decoder.config.skip_grid == 0):
        raise PotpourriError("a decoder with skip_grid takes colour tokens and their palette; one without, neither")
    decoder.eval()
    device = next(decoder.parameters()).device
    low = None if colours is None or colour_tokens is None else colours.decode(colour_tokens).to(device)
    return decoder(tokenizer.quantizer.codebook[tokens].to(device), low)


def train_pixel_decoder(
    decoder: CodePixelDecoder,
    codes: torch.Tensor,
    images: torch.Tensor,
    config: PixelDecoderTrainConfig | None = None,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
    low: torch.Tensor | None = None,
) -> list[float]:
    """Fit ``decoder`` so that ``codes`` ``(N, Q, d)`` (and ``low``, the coarse images ``(N, 3, g, g)`` a
    ``skip_grid`` decoder adds detail to) give ``images`` ``(N, 3, S, S)`` in [-1, 1]; the loss of every step (a
    resumed run returns the whole history). Under torchrun each process takes its slice of a batch."""
    cfg = config or PixelDecoderTrainConfig()
    if len(codes) != len(images) or len(codes) == 0 or (low is not None and len(low) != len(codes)):
        coarse = "" if low is None else f" and {len(low)} coarse images"
        raise PotpourriError(
            f"{len(codes)} code sequences for {len(images)} images{coarse}; pass one per image (and some)"
        )
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
        coarse = None if low is None else low[local].to(trainer.device)
        with trainer.autocast():
            out = decoder(x, coarse)
            loss = F.l1_loss(out.float(), y) + F.mse_loss(out.float(), y)
        history["loss"].append(trainer.update(loss * share))
        if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
            break  # the final checkpoint lets a resumed run continue from here
    trainer.finish()
    decoder.eval()
    return list(history["loss"])
