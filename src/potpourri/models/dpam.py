"""DPAM on a timm ViT (AnomalyCLIP's diagonally prominent attention map): V-V self-attention, and the dual-path
forward that adds a V-V stream from a middle block on while the original stream (and the global embedding) stays
untouched. Used by AnomalyCLIP's towers (``inspect/clip_towers``) and by SAM-CLIP's clip teacher
(``segment/sam_clip.teacher_b_patches``) for patch tokens that keep their place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["vit_dual_path", "vit_vv_attention"]


def vit_vv_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ``Attention`` run with q = k = v (its value projection): (B, L, W) -> (B, L, W)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    v = qkv[2]  # (B, H, L, d)
    weights = (v @ v.transpose(-2, -1) * attn.scale).softmax(-1)  # (B, H, L, L), symmetric logits
    out = attn.norm((weights @ v).transpose(1, 2).reshape(b, n, -1))  # (B, L, H*d)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def vit_dual_path(
    vit: nn.Module, images: torch.Tensor, *, dual_from: int, layers: Sequence[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The vanilla final tokens (B, 1+N, W), normed exactly as ``forward_features``, and the tokens (B, 1+N, W) at each
    1-based block of ``layers``: V-V stream from block ``dual_from`` on, vanilla stream before it (not normed)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # (B, 1+N, W)
    vv: torch.Tensor | None = None
    taps: dict[int, torch.Tensor] = {}
    for number, block in enumerate(vit.blocks, start=1):
        if number >= dual_from:
            y = block.norm1(x)
            vv = (x if vv is None else vv) + block.ls1(vit_vv_attention(block.attn, y))  # no FFN on this stream
        x = block(x)  # the vanilla block, untouched
        if number in layers:
            taps[number] = x if vv is None else vv
    return vit.norm(x), taps
