"""Training ``SmallClip`` contrastively on caption pairs, measuring it zero-shot, and writing it as a model.

Reading order: the loss (InfoNCE where equal captions are all positives) → the loop (``core.training.Trainer``:
resumable, the frozen text trunk cached once per distinct caption) → evaluation (zero-shot defect classification
with one sentence per class; image→text and text→image retrieval, each with its exact chance level) → the run files
(``model.safetensors``, ``config.json``, ``model_card.md``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions, epoch_batches, lr_at
from potpourri.data.captions import CaptionPairs, class_prompts
from potpourri.data.synth import CLASSES
from potpourri.models.clip_small import CONFIG_FILE, WEIGHTS_FILE, SmallClip

__all__ = [
    "ClipTrainConfig",
    "contrastive_loss",
    "embed_images",
    "embed_texts",
    "images_to_tensor",
    "retrieval_scores",
    "save_small_clip",
    "train_small_clip",
    "zero_shot_classification",
]

MEAN = STD = 0.5  # the model card's normalisation: x / 127.5 - 1


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float in [-1, 1]."""
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, caption_ids: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch where every pair sharing a caption is a positive (uniform soft targets).

    ``image_emb``/``text_emb`` (B, D), ``caption_ids`` (B,); with distinct captions this is CLIP's loss exactly.
    """
    scale = logit_scale.clamp(max=math.log(100.0)).exp()
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, B)
    same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)  # symmetric
    targets = same / same.sum(1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets.T * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@dataclass
class ClipTrainConfig:
    """The contrastive loop's knobs."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    text_lr: float = 5e-5  # the tuned MiniLM layers (pretrained: a smaller step)
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0


class _Trained(nn.Module):
    """The parts of a ``SmallClip`` that training changes, as one module (checkpoints skip the frozen MiniLM)."""

    def __init__(self, model: SmallClip) -> None:
        super().__init__()
        self.visual, self.image_projection, self.text_projection = (
            model.visual,
            model.image_projection,
            model.text_projection,
        )
        self.text_layers = nn.ModuleList(model.text.bert.encoder.layer[model.frozen_text_layers :])
        self.logit_scale = model.logit_scale


