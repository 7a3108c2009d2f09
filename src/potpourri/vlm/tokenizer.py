"""Training the SEED-style visual tokenizer (``models/visual_tokenizer``) on cached frozen features: one readable
loop (AdamW, cosine schedule, dead-code restarts) stepping through ``core.training.Trainer``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.visual_tokenizer import SEEDTokenizer
from potpourri.vlm.clip import contrastive_loss
from potpourri.vlm.train import model_device


@dataclass
class TokenizerTrainConfig:
    """One readable loop: AdamW, cosine schedule, batches of cached frozen features."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    restart_every: int = 50  # steps between dead-code checks (when the model's config restarts them)
    text_weight: float = 1.0  # SEED's text alignment (with ``captions``): weight of the contrastive term
    text_temperature: float = 0.07  # its fixed softmax temperature
    seed: int = 0
    progress: bool = True


@dataclass
class TrainHistory:
    """Per-step losses and the number of codes restarted at each check."""

    loss: list[float] = field(default_factory=list)
    recon_loss: list[float] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)
    text_loss: list[float] = field(default_factory=list)  # the contrastive term (with ``captions``)


def train_tokenizer(
    model: SEEDTokenizer,
    features: torch.Tensor,
    config: TokenizerTrainConfig | None = None,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
    captions: torch.Tensor | None = None,
    caption_ids: torch.Tensor | None = None,
) -> TrainHistory:
    """Train the tokenizer on cached frozen features ``(N, C, h, w)`` (or ``(N, T, C)``); returns the history.

    ``captions`` ``(N, text_dim)``: frozen caption embeddings of the same images (a model with ``text_dim``); adds
    SEED's text alignment, a contrastive loss between the last causal query's text embedding and its caption in
    which every pair sharing ``caption_ids`` (default: all distinct) is a positive.

    ``options``: device, precision, checkpoint cadence, resume (from ``checkpoints``, a folder; the codebook buffers,
    the batch generator and the history are checkpointed, so a resumed run ends bitwise where a straight one does).
    Under torchrun each process trains on its slice of every batch; usage counts, EMA sums and the remembered outputs
    of dead-code restarts are the global batch's, so every process restarts the same codes.
    """
    cfg = config or TokenizerTrainConfig()
    if features.shape[0] == 0:
        raise PotpourriError("no features to train on; encode some images first")
    if captions is not None:
        if model.text_head is None or captions.shape != (features.shape[0], model.config.text_dim):
            raise PotpourriError(f"captions of shape {tuple(captions.shape)} need a tokenizer with text_dim = "
                                 f"{captions.shape[-1]} and one caption per feature ({features.shape[0]})")  # fmt: skip
        caption_ids = torch.arange(len(captions)) if caption_ids is None else caption_ids
        log_scale = torch.tensor(math.log(1.0 / cfg.text_temperature))
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    options = options or TrainOptions(device=model_device(model), progress=cfg.progress)  # fp32 where the model is
    trainer = Trainer(model, optimizer, total_steps=cfg.steps, options=options, folder=checkpoints, params=params,
                      generators={"batches": generator}, desc="seed tokenizer")  # fmt: skip
    history = trainer.state
    if not history:
        history.update(loss=[], recon_loss=[], restarted=[], text_loss=[])

    def restart_due(step: int) -> bool:  # after ``step``; none in the last stretch: codes must settle before the end
        last_stretch = step >= cfg.steps - cfg.restart_every
        return model.config.restart_dead and (step + 1) % cfg.restart_every == 0 and not last_stretch

    model.train()
    for step in trainer.steps():
        # the restart due after the previous step runs here, before this step's batch (the same draws in the same
        # order as right after that step), so a checkpoint written by that step's update already holds nothing of it
        if step > 0 and restart_due(step - 1):
            dead = model.quantizer.restart_dead_codes(model.config.dead_threshold, generator=generator)
            history["restarted"].append(len(dead))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        index = torch.randint(features.shape[0], (min(cfg.batch_size, features.shape[0]),), generator=generator)
        local, share = trainer.shard(index)  # under torchrun: index[rank::world]; codebook statistics stay global
        with trainer.autocast():
            out = model(features[local].to(trainer.device), processes=trainer if trainer.group.distributed else None)
        history["loss"].append(trainer.mean_over_processes(float(out.loss.detach()) * share))
        history["recon_loss"].append(trainer.mean_over_processes(float(out.recon_loss.detach()) * share))
        loss = out.loss * share
        if captions is not None:  # every process scores the whole batch (negatives of the global batch)
            text = contrastive_loss(trainer.unshard(out.text.float()), captions[index].to(trainer.device),
                                    caption_ids[index].to(trainer.device), log_scale)  # fmt: skip
            history["text_loss"].append(float(text.detach()))
            loss = loss + cfg.text_weight * text
        trainer.update(loss)
    trainer.finish()
    model.eval()
    return TrainHistory(list(history["loss"]), list(history["recon_loss"]), list(history["restarted"]),
                        list(history.get("text_loss", [])))  # fmt: skip
