"""The offline stand-in towers for AnomalyCLIP and WinCLIP — a stated departure from the paper.

No real CLIP weights exist offline, so the image tower is the frozen ImageNet EfficientNet-Lite0 (patch features
of chosen blocks, global average of its head), the text tower is the frozen MiniLM-L6 sentence encoder fed with
learnable input embeddings (the prompts; deep tokens enter layers 1..depth-1 through pre-hooks), and one trained
linear bridge per image feature maps it into MiniLM's 384-d space. The towers were never aligned, so the bridge
is trained together with the prompts on the auxiliary categories; everything else stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.inspect.towers import OBJECT_PROMPTS, DeepPromptSwitch, PromptLearner, Towers

__all__ = ["StandInTowers"]


class StandInTowers(Towers):
    """Frozen Lite0 patch features + frozen MiniLM with learnable input embeddings + a trained linear bridge.

    Example:
        towers = StandInTowers.pretrained(taps=(2, 4)); text = towers.prompt_text_features()  # (2, 384)
    """

    def __init__(
        self,
        lite0: nn.Module,
        minilm: nn.Module,
        *,
        taps: Sequence[int] = (2, 4),
        image_size: int = 224,
        n_ctx: int = 12,
        depth: int = 9,
        deep_length: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not all(hasattr(lite0, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
            raise PotpourriError(f"the stand-in image tower must be a timm EfficientNet, got {type(lite0).__name__}")
        if not taps or max(taps) >= len(lite0.blocks) or min(taps) < 0:
            raise PotpourriError(f"stand-in taps {list(taps)} must be block indices 0..{len(lite0.blocks) - 1}")
        self.lite0 = lite0.eval().requires_grad_(False)
        self.minilm = minilm.eval().requires_grad_(False)
        self.taps = tuple(sorted(taps))
        self.image_size = image_size
        cfg = getattr(lite0, "pretrained_cfg", None) or {}
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        with torch.no_grad():
            probe = self.frozen_image_features(torch.zeros(1, 3, 64, 64))
        width = minilm.num_features
        g = torch.Generator().manual_seed(seed)
        self.bridge = nn.ModuleDict({name: nn.Linear(f.shape[1], width) for name, f in probe.items()})
        for linear in self.bridge.values():  # seeded init, independent of the global RNG
            bound = linear.in_features**-0.5
            linear.weight.data.uniform_(-bound, bound, generator=g)
            linear.bias.data.zero_()
        layers = minilm.bert.encoder.layer
        self.prompts = PromptLearner(
            width, n_ctx=n_ctx, depth=min(depth, len(layers)), deep_length=deep_length, seed=seed
        )
        placeholder = " ".join(["x"] * n_ctx)
        batch = minilm.tokenizer(
            [f"{placeholder} {name}" for name in OBJECT_PROMPTS], padding=True, return_tensors="pt"
        )
        self.register_buffer("prompt_ids", batch["input_ids"], persistent=False)  # (2, T)
        self.register_buffer("prompt_mask", batch["attention_mask"], persistent=False)  # (2, T)
        self.deep = DeepPromptSwitch(layers, lambda i: self.prompts.deep_tokens(i))

    @classmethod
    def pretrained(cls, **kwargs: Any) -> StandInTowers:
        """The stand-in built from the offline pretrained EfficientNet-Lite0 and MiniLM-L6."""
        from potpourri.core.registry import create_model

        return cls(
            create_model("efficientnet_lite0", pretrained=True), create_model("minilm_l6", pretrained=True), **kwargs
        )

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [*self.prompts.parameters(), *self.bridge.parameters()]

    @property
    def bridge_parameters(self) -> list[nn.Parameter]:
        return list(self.bridge.parameters())

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lite0 features: ``global`` (B, 1280) head average and ``tap{i}`` (B, C_i, h_i, w_i) block outputs."""
        net = self.lite0
        x = net.bn1(net.conv_stem(images))  # (B, 32, H/2, W/2)
        out = {}
        for index, block in enumerate(net.blocks):
            x = block(x)
            if index in self.taps:
                out[f"tap{index}"] = x  # (B, C_i, h_i, w_i)
        out["global"] = net.bn2(net.conv_head(x)).mean((2, 3))  # (B, 1280)
        return out

    def project_image(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bridge the frozen features into MiniLM's space: global (B, 384), per tap (B, h, w, 384)."""
        maps = [self.bridge[f"tap{i}"](features[f"tap{i}"].permute(0, 2, 3, 1)) for i in self.taps]
        return self.bridge["global"](features["global"]), maps

    def prompt_text_features(self) -> torch.Tensor:
        """MiniLM embeddings (2, 384) of the learned prompts, fed as input embeddings; deep tokens via hooks."""
        bert = self.minilm.bert
        embeds = self.prompts.insert(bert.embeddings.word_embeddings(self.prompt_ids))  # (2, T, 384)
        with self.deep.on():
            hidden = bert(inputs_embeds=embeds, attention_mask=self.prompt_mask).last_hidden_state  # (2, T, 384)
        weights = self.prompt_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)  # masked mean, as sentence-transformers pools

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Frozen MiniLM sentence embeddings (N, 384) of hand-written prompts."""
        return self.minilm.encode(list(texts))

    def window_embeddings(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        """WinCLIP-style window embeddings (B, h-k+1, w-k+1, 384): k×k averages of the deepest tap, bridged."""
        name = f"tap{self.taps[-1]}"
        features = self.frozen_image_features(images)[name]  # (B, C, h, w)
        if not 1 <= scale <= min(features.shape[-2:]):
            raise PotpourriError(f"window scale {scale} must be in 1..{min(features.shape[-2:])} cells")
        pooled = F.avg_pool2d(features, scale, stride=1)  # (B, C, h-k+1, w-k+1)
        return self.bridge[name](pooled.permute(0, 2, 3, 1))
