"""Learning to prompt a frozen SAM (SSPrompt: SpaPrompt + SemPrompt, Huang et al., arXiv 2401.04651), small and on CPU.

A click lives in a 2-D coordinate space that the prompt encoder maps to tokens; SSPrompt learns the tokens
directly in the prompt-embedding space instead and blends them with what the pretrained encoder produces:

    sparse = a ⊙ PromptEncoder(anchor clicks) + (1 - a) ⊙ spatial_tokens      # SpaPrompt, a ∈ [0, 1]^(K, C)
    dense  = b ⊙ no_mask_embed               + (1 - b) ⊙ semantic_dense      # SemPrompt, b ∈ [0, 1]^C

The anchor clicks (pixel coordinates), the tokens, the dense map and both blend weights are the only parameters;
the SAM stays frozen. One prompt per defect class segments that class with no clicks. Because the spatial tokens
start as the encoder's tokens for the anchor click, the learned space contains every coordinate prompt: with
``a = 0`` and the tokens set to the encoder's output, the decoder sees exactly the click's tokens (tested).

Reading order: ``LearnedPrompt`` → ``decode_embeddings`` → ``learn_prompt`` / ``segment_with_prompt``. The
experiment (learned prompt vs the best single click vs the supervised segmenter) is ``papers/ssprompt``.

Example:
    >>> prompt = learn_prompt(sam, embeddings, targets, PromptConfig(steps=300))  # doctest: +SKIP
    >>> masks = segment_with_prompt(sam, prompt, embeddings)  # (N, S, S) bool  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.sam import PromptEncoder, Sam
from potpourri.segment.sam import prompt_mask_loss

__all__ = [
    "LearnedPrompt",
    "PromptConfig",
    "decode_embeddings",
    "learn_prompt",
    "segment_with_prompt",
]

LEARN_MODES = ("embedding", "coordinates")


# ----------------------------------------------------------------------------------------------- the prompt
class LearnedPrompt(nn.Module):
    """Spatial (sparse) and semantic (dense) prompt embeddings blended with the frozen prompt encoder's output."""

    def __init__(
        self, prompt_encoder: PromptEncoder, *, anchor_points: torch.Tensor | None = None, dense_map: bool = True
    ) -> None:
        """``dense_map``: the semantic embedding is a (C, h, w) map; otherwise one (C, 1, 1) vector for all places."""
        super().__init__()
        h, w = prompt_encoder.image_embedding_size
        if anchor_points is None:  # one click at the image centre
            height, width = prompt_encoder.input_image_size
            anchor_points = torch.tensor([[width / 2 - 0.5, height / 2 - 0.5]])
        device = prompt_encoder.no_mask_embed.weight.device  # built where the SAM is
        anchor_points = anchor_points.detach().float().reshape(-1, 2).to(device)
        self.anchor_points = nn.Parameter(anchor_points.clone())  # (P, 2) pixel (x, y)
        with torch.no_grad():
            sparse, dense = self.encoded(prompt_encoder)
        self.spatial_tokens = nn.Parameter(sparse[0].clone())  # (P + 1, C): the clicks and the "not a point" pad
        self.semantic_dense = nn.Parameter(dense[0].clone() if dense_map else dense[0, :, :1, :1].clone())  # (C, h, w)
        self.sparse_blend = nn.Parameter(torch.full_like(self.spatial_tokens, 0.5))  # weight of the encoder's tokens
        self.dense_blend = nn.Parameter(torch.full((sparse.shape[-1],), 0.5))  # weight of the encoder's dense map
        self.image_embedding_size = (h, w)

    def encoded(self, prompt_encoder: PromptEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's (sparse (1, P+1, C), dense (1, C, h, w)) for the anchor clicks (all positive)."""
        labels = torch.ones(1, len(self.anchor_points), dtype=torch.long, device=self.anchor_points.device)
        return prompt_encoder(self.anchor_points[None], labels, None, 1)

    def forward(self, prompt_encoder: PromptEncoder, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended (sparse (B, P+1, C), dense (B, C, h, w)) prompt embeddings."""
        encoded_sparse, encoded_dense = self.encoded(prompt_encoder)
        a = self.sparse_blend.clamp(0, 1)
        sparse = a * encoded_sparse[0] + (1 - a) * self.spatial_tokens  # (P+1, C)
        b = self.dense_blend.clamp(0, 1)[:, None, None]
        dense = b * encoded_dense[0] + (1 - b) * self.semantic_dense  # (C, h, w); a (C, 1, 1) vector broadcasts
        return sparse.expand(batch, -1, -1), dense.expand(batch, -1, -1, -1)

    def set_mode(self, mode: str) -> None:
        """``embedding``: everything learns (SSPrompt); ``coordinates``: only the anchor clicks move, blends at 1."""
        if mode not in LEARN_MODES:
            raise PotpourriError(f"unknown prompt mode '{mode}'; choose {', '.join(LEARN_MODES)}")
        coordinates_only = mode == "coordinates"
        if coordinates_only:
            with torch.no_grad():
                self.sparse_blend.fill_(1.0)
                self.dense_blend.fill_(1.0)
        for name, p in self.named_parameters():
            p.requires_grad_(name == "anchor_points" or not coordinates_only)


def decode_embeddings(
    sam: Sam, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, *, multimask_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder on image embeddings (B, C, h, w) and given prompt embeddings → (logits, IoU predictions)."""
    return sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)


@torch.no_grad()
def image_embeddings(sam: Sam, images: np.ndarray, *, batch: int = 16) -> torch.Tensor:
    """(N, S, S, 3) uint8 at the SAM's ``image_size`` → frozen image embeddings (N, C, S/16, S/16), on its device."""
    return torch.cat([sam.image_encoder.neck(sam.backbone_features(images[i : i + batch]))
                      for i in range(0, len(images), batch)])  # fmt: skip


# ----------------------------------------------------------------------------------------------- learning
@dataclass
class PromptConfig:
    """How one class prompt is learned (the SAM is never updated)."""

    mode: str = "embedding"  # embedding (SSPrompt) | coordinates (only the click coordinates, the 2-D baseline)
    dense_map: bool = True  # the semantic (dense) embedding: a (C, h, w) map, or one (C,) vector for all places
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-2  # tokens, dense map, blend weights
    coordinate_lr: float = 1.0  # anchor clicks, in pixels
    focal_weight: float = 20.0
    seed: int = 0


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def learn_prompt(
    sam: Sam,
    embeddings: torch.Tensor,
    targets: np.ndarray,
    config: PromptConfig | None = None,
    *,
    prompt: LearnedPrompt | None = None,
    progress: bool = False,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> tuple[LearnedPrompt, list[float]]:
    """Learn a class prompt on frozen image embeddings (N, C, h, w) and binary targets (N, S, S); SAM frozen.

    ``options`` (device, precision, resume, ...) and ``checkpoints`` (a folder) go to ``core.training.Trainer``; the
    SAM moves to the trainer's device.

    Example:
        prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks == class_id)
    """
    cfg = config or PromptConfig()
    if len(embeddings) != len(targets) or not len(targets):
        raise PotpourriError(f"{len(embeddings)} embeddings vs {len(targets)} targets; pass one mask per image (>0)")
    options = options or TrainOptions(progress=progress)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sam.eval().requires_grad_(False)
    prompt = prompt or LearnedPrompt(sam.prompt_encoder, dense_map=cfg.dense_map)
    prompt.set_mode(cfg.mode)
    groups = [{"params": [prompt.anchor_points], "lr": cfg.coordinate_lr}]
    rest = [p for n, p in prompt.named_parameters() if n != "anchor_points" and p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    trainer = Trainer(prompt, optimizer, total_steps=cfg.steps, options=options, folder=checkpoints,
                      schedulers={"lr": schedule}, generators={"batches": generator},
                      desc=f"ssprompt-{cfg.mode}")  # fmt: skip
    device = trainer.device
    sam.to(device)  # frozen, not checkpointed
    embeddings = embeddings.to(device)
    size = sam.config.image_size
    target = torch.from_numpy(np.asarray(targets, bool)).float()[:, None].to(device)  # (N, 1, S, S)
    losses = trainer.state.setdefault("losses", [])
    for _ in trainer.steps():
        _clamp_clicks(prompt, size)  # before the forward pass (not after the step), so checkpoints need no clamp
        # every process draws the global batch (one generator state), then keeps its slice (torchrun)
        chosen, share = trainer.shard(torch.randint(len(target), (cfg.batch_size,), generator=generator))
        with trainer.autocast():
            sparse, dense = prompt(sam.prompt_encoder, len(chosen))
            logits, _ = decode_embeddings(sam, embeddings[chosen], sparse, dense)  # (B, 1, S/4, S/4)
        logits = _upsample(logits.float(), size)
        loss = prompt_mask_loss(logits, target[chosen], focal_weight=cfg.focal_weight).mean() * share
        losses.append(trainer.mean_over_processes(float(loss.detach())))  # before update: its checkpoint holds it
        trainer.update(loss)
    trainer.finish()
    _clamp_clicks(prompt, size)
    return prompt, list(losses)


@torch.no_grad()
def _clamp_clicks(prompt: LearnedPrompt, size: int) -> None:
    """Keep the anchor clicks on the image."""
    prompt.anchor_points[:, 0].clamp_(0, size - 1)
    prompt.anchor_points[:, 1].clamp_(0, size - 1)


@torch.no_grad()
def segment_with_prompt(sam: Sam, prompt: LearnedPrompt, embeddings: torch.Tensor, *, batch: int = 32) -> np.ndarray:
    """Zero-click masks (N, S, S) bool from a learned class prompt."""
    out = []
    for first in range(0, len(embeddings), batch):
        chunk = embeddings[first : first + batch]
        sparse, dense = prompt(sam.prompt_encoder, len(chunk))
        logits, _ = decode_embeddings(sam, chunk, sparse, dense)
        out.append((_upsample(logits.float(), sam.config.image_size)[:, 0] > 0).cpu().numpy())
    return np.concatenate(out)


def load_or_pretrain_sam(
    sam_path: str | os.PathLike | None,
    cfg: Any,
    save_to: Path,
    *,
    progress: bool = True,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> Sam:
    """The frozen SAM of the experiments: loaded from ``sam_path``, or pretrained with random clicks and boxes on
    DS-Synth (``cfg.sam_steps``, ``cfg.sam_per_category``; ``options`` and ``checkpoints`` as in ``train_sam``) and
    saved to ``save_to``. It ends on the device of ``options``."""
    from potpourri.core.registry import create_model
    from potpourri.core.training import resolve_device
    from potpourri.models.sam import SamConfig
    from potpourri.segment.sam import synth_regions, train_sam

    options = options or TrainOptions(progress=progress)
    if sam_path is not None:
        sam = Sam.load(sam_path)
        if sam.config.image_size != cfg.image_size:
            raise PotpourriError(f"{sam_path}: SAM image_size {sam.config.image_size} != {cfg.image_size}")
        sam.to(resolve_device(options.device))
    else:
        sam_cfg = SamConfig(image_size=cfg.image_size, steps=cfg.sam_steps, seed=cfg.seed)
        backbone = create_model(sam_cfg.backbone, pretrained=True)  # may draw random numbers (first conversion)
        with torch.random.fork_rng():  # the new heads' initialisation follows the run's seed, not the process's state
            torch.manual_seed(cfg.seed)
            sam = Sam(sam_cfg, backbone=backbone)
        images, items = synth_regions("train", cfg.sam_per_category, size=cfg.image_size, seed=cfg.seed)
        train_sam(sam, images, items, options=options, checkpoints=checkpoints)
        device = sam.pixel_mean.device
        sam.cpu().save(save_to)
        sam.to(device)
    return sam.eval().requires_grad_(False)
