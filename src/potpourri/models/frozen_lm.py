"""Frozen language-model block as a visual encoder layer (Pang et al., ICLR 2024).

``tokens → Linear(d→d_lm, no bias) → frozen LM layer → Linear(d_lm→d, no bias) → final norm → head``, placed
after the last ViT block (or after a CNN's last stage, its feature map read as tokens). The LM layer is called
with **full bidirectional attention, no causal mask and no rotary/positional encoding** (the paper removes both),
whatever its family: BERT-like encoders, LLaMA-like decoders, OPT and GPT-2. LLaMA layers are followed by a
parameter-free RMS normalisation, as the paper's code keeps LLaMA's final RMSNorm at weight 1.

Also here: the information-filtering measurement (token activations → pseudo-masks → IoU with true masks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import register_model
from potpourri.models._hf import quiet_transformers
from potpourri.models.efficientnet import LITE0_CFG

__all__ = [
    "FrozenLMLayer",
    "FrozenLMViT",
    "activation_map",
    "cls_attention",
    "efficientnet_lite0_frozenlm",
    "load_lm_layer",
    "pseudo_mask_iou",
    "vit_tiny_frozenlm",
]

FAMILIES = {
    "bert": "bert",
    "roberta": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "gpt2": "gpt2",
}


class FrozenLMLayer(nn.Module):
    """One language-model layer called bidirectionally and without positions; frozen unless ``trainable``."""

    def __init__(self, layer: nn.Module, family: str, hidden_size: int, *, trainable: bool = False):
        super().__init__()
        if family not in set(FAMILIES.values()):
            raise PotpourriError(
                f"unknown LM family '{family}'; supported: {', '.join(sorted(set(FAMILIES.values())))}"
            )
        self.layer, self.family, self.hidden_size = layer, family, hidden_size
        self.keep_frozen = not trainable  # tuning strategies leave it frozen, even "train everything" ones
        for module in layer.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False  # SDPA would otherwise assume a causal mask when none is given
        for param in layer.parameters():
            param.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # an explicit all-zero additive mask: every token attends to every token, in eager and SDPA paths alike
        mask = x.new_zeros(B, 1, N, N)
        if self.family == "llama":
            head_dim = self.layer.self_attn.head_dim
            cos, sin = x.new_ones(B, N, head_dim), x.new_zeros(B, N, head_dim)  # rotary by angle 0 = no rotation
            out = self.layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        else:
            out = self.layer(x, attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out  # (B, N, d_lm)
        if self.family == "llama":
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)  # LLaMA's final RMSNorm, weight 1
        return out


def _layers_and_family(model: nn.Module) -> tuple[nn.ModuleList, str, int]:
    """The layer list, family and hidden size of a Hugging Face model (base or with a head)."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise PotpourriError(f"LM type '{config.model_type}' is not supported; use one of {', '.join(FAMILIES)}")
    base = getattr(model, "base_model", model)
    if family == "bert":
        layers = base.encoder.layer
    elif family == "llama":
        layers = base.layers
    elif family == "opt":
        layers = base.decoder.layers
    else:
        layers = base.h
    return layers, family, config.hidden_size


def load_lm_layer(
    lm: str | os.PathLike | nn.Module, layer: int = -1, *, random_init: bool = False, trainable: bool = False
) -> FrozenLMLayer:
    """Take layer ``layer`` of a language model: a registered name (``minilm_l6``, ``smollm2_135m``), a local
    Hugging Face folder or hub id, or a loaded ``transformers`` model. ``random_init`` gives a freshly initialised
    layer of the same shape (the paper's control)."""
    from potpourri.core.registry import REGISTRY, create_model

    if isinstance(lm, nn.Module):
        model = lm
    elif str(lm) in REGISTRY:
        wrapper = create_model(str(lm), pretrained=not random_init)
        model = wrapper.bert if hasattr(wrapper, "bert") else getattr(wrapper, "lm", None)
        if model is None:
            raise PotpourriError(f"registered model '{lm}' is not a language model")
    else:
        from transformers import AutoConfig, AutoModel

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if not os.path.exists(lm) and offline:
            raise PotpourriError(f"language model '{lm}' is not on disk and the hub is offline; pass a folder")
        if random_init:
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(lm)))
        else:
            with quiet_transformers():
                model = AutoModel.from_pretrained(str(lm), dtype=torch.float32)
    if random_init and isinstance(lm, nn.Module):
        model = type(model)(model.config)  # same shape, the library's own initialisation
    layers, family, hidden = _layers_and_family(model)
    if not -len(layers) <= layer < len(layers):
        raise PotpourriError(
            f"lm_layer {layer} is out of range: this LM has {len(layers)} layers (0..{len(layers) - 1})"
        )
    return FrozenLMLayer(layers[layer].float(), family, hidden, trainable=trainable)


