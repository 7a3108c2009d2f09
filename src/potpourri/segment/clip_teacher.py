"""SAM-CLIP's teacher B with language: one small contract, two CLIPs behind it.

``ClipTeacher``: ``normalise(images)`` (uint8 → the teacher's input), ``patch_tokens(x)`` → (N, D, h, w) in the joint
space (optionally DPAM's V-V stream), ``encode_texts(texts)`` → unit-norm (K, D), and the facts the experiment needs
(``embed_dim``, ``mean``/``std``, ``image_size``, ``patch_size``, ``depth``). Implementations:

* ``SmallClipTeacher``: our ``clip_vit_tiny_minilm`` (``teacher_b_patches``, unchanged);
* ``OpenClipTeacher``: an open_clip ViT (``models.open_clip_loader``), MaskCLIP-style patch tokens (Zhou et al., ECCV
  2022): every output token through ``ln_post`` and the image projection ``proj``, as the class token is; the text
  through the model's tokenizer and ``encode_text``. DPAM: ``models.dpam.dual_path_image_features``, AnomalyCLIP's
  V-V path on open_clip's attention blocks.

Example:
    >>> teacher = OpenClipTeacher.load("ViT-B-16", "open_clip_model.safetensors", image_size=96)  # doctest: +SKIP
    >>> teacher.patch_tokens(teacher.normalise(images)).shape  # (N, 512, 6, 6)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError

__all__ = ["ClipTeacher", "OpenClipTeacher", "SmallClipTeacher"]


class ClipTeacher:
    """Teacher B: patch tokens and text embeddings in one joint space (see the module docstring)."""

    name: str = "clip"
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None  # the one input size it takes; None: any multiple of ``patch_size``
    patch_size: int
    depth: int  # ViT blocks: DPAM's ``dpam_from`` lies in 1..depth
    model: nn.Module

    def to(self, device: torch.device | str) -> ClipTeacher:
        """Move the (frozen, eval-mode) model to ``device``."""
        self.model = self.model.to(device).eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 → (N, 3, S, S) float on the CPU, normalised with the teacher's mean and std."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    def check_dpam(self, dpam_from: int | None) -> None:
        """A one-line error unless ``dpam_from`` is None or a block of this ViT."""
        if dpam_from is not None and not 1 <= dpam_from <= self.depth:
            raise PotpourriError(
                f"dpam_from {dpam_from} is not a block of this {self.depth}-block ViT (1..{self.depth})"
            )

    def patch_tokens(self, x: torch.Tensor, *, batch: int = 32, dpam_from: int | None = None) -> torch.Tensor:
        """Normalised images (N, 3, H, W) → patch embeddings (N, D, H/p, W/p), float32 on the teacher's device."""
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences → unit-norm text embeddings (K, D) on the CPU."""
        raise NotImplementedError


class SmallClipTeacher(ClipTeacher):
    """Our ``clip_vit_tiny_minilm`` (``models.clip_small.SmallClip``): any input size, normalisation x / 127.5 - 1."""

    name = "clip_vit_tiny_minilm"

    def __init__(self, clip: nn.Module) -> None:
        self.model = clip
        self.embed_dim = int(clip.embed_dim)
        self.mean = self.std = (0.5, 0.5, 0.5)  # the model card's (vlm.clip.MEAN / STD)
        self.image_size = None  # a timm ViT with dynamic_img_size
        self.patch_size = int(clip.visual.patch_embed.patch_size[0])
        self.depth = len(clip.visual.blocks)

    def patch_tokens(self, x: torch.Tensor, *, batch: int = 32, dpam_from: int | None = None) -> torch.Tensor:
        from potpourri.segment.sam_clip import teacher_b_patches

        return teacher_b_patches(self.model, x, batch, dpam_from=dpam_from)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)  # in batches of 256, as vlm.clip.embed_texts
        parts = [self.model.encode_texts(texts[i : i + 256]).float().cpu() for i in range(0, len(texts), 256)]
        return F.normalize(torch.cat(parts), dim=-1)


class OpenClipTeacher(ClipTeacher):
    """An open_clip ViT CLIP: MaskCLIP-style patch tokens (``ln_post`` then ``proj`` on every token) and its text."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, *, name: str = "open_clip") -> None:
        from potpourri.models.open_clip_loader import open_clip_module

        open_clip = open_clip_module()
        visual = getattr(clip, "visual", None)
        needed = ("conv1", "class_embedding", "transformer", "ln_post", "proj")
        if visual is None or not all(getattr(visual, a, None) is not None for a in needed) or visual.attn_pool:
            raise PotpourriError(
                "teacher B needs an open_clip ViT image tower with a class token and a projection (not ResNet, timm "
                "or attention-pooled CoCa towers)"
            )
        self.model, self.tokenizer, self.name = clip, tokenizer, name
        self.embed_dim = int(visual.proj.shape[1])
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.depth = len(visual.transformer.resblocks)

    @classmethod
    def load(cls, arch: str, weights: str | None, *, image_size: int | None = None) -> OpenClipTeacher:
        """``models.open_clip_loader.load_open_clip`` (never downloads) at ``image_size``, with its own tokenizer."""
        from potpourri.models.open_clip_loader import load_open_clip, open_clip_tokenizer

        clip = load_open_clip(arch, weights, image_size=image_size)
        return cls(clip, open_clip_tokenizer(clip, arch), name=f"open_clip {arch}")

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor, *, batch: int = 32, dpam_from: int | None = None) -> torch.Tensor:
        from potpourri.models.dpam import dual_path_image_features

        self.check_dpam(dpam_from)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise PotpourriError(f"open_clip teacher takes {self.image_size} px images, got {tuple(x.shape[-2:])}")
        visual, out = self.model.visual, []
        for i in range(0, len(x), batch):
            images = x[i : i + batch].to(self.device)
            if dpam_from is None:
                tokens = visual.transformer(visual._embeds(images))  # (B, 1+N, W), class token first
                patches = visual.ln_post(tokens[:, 1:]) @ visual.proj  # (B, N, D)
                h, w = visual.grid_size
                patches = patches.view(len(images), h, w, -1)  # (B, h, w, D)
            else:
                _, (patches,) = dual_path_image_features(visual, images, dual_from=dpam_from, layers=[self.depth])
            out.append(patches.permute(0, 3, 1, 2).float())  # (B, D, h, w)
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
