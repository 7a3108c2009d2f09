"""A small conditional pixel decoder: discrete image tokens (the code vectors of a SEED-style tokenizer) → an image.

SEED turns its codes back into pixels through unCLIP Stable Diffusion; no SD weights exist here, so this is a small
deterministic decoder trained on DS-Synth (``vlm/seed_decoder.py``). Reading order: each of the Q code vectors gets a
learned position (the causal Q-Former's token order carries meaning) → a grid of learned queries (``grid`` ×
``grid``) attends to them through non-causal Q-Former layers (``models.visual_tokenizer.QFormerLayer``) → the grid
becomes a feature map → nearest-upsampling conv stages to ``image_size`` → ``tanh`` pixels in [-1, 1]. With
``skip_grid`` > 0 the decoder also takes a low-frequency image ``(B, 3, g, g)`` (what the tokens say about the
image's coarse colours, e.g. read back by the tokenizer's own decoder): it is upsampled bilinearly and added before
the ``tanh``, so the conv stages only add detail on top of it.

Example:
    decoder = CodePixelDecoder(PixelDecoderConfig(code_dim=32, num_codes=32, image_size=64))
    pixels = decoder(tokenizer.quantizer.codebook[tokens])  # (B, 3, 64, 64) in [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.visual_tokenizer import QFormerLayer

__all__ = ["CodePixelDecoder", "PixelDecoderConfig"]


@dataclass
class PixelDecoderConfig:
    """Shapes; saved with the weights so a decoder reloads into the same shapes."""

    code_dim: int = 32  # width of one code vector (the tokenizer's ``code_dim``)
    num_codes: int = 32  # codes per image (the tokenizer's ``num_queries``)
    image_size: int = 64
    grid: int = 8  # learned queries per side; image_size / grid must be a power of two
    dim: int = 128
    heads: int = 4
    layers: int = 2
    width: int = 64  # conv channels at the grid; halves at each doubling (not below 16)
    skip_grid: int = 0  # > 0: a (B, 3, skip_grid, skip_grid) low-frequency image is added to the output


class CodePixelDecoder(nn.Module):
    """Code vectors ``(B, Q, d)`` (and, with ``skip_grid``, a coarse image) → pixels ``(B, 3, S, S)`` in [-1, 1]."""

    def __init__(self, config: PixelDecoderConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or PixelDecoderConfig()
        stages = (cfg.image_size // cfg.grid).bit_length() - 1
        if cfg.image_size % cfg.grid or cfg.image_size != cfg.grid * 2**stages:
            raise PotpourriError(f"image_size {cfg.image_size} must be grid {cfg.grid} times a power of two")
        self.inp = nn.Linear(cfg.code_dim, cfg.dim)
        self.code_pos = nn.Parameter(torch.randn(cfg.num_codes, cfg.dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(QFormerLayer(cfg.dim, cfg.heads, causal=False) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        width = cfg.width
        layers: list[nn.Module] = [nn.Conv2d(cfg.dim, width, 3, padding=1), nn.GELU()]
        for _ in range(stages):
            narrower = max(16, width // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, narrower, 3, padding=1), nn.GELU()]
            width = narrower
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        if cfg.skip_grid:  # detail starts at zero: the untrained decoder returns the coarse image
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        self.to_pixels = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        g = cfg.skip_grid
        if (low is None) != (g == 0) or (low is not None and low.shape != (len(codes), 3, g, g)):
            want = "no low-frequency image" if g == 0 else f"a low-frequency image (B, 3, {g}, {g})"
            raise PotpourriError(f"this decoder takes {want}; got {None if low is None else tuple(low.shape)}")
        if codes.ndim != 3 or codes.shape[1:] != (cfg.num_codes, cfg.code_dim):
            raise PotpourriError(f"codes of shape {tuple(codes.shape)}; this decoder takes (B, {cfg.num_codes}, "
                                 f"{cfg.code_dim})")  # fmt: skip
        memory = self.inp(codes) + self.code_pos  # (B, Q, D)
        x = self.queries.expand(codes.shape[0], -1, -1)  # (B, g*g, D)
        for block in self.blocks:
            x = block(x, memory)
        grid = self.norm(x).transpose(1, 2).reshape(codes.shape[0], cfg.dim, cfg.grid, cfg.grid)
        out = self.to_pixels(grid)
        if low is not None:  # in tanh's input space, so a zero detail term reproduces the coarse image exactly
            coarse = F.interpolate(low.clamp(-0.999, 0.999), size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + torch.atanh(coarse)
        return torch.tanh(out)