def train_small_clip(
    model: SmallClip,
    pairs: CaptionPairs,
    cfg: ClipTrainConfig,
    *,
    options: TrainOptions | None = None,
    folder: str | Path | None = None,
) -> list[float]:
    """Train ``model`` on ``pairs`` for ``cfg.steps`` steps (checkpoints in ``folder``); returns per-step losses.

    Batches are a function of (seed, epoch) and the checkpoint holds every tensor that trains, so a killed run
    resumed with ``options.resume`` ends bitwise where an uninterrupted one does (on the CPU). Under torchrun each
    process embeds its slice of every batch and the loss runs on the gathered embeddings (negatives of the whole
    batch, ``Trainer.unshard``).
    """
    if len(pairs) < cfg.batch_size:
        raise PotpourriError(f"{len(pairs)} caption pairs are fewer than one batch of {cfg.batch_size}")
    options = options or TrainOptions(progress=False)
    distinct, caption_ids = pairs.caption_ids()
    input_ids, attention_mask = model.tokenize(distinct)
    hidden = torch.cat(
        [model.text_trunk(input_ids[i : i + 256], attention_mask[i : i + 256]) for i in range(0, len(distinct), 256)]
    )  # fmt: skip  (G, T, 384), frozen
    trained = _Trained(model)
    text_layers = set(map(id, trained.text_layers.parameters()))
    decay, no_decay, text = [], [], []
    for name, p in trained.named_parameters():
        if not p.requires_grad:
            continue
        (text if id(p) in text_layers else decay if p.ndim >= 2 and "pos_embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
              {"params": text, "weight_decay": cfg.weight_decay, "base_lr": cfg.text_lr}]  # fmt: skip
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    trainer = Trainer(trained, optimizer, total_steps=cfg.steps, options=options, folder=folder,
                      params=[p for g in groups for p in g["params"]], desc="clip training")  # fmt: skip
    if trainer.state.setdefault("config", asdict(cfg)) != asdict(cfg):
        raise PotpourriError(f"'{folder}' was checkpointed with another config; use a new --out or the same options")
    losses = trainer.state.setdefault("losses", [])
    device = trainer.device
    hidden, attention_mask = hidden.to(device), attention_mask.to(device)
    ids = torch.from_numpy(caption_ids)
    per_epoch = len(pairs) // cfg.batch_size
    model.train()
    for step in trainer.steps():
        epoch, position = divmod(step, per_epoch)
        batch = epoch_batches(len(pairs), cfg.batch_size, seed=cfg.seed, epoch=epoch, shuffle=True, drop_last=True)
        index = np.asarray(batch[position])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base=group["base_lr"], total=cfg.steps, warmup=cfg.warmup)
        local, _ = trainer.shard(index)  # under torchrun: this process embeds index[rank::world]
        images = images_to_tensor(pairs.images[local]).to(device)  # (b, 3, S, S)
        unique, inverse = ids[local].unique(return_inverse=True)
        with trainer.autocast():
            text_emb = model.text_head(hidden[unique.to(device)], attention_mask[unique.to(device)])  # (U, D)
            # every process scores the whole batch (its negatives) on the gathered embeddings: the one-process loss
            image_emb = trainer.unshard(model.encode_image(images))  # (B, D)
            text_emb = trainer.unshard(text_emb[inverse.to(device)])  # (B, D)
            loss = contrastive_loss(image_emb, text_emb, ids[index].to(device), model.logit_scale)
        losses.append(round(loss.item(), 5))
        trainer.update(loss)
    trainer.finish()
    model.eval()
    return list(losses)


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_images(model: SmallClip, images: np.ndarray, *, batch_size: int = 128) -> torch.Tensor:
    """Unit-norm image embeddings (N, D) of uint8 (N, S, S, 3) images."""
    device = next(model.parameters()).device
    parts = [model.encode_image(images_to_tensor(images[i : i + batch_size]).to(device)).float().cpu()
             for i in range(0, len(images), batch_size)]  # fmt: skip
    return F.normalize(torch.cat(parts), dim=-1)


