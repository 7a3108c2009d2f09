"""Training the SEED-style visual tokenizer (``models/visual_tokenizer``) on cached frozen features: one readable
loop (AdamW, cosine schedule, dead-code restarts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from potpourri.core.errors import PotpourriError
from potpourri.models.visual_tokenizer import SEEDTokenizer


@dataclass
class TokenizerTrainConfig:
    """One readable loop: AdamW, cosine schedule, batches of cached frozen features."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    restart_every: int = 50  # steps between dead-code checks (when the model's config restarts them)
    seed: int = 0
    progress: bool = True


@dataclass
class TrainHistory:
    """Per-step losses and the number of codes restarted at each check."""

    loss: list[float] = field(default_factory=list)
    recon_loss: list[float] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)


def train_tokenizer(
    model: SEEDTokenizer, features: torch.Tensor, config: TokenizerTrainConfig | None = None
) -> TrainHistory:
    """Train the tokenizer on cached frozen features ``(N, C, h, w)`` (or ``(N, T, C)``); returns the history."""
    from tqdm.auto import tqdm

    cfg = config or TokenizerTrainConfig()
    if features.shape[0] == 0:
        raise PotpourriError("no features to train on; encode some images first")
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory()
    model.train()
    for step in tqdm(range(cfg.steps), desc="seed tokenizer", disable=not cfg.progress):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        index = torch.randint(features.shape[0], (min(cfg.batch_size, features.shape[0]),), generator=generator)
        out = model(features[index])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        history.loss.append(float(out.loss.detach()))
        history.recon_loss.append(float(out.recon_loss.detach()))
        last_stretch = step >= cfg.steps - cfg.restart_every  # no restart right before the end: codes must settle
        if model.config.restart_dead and (step + 1) % cfg.restart_every == 0 and not last_stretch:
            dead = model.quantizer.restart_dead_codes(model.config.dead_threshold, generator=generator)
            history.restarted.append(len(dead))
    model.eval()
    return history
