"""All-Seeing's region-text head (Wang et al., ICLR 2024): box embedding + pooled region features projected into a
sentence-encoder space. Training is in ``vlm/allseeing``, the experiment in ``papers/all_seeing``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError


class BoxEmbedding(nn.Module):
    """Fourier features of a normalised box (x1, y1, x2, y2, cx, cy, w, h in [0, 1]) → linear → ``dim``."""

    def __init__(self, dim: int, frequencies: int = 4):
        super().__init__()
        self.register_buffer("scales", (2.0 ** torch.arange(frequencies)) * math.pi, persistent=False)
        self.proj = nn.Linear(8 * 2 * frequencies, dim)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        x1, y1, x2, y2 = boxes.unbind(-1)
        geometry = torch.stack([x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)  # (N, 8)
        angles = geometry[..., None] * self.scales  # (N, 8, F)
        return self.proj(torch.cat([angles.sin(), angles.cos()], -1).flatten(1))  # (N, dim)


class RegionTextHead(nn.Module):
    """Region tokens (pooled features and/or box embedding → MLP) and text projection in one space, CLIP-style."""

    def __init__(
        self,
        region_dim: int,
        text_dim: int = 384,
        *,
        embed_dim: int = 128,
        hidden: int = 256,
        use_features: bool = True,
        use_box: bool = True,
        temperature: float = 0.07,
    ):
        super().__init__()
        if not (use_features or use_box):
            raise PotpourriError("a region token needs features, a box embedding or both")
        self.use_features, self.use_box = use_features, use_box
        self.feature_proj = (
            nn.Sequential(nn.LayerNorm(region_dim), nn.Linear(region_dim, hidden)) if use_features else None
        )
        self.box_embed = BoxEmbedding(hidden) if use_box else None
        self.region_mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def encode_regions(self, pooled: torch.Tensor, boxes01: torch.Tensor) -> torch.Tensor:
        """Unit region tokens ``(N, E)`` from flattened pooled features (N, D) and boxes normalised to [0, 1]."""
        token = torch.zeros(len(boxes01), self.region_mlp[1].in_features, device=boxes01.device)
        if self.feature_proj is not None:
            token = token + self.feature_proj(pooled)  # (N, hidden)
        if self.box_embed is not None:
            token = token + self.box_embed(boxes01)  # (N, hidden)
        return F.normalize(self.region_mlp(token), dim=-1)  # (N, E)

    def encode_texts(self, text: torch.Tensor) -> torch.Tensor:
        """Unit text tokens ``(N, E)`` from frozen sentence embeddings (N, text_dim)."""
        return F.normalize(self.text_proj(text), dim=-1)
