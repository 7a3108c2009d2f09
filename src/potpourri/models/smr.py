"""SMR's modules (withdrawn ICLR 2024 submission): ToMe-style bipartite token merging, a small ViT that merges tokens
between blocks, the feature decoder and the frozen Lite0 teacher. Pretraining and the experiment are in
``papers/smr``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError


# ----------------------------------------------------------------------------------------------- token merging
class Merge:
    """One bipartite merge step: ``merge`` (N → N - r tokens, size-weighted) and where each old token went."""

    def __init__(self, unmerged_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, n: int) -> None:
        self.unmerged_idx, self.src_idx, self.dst_idx, self.n = unmerged_idx, src_idx, dst_idx, n  # (B, ·) each
        self.r = src_idx.shape[1]

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]  # (B, Na, C), (B, Nb, C)
        c = x.shape[-1]
        kept = a.gather(1, self.unmerged_idx.unsqueeze(-1).expand(-1, -1, c))  # (B, Na - r, C)
        moved = a.gather(1, self.src_idx.unsqueeze(-1).expand(-1, -1, c))  # (B, r, C)
        b = b.scatter_reduce(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c), moved, reduce="sum")
        return torch.cat([kept, b], dim=1)  # (B, N - r, C)

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge tokens ``(B, N, C)`` with sizes ``(B, N, 1)``: merged tokens are size-weighted means, sizes add."""
        new_size = self._reduce(size)
        return self._reduce(x * size) / new_size, new_size

    def new_position(self) -> torch.Tensor:
        """``(B, N)``: the index in the merged sequence that each old token ended up in."""
        batch = self.src_idx.shape[0]
        n_a = (self.n + 1) // 2
        kept = n_a - self.r
        out = torch.empty(batch, self.n, dtype=torch.long, device=self.src_idx.device)
        a_pos = torch.empty(batch, n_a, dtype=torch.long, device=out.device)
        a_pos.scatter_(1, self.unmerged_idx, torch.arange(kept, device=out.device).expand(batch, -1))
        a_pos.scatter_(1, self.src_idx, kept + self.dst_idx)
        out[:, ::2] = a_pos
        out[:, 1::2] = kept + torch.arange(self.n // 2, device=out.device)
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Merge:
    """ToMe's matching on ``metric`` ``(B, N, C)``: merge the ``r`` A tokens (even positions) most similar to B."""
    n = metric.shape[1]
    r = min(r, (n + 1) // 2, n // 2)  # every merged A token needs a B partner
    if r < 0:
        raise PotpourriError(f"token merging needs r >= 0, got {r}")
    metric = F.normalize(metric, dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, Na, Nb) cosine
    best, best_idx = scores.max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)  # most similar A tokens first
    src_idx, unmerged_idx = order[:, :r], order[:, r:]
    dst_idx = best_idx.gather(1, src_idx)  # (B, r) B partner of each merged A token
    return Merge(unmerged_idx, src_idx, dst_idx, n)


def unmerge(tokens: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Merged tokens ``(B, M, C)`` back on the original grid; ``assignment`` ``(B, N)`` names each patch's token."""
    return tokens.gather(1, assignment.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, N, C)


def random_masking(batch: int, n: int, visible: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE masking: ``visible`` sorted random token indices per image ``(B, V)`` and the hidden mask ``(B, N)``."""
    if not 0 < visible <= n:
        raise PotpourriError(f"MAE needs 0 < visible <= {n} tokens, got {visible}")
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    keep = order[:, :visible].sort(dim=1).values
    hidden = torch.ones(batch, n, dtype=torch.bool)
    hidden.scatter_(1, keep, False)
    return keep, hidden


# ----------------------------------------------------------------------------------------------- student
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, c/h)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N)
        if size is not None:  # ToMe's proportional attention: a token of size s counts s times
            logits = logits + size.log().view(b, 1, 1, n)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj(out), k.mean(dim=1)  # keys averaged over heads: ToMe's similarity metric, (B, N, c/h)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attended, keys = self.attn(self.norm1(x), size)
        x = x + attended
        return x + self.mlp(self.norm2(x)), keys  # (B, N, C), (B, N, C/h)


class SMRViT(nn.Module):
    """A small ViT (no class token; mean-pooled) that can merge ``r`` tokens after each block or see a token subset.

    Example:
        vit = SMRViT(image_size=32, patch_size=4, dim=64, depth=4, heads=4)
        tokens, size, assignment = vit.forward_tokens(images, r=12)   # (B, 16, 64), (B, 16, 1), (B, 64)
    """

    def __init__(
        self, *, image_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise PotpourriError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid = image_size // patch_size
        self.num_tokens = self.grid**2
        self.num_features = dim
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward_tokens(
        self, x: torch.Tensor, *, r: int = 0, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode images in [0, 1]: tokens ``(B, M, C)``, sizes ``(B, M, 1)``, and each patch's token ``(B, N)``."""
        tokens = self.patch_embed((x - 0.5) / 0.5).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        b, n, _ = tokens.shape
        assignment = torch.arange(n, device=x.device).expand(b, n)
        if visible is not None:  # MAE: the encoder only ever sees the visible tokens
            tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, V, C)
        size = torch.ones(b, tokens.shape[1], 1, device=x.device)
        for block in self.blocks:
            tokens, keys = block(tokens, size if r else None)
            if r:
                merge = bipartite_soft_matching(keys, r)
                assignment = merge.new_position().gather(1, assignment)
                tokens, size = merge.merge(tokens, size)  # (B, M - r, C)
        return self.norm(tokens), size, assignment

    def token_schedule(self, *, r: int = 0, visible: int | None = None) -> list[int]:
        """Tokens entering each block (for the compute budget)."""
        n = visible if visible is not None else self.num_tokens
        counts = []
        for _ in self.blocks:
            counts.append(n)
            n -= min(r, (n + 1) // 2, n // 2)
        return counts

    def forward_features(self, x: torch.Tensor, *, r: int = 0) -> torch.Tensor:
        """Size-weighted mean of the final tokens ``(B, C)`` (with r=0, the plain mean over all patches)."""
        tokens, size, _ = self.forward_tokens(x, r=r)
        return (tokens * size).sum(1) / size.sum(1)


class FeatureDecoder(nn.Module):
    """Full-grid tokens ``(B, N, C)`` (hidden positions replaced by a mask token) → teacher features ``(B, N, T)``."""

    def __init__(self, dim: int, teacher_dim: int, num_tokens: int, *, decoder_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, decoder_dim) * 0.02)
        self.block = Block(decoder_dim, heads)
        self.norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, teacher_dim)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)  # (B, N, D)
        if hidden is not None:
            x = torch.where(hidden.unsqueeze(-1), self.mask_token.expand_as(x), x)
        x, _ = self.block(x + self.pos_embed)
        return self.head(self.norm(x))  # (B, N, T)