class MLPControl(nn.Module):
    """The paper's capacity control: GELU + LayerNorm between the same two adapters, no LM layer."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(x))


def build_lm_block(lm: str | nn.Module | None, lm_layer: int = -1, **kwargs: Any) -> nn.Module | None:
    """``None`` (no block), ``'mlp:<width>'`` (capacity control), or a language-model layer (see ``load_lm_layer``)."""
    if lm is None or lm == "none":
        return None
    if isinstance(lm, str) and lm.startswith("mlp:"):
        return MLPControl(int(lm.split(":", 1)[1]))
    return load_lm_layer(lm, lm_layer, **kwargs)


class TokenLMBlock(nn.Module):
    """``Linear(d→d_lm, no bias) → LM block → Linear(d_lm→d, no bias)`` on a token sequence ``(B, N, d)``."""

    def __init__(self, dim: int, block: nn.Module):
        super().__init__()
        self.adapter_in = nn.Linear(dim, block.hidden_size, bias=False)
        self.lm = block
        self.adapter_out = nn.Linear(block.hidden_size, dim, bias=False)

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.adapter_in(x)  # (B, N, d_lm)
        z = self.lm(h)  # (B, N, d_lm)
        out = self.adapter_out(z)  # (B, N, d)
        if record is not None:
            record.update(adapter_in=h, lm=z, adapter_out=out)
        return out


class FrozenLMViT(nn.Module):
    """A timm VisionTransformer with a (frozen) LM block after its last block and before its final norm."""

    def __init__(self, vit: nn.Module, block: nn.Module | None):
        super().__init__()
        self.vit = vit
        self.lm_block = TokenLMBlock(vit.embed_dim, block) if block is not None else None
        self.num_classes, self.num_features = vit.num_classes, vit.num_features
        self.feature_info = getattr(vit, "feature_info", [])

    def forward_tokens(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Tokens after the LM block, before the final norm; ``record`` collects the intermediate activations."""
        x = self.vit.patch_embed(x)  # (B, H', W', d) or (B, N, d)
        x = self.vit._pos_embed(x)  # (B, prefix + N, d)
        x = self.vit.norm_pre(self.vit.patch_drop(x))
        x = self.vit.blocks(x)  # (B, prefix + N, d)
        if record is not None:
            record["vit"] = x
        return self.lm_block(x, record) if self.lm_block is not None else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(self.forward_tokens(x))  # (B, prefix + N, d)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.vit.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes


class FrozenLMConvNet(nn.Module):
    """A timm EfficientNet whose last-stage feature map is read as tokens through the LM block, then its head."""

    def __init__(self, cnn: nn.Module, block: nn.Module | None):
        super().__init__()
        self.cnn = cnn
        dim = cnn.blocks[-1][-1].conv_pwl.out_channels if hasattr(cnn.blocks[-1][-1], "conv_pwl") else None
        if dim is None:
            raise PotpourriError("FrozenLMConvNet expects a timm EfficientNet-style model (blocks[-1][-1].conv_pwl)")
        self.lm_block = TokenLMBlock(dim, block) if block is not None else None
        self.num_classes, self.num_features = cnn.num_classes, cnn.num_features
        self.feature_info = cnn.feature_info

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cnn = self.cnn
        x = cnn.blocks(cnn.bn1(cnn.conv_stem(x)))  # (B, C, h, w)
        if self.lm_block is not None:
            B, C, h, w = x.shape
            tokens = self.lm_block(x.flatten(2).transpose(1, 2))  # (B, h·w, C)
            x = x + tokens.transpose(1, 2).reshape(B, C, h, w)  # residual keeps the pretrained path intact
        return cnn.bn2(cnn.conv_head(x))  # (B, 1280, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.cnn.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.cnn.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.cnn.reset_classifier(num_classes)
        self.num_classes = num_classes


