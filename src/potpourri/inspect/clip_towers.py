"""AnomalyCLIP's and WinCLIP's towers on the CLIP-style model trained here (``clip_vit_tiny_minilm``): DPAM on a timm
ViT, learned prompts through MiniLM.

Reading order: the dual-path forward of ``models.dpam`` (DPAM: from block ``dual_from`` on, a second residual stream
adds V-V attention of the *original* tokens and skips the FFN; the original stream, and so the global embedding, is
untouched) → ``OwnClipTowers`` (the ``Towers`` contract: frozen image features, learnable
object-agnostic prompts with deep tokens through MiniLM, hand-written sentences, WinCLIP windows).

Same recipe as ``anomalyclip.dual_path_image_features`` for open_clip; the towers differ: a 6-block ViT trained on
DS-Synth surfaces (see ``potpourri reproduce clip-small``), not a web-scale CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.inspect.towers import OBJECT_PROMPTS, DeepPromptSwitch, PromptLearner, Towers
from potpourri.models.dpam import vit_dual_path

__all__ = ["OwnClipTowers"]


# ----------------------------------------------------------------------------------------------- towers
class OwnClipTowers(Towers):
    """Frozen ``SmallClip`` with DPAM patch maps and object-agnostic prompts learned through its MiniLM tower.

    Example:
        towers = OwnClipTowers.from_run("runs/clip-small/text-tuned-0"); text = towers.prompt_text_features()  # (2, D)
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        n_ctx: int = 12,
        depth: int = 9,
        deep_length: int = 4,
        dual_from: int | None = None,
        feature_layers: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not all(hasattr(clip, a) for a in ("visual", "text", "image_projection", "project_text")):
            raise PotpourriError(f"OwnClipTowers needs a clip_vit_tiny_minilm model, got {type(clip).__name__}")
        self.clip = clip.eval().requires_grad_(False)
        n_blocks = len(clip.visual.blocks)
        self.dual_from = dual_from if dual_from is not None else max(1, n_blocks // 2)  # "from the middle layers on"
        if not 1 <= self.dual_from <= n_blocks + 1:
            raise PotpourriError(f"dual_from {self.dual_from} must be in 1..{n_blocks + 1} ({n_blocks + 1}: no DPAM)")
        self.feature_layers = tuple(feature_layers) or tuple(range(min(self.dual_from, n_blocks), n_blocks + 1))
        if not all(1 <= layer <= n_blocks for layer in self.feature_layers):
            raise PotpourriError(f"feature layers {self.feature_layers} must lie in 1..{n_blocks}")
        bert = clip.text.bert
        layers = bert.encoder.layer
        self.prompts = PromptLearner(
            bert.config.hidden_size, n_ctx=n_ctx, depth=min(depth, len(layers)), deep_length=deep_length, seed=seed
        )
        ids, mask = clip.tokenize([f"{' '.join(['x'] * n_ctx)} {name}" for name in OBJECT_PROMPTS])
        self.register_buffer("prompt_ids", ids, persistent=False)  # (2, T)
        self.register_buffer("prompt_mask", mask, persistent=False)  # (2, T)
        self.deep = DeepPromptSwitch(layers, lambda i: self.prompts.deep_tokens(i))
        self.mean, self.std = (0.5,) * 3, (0.5,) * 3
        self.image_size = int(clip.visual.patch_embed.img_size[0])
        self.grid = tuple(clip.visual.patch_embed.grid_size)

    @classmethod
    def from_run(cls, path: str | Path, **kwargs: Any) -> OwnClipTowers:
        """The towers of a trained ``clip_vit_tiny_minilm`` run folder (``config.json`` + ``model.safetensors``)."""
        from potpourri.models.clip_small import load_small_clip

        return cls(load_small_clip(path), **kwargs)

    def _project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, W) → the joint space on the grid, (B, h, w, D) (final norm, then the projection)."""
        out = self.clip.image_projection(self.clip.visual.norm(tokens))  # (B, N, D)
        return out.view(out.shape[0], *self.grid, -1)

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global (B, D) from the untouched path and per-layer V-V patch maps (B, h, w, D)."""
        vit = self.clip.visual
        final, taps = vit_dual_path(vit, images, dual_from=self.dual_from, layers=self.feature_layers)
        global_embedding = self.clip.image_projection(vit.forward_head(final, pre_logits=True))  # (B, D)
        maps = {f"layer{i}": self._project_tokens(taps[n][:, vit.num_prefix_tokens :])
                for i, n in enumerate(self.feature_layers)}  # fmt: skip
        return {"global": global_embedding, **maps}

    def project_image(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(global (B, D), [patch maps (B, h, w, D)]): already in the joint space, no bridge."""
        return features["global"], [features[f"layer{i}"] for i in range(len(self.feature_layers))]

    def prompt_text_features(self) -> torch.Tensor:
        """Joint-space embeddings (2, D) of the learned normal / anomalous prompts, deep tokens included."""
        bert = self.clip.text.bert
        embeds = self.prompts.insert(bert.embeddings.word_embeddings(self.prompt_ids))  # (2, T, 384)
        with self.deep.on():
            hidden = bert(inputs_embeds=embeds, attention_mask=self.prompt_mask).last_hidden_state  # (2, T, 384)
        return self.clip.project_text(hidden, self.prompt_mask)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Joint-space embeddings (N, D) of hand-written sentences."""
        return self.clip.encode_texts(list(texts))

    @torch.no_grad()
    def window_embeddings(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        """WinCLIP windows (B, h-k+1, w-k+1, D): the class token run through the ViT with one k×k window's patches."""
        vit = self.clip.visual
        gh, gw = self.grid
        if not 1 <= scale <= min(gh, gw):
            raise PotpourriError(f"window scale {scale} must be in 1..{min(gh, gw)} patches")
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))  # (B, P+N, W), P prefix tokens
        prefix, width, b = vit.num_prefix_tokens, x.shape[-1], x.shape[0]
        grid = torch.arange(gh * gw).view(gh, gw)
        windows = grid.unfold(0, scale, 1).unfold(1, scale, 1).reshape(-1, scale * scale)  # (n_win, k*k)
        out = []
        for chunk in windows.split(256):
            tokens = torch.cat(
                [x[:, :prefix].unsqueeze(1).expand(-1, chunk.shape[0], -1, -1), x[:, prefix + chunk]], dim=2
            )  # fmt: skip  (B, n, P+k*k, W)
            final = vit.norm(vit.blocks(tokens.reshape(-1, tokens.shape[2], width)))
            pooled = self.clip.image_projection(vit.forward_head(final, pre_logits=True))  # (B*n, D)
            out.append(pooled.view(b, chunk.shape[0], -1))
        return torch.cat(out, 1).view(b, gh - scale + 1, gw - scale + 1, -1)
