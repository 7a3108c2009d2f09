"""A WinCLIP-style zero-shot baseline (Jeong et al., CVPR 2023): hand-written prompt ensembles and window scores.

What is implemented: the compositional prompt ensemble (normal / anomalous state words × templates, each
sentence embedded and L2-normalised, averaged per state); the image score is the softmax probability of
"anomalous" for the global image embedding; the anomaly map averages, over window scales k (default 1, 2, 3
patches), the per-cell *harmonic mean* of the scores of all k×k windows covering the cell, as WinCLIP aggregates.
On open_clip the window embedding is the class token of the ViT run over that window's patch tokens only (the
paper's masking); nothing is trained. On the stand-in towers a window is the k×k average of Lite0 features and
the linear bridge, which real CLIP does not need, is trained on the auxiliary categories with the prompts fixed.
Not implemented: WinCLIP+'s few-shot reference memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput
from potpourri.inspect.anomalyclip import (
    AnomalyCLIP,
    common_args,
    image_logits,
    load_aux_data,
    train_prompts,
)

__all__ = ["METHOD", "WinCLIP", "WinCLIPConfig", "harmonic_window_map", "prompt_ensemble"]

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of the {}.",
    "a photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "there is a {} in the scene.",
)


def prompt_ensemble(object_name: str = "object") -> tuple[list[str], list[str]]:
    """Every normal and every anomalous sentence: state words × templates around ``object_name``."""
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def harmonic_window_map(window_scores: torch.Tensor, scale: int) -> torch.Tensor:
    """Per-cell harmonic mean of the (B, h-k+1, w-k+1) scores of all k×k windows covering each cell: (B, h, w)."""
    inverse = (1.0 / window_scores.clamp_min(1e-6)).unsqueeze(1)  # (B, 1, h', w')
    ones = torch.ones(1, 1, scale, scale, dtype=inverse.dtype)
    summed = F.conv_transpose2d(inverse, ones)  # (B, 1, h, w): sum over covering windows
    count = F.conv_transpose2d(torch.ones_like(inverse[:1]), ones)  # (1, 1, h, w)
    return (count / summed)[:, 0]


@dataclass
class WinCLIPConfig:
    """Everything that defines a WinCLIP-style model (saved in ``metadata.json``)."""

    towers: str = "standin"  # "standin" (trains only the bridge on aux data) or "open_clip" (pure zero-shot)
    clip_model: str | None = None
    clip_weights: str | None = None
    aux_data: tuple[str, ...] = ()  # stand-in only: data to train the bridge on
    object_name: str = "object"  # the noun in the prompts (WinCLIP uses the category name)
    scales: tuple[int, ...] = (1, 2, 3)  # window sides in patches
    image_size: int = 224
    standin_taps: tuple[int, ...] = (2, 4)
    temperature: float = 0.07
    local_weight: float = 4.0
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    sigma: float = 4.0
    seed: int = 0


class WinCLIP(AnomalyCLIP):
    """Zero-shot anomaly scores from hand-written prompt ensembles and multi-scale windows.

    Example:
        model = WinCLIP(WinCLIPConfig(towers="open_clip", clip_model="ViT-B-16", clip_weights="w.safetensors"))
        scores, maps = model.fit([]).score(paths)
    """

    name = "winclip"
    config_class = WinCLIPConfig

    def __init__(self, config: WinCLIPConfig | None = None, *, towers: Any = None) -> None:
        super().__init__(config or WinCLIPConfig(), towers=towers)
        self._text: torch.Tensor | None = None

    def text_features(self) -> torch.Tensor:
        """(2, D): the mean of the L2-normalised sentence embeddings of each state."""
        if self._text is None:
            normal, anomalous = prompt_ensemble(self.config.object_name)
            self._text = torch.stack(
                [F.normalize(self.towers.encode_texts(s), dim=-1).mean(0) for s in (normal, anomalous)]
            )
        return self._text

    def fit(self, images: Sequence[ImageInput] = ()) -> WinCLIP:
        """Zero-shot: nothing to learn on CLIP; on the stand-in, train only the bridge on ``config.aux_data``."""
        if len(images):
            self.notes.append("zero-shot: the target category's normal images were not used for fitting")
        if not self.towers.bridge_parameters:
            self.text_features()
            return self
        if not self.config.aux_data:
            raise PotpourriError(
                "WinCLIP on the stand-in towers must first align them: pass --aux-data ds-synth:brick,gravel "
                "(real CLIP needs no training: pass --clip MODEL --clip-weights PATH)"
            )
        paths, masks, labels = load_aux_data(self.config.aux_data, self.image_size)
        return self.fit_auxiliary(paths, masks, labels)

    def fit_auxiliary(self, images: Sequence[ImageInput], masks: np.ndarray, labels: np.ndarray) -> WinCLIP:
        """Train the stand-in bridge (prompts fixed to the hand-written ensemble) on labelled images."""
        start = time.perf_counter()
        text = self.text_features()
        tensors = torch.stack([self.tensor(i) for i in images])
        masks_t = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
        self.history = train_prompts(
            self.towers,
            tensors,
            masks_t,
            torch.as_tensor(np.asarray(labels)),
            text_fn=lambda: text,
            params=self.towers.bridge_parameters,
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            local_weight=self.config.local_weight,
            temperature=self.config.temperature,
            seed=self.config.seed,
        )
        self.n_train_images = len(images)
        self.timings["train_s"] = time.perf_counter() - start
        return self

    @torch.no_grad()
    def score(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) from the global embedding; maps (N, S, S) from multi-scale harmonic window scores."""
        from potpourri.models.layers import gaussian_blur

        if not len(images):
            raise PotpourriError("winclip.score got no images")
        text, size, tau = self.text_features(), self.image_size, self.config.temperature
        scores, maps = [], []
        for start in range(0, len(images), self.config.batch_size):
            batch = torch.stack([self.tensor(i) for i in images[start : start + self.config.batch_size]])
            global_embedding, _ = self.towers.project_image(self.towers.frozen_image_features(batch))
            scores.append(image_logits(global_embedding, text, tau).softmax(-1)[:, 1])
            per_scale = []
            for scale in self.config.scales:
                windows = self.towers.window_embeddings(batch, scale)  # (B, h', w', D)
                probs = (F.normalize(windows, dim=-1) @ F.normalize(text, dim=-1).T / tau).softmax(-1)[..., 1]
                per_scale.append(harmonic_window_map(probs, scale))  # (B, h, w)
            cell_map = torch.stack(per_scale).mean(0)[:, None]  # (B, 1, h, w)
            upsampled = F.interpolate(cell_map, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            maps.append(gaussian_blur(upsampled, self.config.sigma))
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        bridge = {n: p for n, p in self.towers.named_parameters() if any(p is q for q in self.towers.bridge_parameters)}
        return {"text": self.text_features().clone(), **{n: p.detach().clone() for n, p in bridge.items()}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "text" not in tensors:
            raise PotpourriError("the saved tensors hold no 'text': not a WinCLIP run; refit")
        own = {n: p for n, p in self.towers.named_parameters() if any(p is q for q in self.towers.bridge_parameters)}
        if set(tensors) - {"text"} != set(own):
            raise PotpourriError("saved bridge tensors do not match these towers; refit with the same --clip/towers")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name])
        self._text = tensors["text"].float()

    def fit_summary(self) -> dict[str, Any]:
        normal, anomalous = prompt_ensemble(self.config.object_name)
        return {
            **super().fit_summary(),
            "trainable_parameters": sum(p.numel() for p in self.towers.bridge_parameters),
            "prompts": {"normal": len(normal), "anomalous": len(anomalous)},
            "scales": list(self.config.scales),
        }


def config_from_args(args: Any) -> WinCLIPConfig:
    """The CLI's ``inspect fit --method winclip`` options as a config."""
    extra = {"object_name": args.object_name} if getattr(args, "object_name", None) else {}
    return WinCLIPConfig(**common_args(args), **extra)


METHOD = WinCLIP
