"""Defect-Gen-lite's parts that are plain tensors and modules: the cosine noise schedule and forward noising, and
the two denoisers (a *global* UNet on 2x2 pixel blocks with self-attention, a *local* full-resolution conv net of
small receptive field). The model, its training and its sampler are ``potpourri.segment.defectgen``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "COSINE_S",
    "ChannelNorm",
    "GlobalUNet",
    "LocalDenoiser",
    "ResBlock",
    "SelfAttention",
    "cosine_alpha_bar",
    "local_receptive_field",
    "q_sample",
]

COSINE_S = 0.008


# ----------------------------------------------------------------------------------------------- schedule
def cosine_alpha_bar(timesteps: int, s: float = COSINE_S) -> torch.Tensor:
    """``abar(t)`` for t = 0..T (float64, ``T + 1`` values): Nichol & Dhariwal's cosine schedule, abar(0) = 1."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / f[0]).clamp(min=0.0, max=1.0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward noising ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for a batch of levels ``t`` (B,)."""
    a = alpha_bar.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _time_features(t: torch.Tensor, timesteps: int, dim: int) -> torch.Tensor:
    """Sinusoidal features of t / T * 1000 (so the embedding does not depend on T): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * (1000.0 / timesteps))[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


# ----------------------------------------------------------------------------------------------- blocks
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ChannelNorm(nn.Module):
    """Layer norm over channels at each pixel: unlike GroupNorm it pools nothing across space, so a net built
    from it keeps a strictly local receptive field (and behaves the same on crops and on whole images)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)  # (B, 1, H, W)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class ResBlock(nn.Module):
    """Norm-SiLU-conv3x3 twice, the time embedding added in between, 1x1 skip when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, norm=_norm) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map (what makes the global net's field global)."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class _TimeMLP(nn.Module):
    def __init__(self, dim: int, timesteps: int) -> None:
        super().__init__()
        self.dim, self.timesteps = dim, timesteps
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(_time_features(t, self.timesteps, self.dim))  # (B, 4 * dim)


class GlobalUNet(nn.Module):
    """Large receptive field: a UNet (one ResBlock per level, self-attention at 1/4 image resolution and below)."""

    def __init__(
        self, channels: int, *, width: int, mults: tuple[int, ...], timesteps: int, image_size: int, patch: int = 1
    ) -> None:
        super().__init__()
        self.time = _TimeMLP(width, timesteps)
        self.patch = patch  # space-to-depth factor: the UNet runs at image_size / patch, 4x cheaper for patch 2
        emb = 4 * width
        widths = [width * m for m in mults]
        self.stem = nn.Conv2d(channels * patch * patch, widths[0], 3, padding=1)
        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        size, previous = image_size // patch, widths[0]
        for level, ch in enumerate(widths):
            self.down_blocks.append(ResBlock(previous, ch, emb))
            self.down_attn.append(SelfAttention(ch) if size <= image_size // 4 else nn.Identity())
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            size, previous = (size if last else size // 2), ch
        self.mid1, self.mid_attn, self.mid2 = ResBlock(ch, ch, emb), SelfAttention(ch), ResBlock(ch, ch, emb)
        self.up_blocks, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            ch = widths[level]
            self.up_blocks.append(ResBlock(previous + ch, ch, emb))
            self.up_attn.append(SelfAttention(ch) if size <= image_size // 4 else nn.Identity())
            first = level == 0
            self.upsample.append(nn.Identity() if first else nn.Conv2d(ch, widths[level - 1], 3, padding=1))
            size, previous = (size if first else size * 2), (ch if first else widths[level - 1])
        out = channels * patch * patch
        self.head = nn.Sequential(_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], out, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(t)  # (B, 4w)
        h = self.stem(F.pixel_unshuffle(x, self.patch))  # (B, w, S / p, S / p)
        skips = []
        for block, attn, down in zip(self.down_blocks, self.down_attn, self.downsample, strict=True):
            h = attn(block(h, emb))
            skips.append(h)  # (B, w_l, S / (p 2^l), S / (p 2^l))
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)  # (B, w_L, S / 2^L, S / 2^L)
        for block, attn, up in zip(self.up_blocks, self.up_attn, self.upsample, strict=True):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, w_{l-1}, 2H, 2W)
        return F.pixel_shuffle(self.head(h), self.patch)  # (B, C, S, S): predicted x0


class LocalDenoiser(nn.Module):
    """Small receptive field: full-resolution ResBlocks with per-pixel norms only (no down-sampling, no attention,
    no spatial statistics), SinDiffusion-like."""

    def __init__(self, channels: int, *, width: int, blocks: int, timesteps: int) -> None:
        super().__init__()
        self.time = _TimeMLP(width, timesteps)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(width, width, 4 * width, norm=ChannelNorm) for _ in range(blocks))
        self.head = nn.Sequential(ChannelNorm(width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(t)  # (B, 4w)
        h = self.stem(x)  # (B, w, S, S)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h)  # (B, C, S, S): predicted x0


def local_receptive_field(blocks: int) -> int:
    """Side in pixels of the local net's receptive field: stem + 2 convs per block + head, each 3x3 (+2 px)."""
    return 1 + 2 * (2 * blocks + 2)