class Lite0Teacher(nn.Module):
    """The frozen ImageNet EfficientNet-Lite0 up to ``blocks.<stage>``, on the image upsampled by ``upsample``."""

    def __init__(self, *, stage: int = 4, upsample: int = 4) -> None:
        super().__init__()
        from potpourri.core.registry import create_model

        net = create_model("efficientnet_lite0", pretrained=True)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[: stage + 1]
        self.upsample = upsample
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.upsample, mode="bicubic", align_corners=False).clamp(0, 1)
        return self.blocks(self.stem((x - 0.5) / 0.5))  # Lite0's mean = std = 0.5; (B, 112, H/4, W/4) for stage 4


# ----------------------------------------------------------------------------------------------- pretraining
def encoder_macs(tokens_per_block: list[int], dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of the encoder blocks: per block 4·N·d² (qkv, proj) + 2·r·N·d² (MLP) + 2·N²·d (attn)."""
    return int(sum((4 + 2 * mlp_ratio) * n * dim**2 + 2 * n * n * dim for n in tokens_per_block))


def mae_visible_for_equal_macs(student: SMRViT, r: int) -> int:
    """The MAE visible-token count whose encoder MACs come closest to the merging schedule's."""
    target = encoder_macs(student.token_schedule(r=r), student.num_features)
    return min(
        range(1, student.num_tokens + 1),
        key=lambda v: abs(encoder_macs(student.token_schedule(visible=v), student.num_features) - target),
    )
