"""DPAM (AnomalyCLIP's diagonally prominent attention map) on a timm ViT and on an open_clip ViT: V-V
self-attention, and the dual-path forward that adds a V-V stream from a middle block on while the original stream (and
the global embedding) stays untouched. Used by AnomalyCLIP's towers (``inspect/clip_towers``, ``inspect/anomalyclip``)
and by SAM-CLIP's clip teacher (``segment/sam_clip.teacher_b_patches``, ``segment/clip_teacher``) for patch tokens
that keep their place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError

__all__ = [
    "dual_path_image_features",
    "vit_dual_path",
    "vit_vv_attention",
    "vv_attention",
    "vv_attention_logits",
]


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


# ----------------------------------------------------------------------------------------------- open_clip ViT
def _value_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The value projection of ``attn`` split into heads: (B, L, W) -> (B, H, L, W/H)."""
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise PotpourriError("V-V attention needs an open_clip block with a packed in_proj (default block_type)")
    width, heads = attn.embed_dim, attn.num_heads
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width :]
    v = F.linear(x, attn.in_proj_weight[2 * width :], bias)  # (B, L, W)
    return v.view(x.shape[0], x.shape[1], heads, width // heads).transpose(1, 2)


def vv_attention_logits(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head V-V attention logits v·vᵀ/√d, (B, H, L, L): symmetric by construction (q = k = v)."""
    v = _value_heads(attn, x)
    return v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5


def vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``attn``'s weights with q = k = v (the "diagonally prominent" path), (B, L, W)."""
    v = _value_heads(attn, x)  # (B, H, L, d)
    weights = (v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5).softmax(-1)  # (B, H, L, L)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)  # (B, L, W)
    return attn.out_proj(out)


def dual_path_image_features(
    visual: nn.Module, images: torch.Tensor, *, dual_from: int, layers: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global embedding (B, D) from the untouched path and V-V patch tokens (B, h, w, D) at 1-based ``layers``.

    From block ``dual_from`` (1-based) on, each block also runs a V-V branch on ``ln_1`` of the *original* tokens
    and adds it to a second residual stream without the FFN (AnomalyCLIP's DPAM). Nothing is updated in place, so
    every tapped layer keeps its own tokens.
    """
    blocks = visual.transformer.resblocks
    x = visual._embeds(images)  # (B, 1+N, W), positional embedding and ln_pre applied
    vv: torch.Tensor | None = None
    taps: dict[int, torch.Tensor] = {}
    for number, block in enumerate(blocks, start=1):
        if number < dual_from:
            x = block(x)  # the vanilla block, untouched
        else:
            y = block.ln_1(x)
            original = x + block.ls_1(block.attention(q_x=y))  # exactly the vanilla attention step
            original = original + block.ls_2(block.mlp(block.ln_2(original)))
            vv = (x if vv is None else vv) + block.ls_1(vv_attention(block.attn, y))  # skips the FFN
            x = original
        if number in layers:
            taps[number] = x if vv is None else vv
    pooled, _ = visual._pool(x)  # vanilla pooling: ln_post, then the class token
    global_embedding = pooled @ visual.proj  # (B, D)
    gh, gw = visual.grid_size
    patch_maps = []
    for number in layers:
        tokens = visual.ln_post(taps[number][:, 1:]) @ visual.proj  # (B, N, D)
        patch_maps.append(tokens.view(tokens.shape[0], gh, gw, -1))  # (B, h, w, D)
    return global_embedding, patch_maps