@torch.no_grad()
def embed_texts(model: SmallClip, texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm text embeddings (N, D)."""
    parts = [model.encode_texts(texts[i : i + 256]).float().cpu() for i in range(0, len(texts), 256)]
    return F.normalize(torch.cat(parts), dim=-1)


def zero_shot_classification(model: SmallClip, pairs: CaptionPairs) -> dict[str, Any]:
    """Accuracy of the nearest class sentence ("a moon surface with a crack") over good + the six defects.

    Only whole single-kind images count (no close-ups, no "multi"); each image is compared with its own surface's
    seven sentences. Chance is the share of the most frequent class (1/7 when balanced).
    """
    keep = [i for i, (s, k) in enumerate(zip(pairs.sources, pairs.kinds, strict=True)) if s == "image" and k in CLASSES]
    if not keep:
        raise PotpourriError("no whole single-kind DS-Synth images to classify")
    emb = embed_images(model, pairs.images[keep])
    truth = np.array([CLASSES.index(pairs.kinds[i]) for i in keep])
    predicted = np.empty_like(truth)
    for category in sorted({pairs.categories[i] for i in keep}):
        rows = np.array([j for j, i in enumerate(keep) if pairs.categories[i] == category])
        predicted[rows] = (emb[rows] @ embed_texts(model, class_prompts(category)).T).argmax(1).numpy()
    per_class = {c: float((predicted[truth == k] == k).mean()) for k, c in enumerate(CLASSES) if (truth == k).any()}
    return {
        "accuracy": float((predicted == truth).mean()),
        "chance": float(np.bincount(truth).max() / len(truth)),
        "per_class": per_class,
        "images": len(keep),
    }


def _chance_at_k(total: int, hits: int, k: int) -> float:
    """P(at least one of ``hits`` relevant items among the first ``k`` of ``total`` in random order)."""
    return 1.0 - math.comb(total - hits, k) / math.comb(total, k) if k <= total else 1.0


def retrieval_scores(
    image_emb: torch.Tensor, captions: Sequence[str], text_emb: torch.Tensor, gallery: Sequence[str],
    kinds: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
) -> dict[str, float]:  # fmt: skip
    """Image→text (gallery = distinct captions) and text→image recall@k, each with its exact chance level.

    ``image_emb`` (N, D) unit-norm with their ``captions``; ``text_emb`` (G, D) unit-norm for ``gallery``. With
    ``kinds`` also the share of images whose top caption names their own kind (and its chance).
    """
    lookup = {c: g for g, c in enumerate(gallery)}
    truth = torch.tensor([lookup[c] for c in captions])  # (N,)
    sims = image_emb @ text_emb.T  # (N, G)
    n, g = sims.shape
    out: dict[str, float] = {"images": n, "gallery": g}
    ranked_text = sims.argsort(1, descending=True)
    ranked_image = sims.T.argsort(1, descending=True)  # (G, N)
    counts = torch.bincount(truth, minlength=g)
    for k in ks:
        out[f"i2t_r{k}"] = float((ranked_text[:, :k] == truth[:, None]).any(1).float().mean())
        out[f"i2t_r{k}_chance"] = min(1.0, k / g)
        hit = (truth[ranked_image[:, :k]] == torch.arange(g)[:, None]).any(1).float()  # (G,)
        out[f"t2i_r{k}"] = float(hit.mean())
        out[f"t2i_r{k}_chance"] = float(np.mean([_chance_at_k(n, int(m), k) for m in counts]))
    if kinds is not None:
        kind_of = dict(zip(captions, kinds, strict=True))
        top = ranked_text[:, 0].tolist()
        out["i2t_kind"] = float(np.mean([kind_of.get(gallery[t]) == kinds[i] for i, t in enumerate(top)]))
        gallery_kinds = [kind_of.get(c) for c in gallery]
        out["i2t_kind_chance"] = float(np.mean([np.mean([gk == k for gk in gallery_kinds]) for k in kinds]))
    return out


def retrieval(model: SmallClip, pairs: CaptionPairs) -> dict[str, float]:
    """``retrieval_scores`` on the whole images of ``pairs`` against their distinct captions."""
    keep = [i for i, s in enumerate(pairs.sources) if s == "image"]
    captions = [pairs.captions[i] for i in keep]
    gallery = sorted(set(captions))
    return retrieval_scores(
        embed_images(model, pairs.images[keep]), captions, embed_texts(model, gallery), gallery,
        kinds=[pairs.kinds[i] for i in keep],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- saving
def save_small_clip(model: SmallClip, folder: str | Path, config: dict[str, Any], card: str) -> Path:
    """Write ``model.safetensors`` (what trained), ``config.json`` (to rebuild it) and ``model_card.md``."""
    from potpourri.core.io import atomic_write_bytes, save_state_dict_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_pretrained = config.get("text_pretrained", True)  # a random MiniLM cannot be rebuilt: save all of it
    state = (
        model.trained_state()
        if text_pretrained
        else {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    )
    state = {k: v.cpu() for k, v in state.items()}
    save_state_dict_atomic(state, folder / WEIGHTS_FILE, metadata={"format": "pt", "model": "clip_vit_tiny_minilm"})
    atomic_write_bytes(
        folder / CONFIG_FILE, json.dumps({**config, "text_pretrained": text_pretrained}, indent=2).encode()
    )
    atomic_write_bytes(folder / "model_card.md", card.encode())
    return folder / WEIGHTS_FILE
