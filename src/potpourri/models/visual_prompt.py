"""AutoVP's modules (Tsao et al., ICLR 2024): the padding prompt, the label mappings (frequency, semantic, fully
connected) and ``VisualPromptModel`` = prompt -> frozen source classifier -> mapping. The search is in
``tune/visual_prompt``, the experiment in ``papers/autovp``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from potpourri.core.errors import PotpourriError

MAPPINGS = ("freq", "iter", "semantic", "fully")


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class PaddingPrompt(nn.Module):
    """Resize to ``canvas - 2*width``, pad to ``canvas``, zoom by ``scale``, add ``sigmoid(delta)`` on the border."""

    def __init__(
        self,
        canvas: int,
        width: int,
        *,
        scale: float = 1.0,
        learn_scale: bool = True,
        prompt: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not 0 <= 2 * width < canvas:
            raise PotpourriError(
                f"prompt width {width} leaves no image in a {canvas}px canvas; use width < {canvas // 2}"
            )
        self.canvas_size, self.width, self.use_prompt = canvas, width, prompt
        self.image_size = canvas - 2 * width
        self.delta = nn.Parameter(torch.zeros(3, canvas, canvas))  # sigmoid(0) = 0.5: a grey border at the start
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def visible_side(self) -> int:
        """Side in pixels of the zoomed image inside the canvas (the prompt covers everything outside it)."""
        return min(self.canvas_size, max(1, round(self.image_size * float(self.scale.detach()))))

    def mask(self) -> torch.Tensor:
        """(1, C, C) 1 on the border the prompt may change, 0 on the image."""
        mask = torch.ones(1, self.canvas_size, self.canvas_size, device=self.delta.device)
        side = self.visible_side()
        lo = (self.canvas_size - side) // 2
        mask[:, lo : lo + side, lo : lo + side] = 0
        return mask

    def place(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, C, C): resized, centred on black, zoomed by ``scale``."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        lo = self.width
        x = F.pad(x, (lo, self.canvas_size - self.image_size - lo, lo, self.canvas_size - self.image_size - lo))
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / self.scale  # output (u, v) samples input (u/s, v/s): a zoom by s
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, C, C, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def canvas(self, images: torch.Tensor) -> torch.Tensor:
        """The prompted canvas in pixel space, before normalisation (B, 3, C, C)."""
        x = self.place(images)
        if self.use_prompt:
            x = x + torch.sigmoid(self.delta) * self.mask()
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> (B, 3, C, C), normalised
        return (self.canvas(images) - self.mean) / self.std


class IndexMap(nn.Module):
    """Target logit k = mean of the source logits ``index[k]`` (FreqMap, IterMap, SemanticMap); no parameters."""

    def __init__(self, num_source: int, num_target: int, num_map: int = 1) -> None:
        super().__init__()
        if num_target * num_map > num_source:
            raise PotpourriError(f"{num_target} classes × num_map {num_map} exceed the {num_source} source classes")
        self.num_source = num_source
        self.register_buffer("index", torch.arange(num_target * num_map).view(num_target, num_map))  # (K, m)

    def set_index(self, index: torch.Tensor) -> None:
        self.index.copy_(torch.as_tensor(index, dtype=torch.long).view_as(self.index))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, K)
        return logits[:, self.index].mean(-1)  # (B, K, m) -> (B, K)


class FullyMap(nn.Module):
    """FullyMap: a linear layer from the source logits to the task's classes."""

    def __init__(self, num_source: int, num_target: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_source, num_target)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, K)
        return self.fc(logits)


def cooccurrence(source_pred: torch.Tensor, labels: torch.Tensor, num_source: int, num_target: int) -> torch.Tensor:
    """(S, K) counts of (source argmax, target label) pairs."""
    flat = source_pred.long() * num_target + labels.long()
    return torch.bincount(flat, minlength=num_source * num_target).view(num_source, num_target)


def frequency_mapping(counts: torch.Tensor, num_map: int = 1) -> torch.Tensor:
    """(K, num_map) source indices: greedy over cells by count, each source used once (AutoVP's FreqMap).

    Targets left short (too few non-zero cells) take the lowest unused source indices, as AutoVP does.
    """
    num_source, num_target = counts.shape
    chosen: list[list[int]] = [[] for _ in range(num_target)]
    used = torch.zeros(num_source, dtype=torch.bool)
    flat = counts.flatten().double()
    order = torch.argsort(-flat, stable=True)  # ties: lower source index first
    for cell in order.tolist():
        if flat[cell] <= 0 or all(len(c) == num_map for c in chosen):
            break
        source, target = divmod(cell, num_target)
        if len(chosen[target]) < num_map and not used[source]:
            chosen[target].append(source)
            used[source] = True
    free = iter(torch.nonzero(~used).flatten().tolist())
    for target in range(num_target):
        while len(chosen[target]) < num_map:
            chosen[target].append(next(free))
    return torch.tensor(chosen, dtype=torch.long)


def semantic_mapping(source_emb: torch.Tensor, target_emb: torch.Tensor, num_map: int = 1) -> torch.Tensor:
    """(K, num_map): round robin over targets, each takes its most cosine-similar unused source class."""
    sim = F.normalize(target_emb.float(), dim=-1) @ F.normalize(source_emb.float(), dim=-1).T  # (K, S)
    order = torch.argsort(-sim, dim=1, stable=True)
    used = torch.zeros(source_emb.shape[0], dtype=torch.bool)
    chosen: list[list[int]] = [[] for _ in range(target_emb.shape[0])]
    for _ in range(num_map):
        for target in range(target_emb.shape[0]):
            source = next(s for s in order[target].tolist() if not used[s])
            chosen[target].append(source)
            used[source] = True
    return torch.tensor(chosen, dtype=torch.long)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in logit order ("tench, Tinca tinca", …), shipped with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


class VisualPromptModel(nn.Module):
    """prompt (input transform) -> frozen source classifier -> label mapping."""

    def __init__(self, prompt: PaddingPrompt, source: nn.Module, mapping: nn.Module) -> None:
        super().__init__()
        self.prompt, self.source, self.mapping = prompt, source, mapping
        self.source.requires_grad_(False)
        self.source.keep_frozen = True  # strategies never train it (see strategies.frozen_by_design)

    def block_map(self) -> dict[str, list[str]]:
        """The block map the ``visual-prompt`` strategy trains: prompt and mapping, never the source."""
        return {"prompt": ["prompt"], "source": ["source"], "mapping": ["mapping"]}

    def source_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.source(self.prompt(images))  # (B, 3, h, w) -> (B, S)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> (B, K)
        return self.mapping(self.source_logits(images))

    @torch.no_grad()
    def remap_frequency(self, data: TensorDataset, *, batch_size: int = 64) -> torch.Tensor:
        """FreqMap with the current prompt: set the mapping from the source argmax / label counts on ``data``."""
        if not isinstance(self.mapping, IndexMap):
            raise PotpourriError("frequency mapping needs an IndexMap; this model uses a FullyMap")
        was_training = self.training
        self.eval()
        images, labels = data.tensors[0], data.tensors[1]
        preds = torch.cat(
            [self.source_logits(images[i : i + batch_size]).argmax(1) for i in range(0, len(data), batch_size)]
        )
        self.train(was_training)
        index = frequency_mapping(
            cooccurrence(preds, labels, self.mapping.num_source, len(self.mapping.index)), self.mapping.index.shape[1]
        )
        self.mapping.set_index(index)
        return index