# --- information filtering (paper §6, App. A.3/A.5) -----------------------------------------------------------


def activation_map(tokens: torch.Tensor, kind: str = "magnitude") -> torch.Tensor:
    """Per-token activation in [0, 1] per image: ``magnitude`` = ‖t − mean t‖₂, ``frequency`` = ‖∠FFT(t) − mean‖₂."""
    if kind == "magnitude":
        values = (tokens - tokens.mean(1, keepdim=True)).norm(dim=-1)  # (B, N)
    elif kind == "frequency":
        angles = torch.angle(torch.fft.fft(tokens.float(), dim=-1))  # (B, N, C)
        values = (angles - angles.mean(1, keepdim=True)).norm(dim=-1)
    else:
        raise PotpourriError(f"unknown activation kind '{kind}'; choose magnitude or frequency")
    low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    return (values - low) / (high - low).clamp_min(1e-12)  # (B, N)


@torch.no_grad()
def cls_attention(model: FrozenLMViT, x: torch.Tensor) -> torch.Tensor:
    """Attention from the CLS token to each patch token in the last ViT block, summed over heads: ``(B, N)``."""
    vit = model.vit
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    tokens = vit.blocks[:-1](tokens)  # (B, prefix + N, d): the input of the last block
    attn = vit.blocks[-1].attn
    h = vit.blocks[-1].norm1(tokens)
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, N, head_dim)
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # (B, heads, N, N)
    return probs[:, :, 0, vit.num_prefix_tokens :].sum(1)  # (B, N - prefix)


def pseudo_mask_iou(
    activation: torch.Tensor, masks: torch.Tensor, thresholds: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))
) -> torch.Tensor:
    """Per-image best IoU over thresholds between ``activation > t`` and the true token masks (both ``(B, N)``)."""
    truth = masks.bool()
    best = torch.zeros(activation.shape[0])
    for t in thresholds:
        predicted = activation > t
        inter = (predicted & truth).sum(1).float()
        union = (predicted | truth).sum(1).float()
        best = torch.maximum(best, torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)))
    return best


@dataclass(frozen=True)
class LMSpec:
    """Which LM layer to insert: ``lm`` (name, folder, ``mlp:<width>`` or ``none``), index, and controls."""

    lm: str | None = "minilm_l6"
    lm_layer: int = -1
    random_init: bool = False
    trainable: bool = False

    def build(self) -> nn.Module | None:
        if self.lm is None or self.lm == "none" or self.lm.startswith("mlp:"):
            return build_lm_block(self.lm)
        return build_lm_block(self.lm, self.lm_layer, random_init=self.random_init, trainable=self.trainable)


def _spec(kwargs: dict[str, Any]) -> LMSpec:
    return LMSpec(
        lm=kwargs.pop("lm", "minilm_l6"),
        lm_layer=kwargs.pop("lm_layer", -1),
        random_init=kwargs.pop("lm_random_init", False),
        trainable=kwargs.pop("lm_trainable", False),
    )


@register_model(tags=("frozen-lm", "vit"))
def vit_tiny_frozenlm(pretrained: bool = False, **kwargs: Any) -> FrozenLMViT:
    """ViT-Tiny (timm ``vit_tiny_patch16_224``, any input size) + a frozen LM layer (default: MiniLM's last).

    Example:
        model = create_model("vit_tiny_frozenlm", lm="smollm2_135m", lm_layer=-1, num_classes=7, img_size=64)
    """
    spec = _spec(kwargs)
    kwargs.setdefault("dynamic_img_size", True)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    return FrozenLMViT(vit, spec.build())


@register_model(pretrained_cfg=LITE0_CFG, tags=("frozen-lm", "cnn"))
def efficientnet_lite0_frozenlm(pretrained: bool = False, **kwargs: Any) -> FrozenLMConvNet:
    """EfficientNet-Lite0 (ImageNet weights when ``pretrained``) whose last-stage tokens pass a frozen LM layer.

    A departure from the paper (which trains a ViT from scratch): the block is added residually, so a pretrained
    CNN keeps its features at initialisation."""
    from potpourri.core.registry import create_model

    spec = _spec(kwargs)
    cnn = create_model("efficientnet_lite0", pretrained=pretrained, **kwargs)
    return FrozenLMConvNet(cnn, spec.build())
