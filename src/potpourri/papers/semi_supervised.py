"""``potpourri reproduce semi-supervised``: "Self-Supervision is Not All You Need: In Defense of Semi-Supervised
Learning" (submitted to ICLR 2024, **rejected**) at CPU scale.

The paper has no new algorithm: it compares semi-supervised learning (Semi-SL) with self-supervised pretraining
followed by fine-tuning (Self-SL) under the same labels, and claims Semi-SL wins in-domain and under perturbations.
This module is the evaluation harness with one method of each family, written here:

| arm | what it does with the same labelled set L and unlabelled set U, in the same number of optimiser steps |
|---|---|
| supervised | cross-entropy on L only (weak augmentation) |
| fixmatch | FixMatch (Sohn et al. 2020): CE on L + λ_u · mean(1[max p_weak ≥ τ] · CE(strong, argmax p_weak)) on U |
| fixmatch-lowtau | the same with τ = 0.7 instead of 0.95 (in a short schedule few predictions reach 0.95) |
| simclr | SimCLR (Chen et al. 2020): NT-Xent on two strong views of U for ``pretrain_fraction`` of the steps, then the
  projection head is dropped and encoder + a new linear head are fine-tuned on L (weak augmentation) |

Data: the object-in-clutter set (``potpourri.data.clutter``: 10 shape x colour-family classes, 32 px). The model:
a small CNN (4 convs, ~33 k parameters) so that each run takes a minute on one core. Reported: clean test
accuracy and the mean accuracy over a few ImageNet-C-style corruptions at two severities.

Augmentations are batched tensor ops seeded by a ``torch.Generator``. Colour changes keep the hue (brightness,
contrast, saturation only), because the class depends on the colour family (warm vs cool).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.core.distributed import ProcessGroup
from potpourri.core.errors import PotpourriError
from potpourri.core.results import mean_std
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import Trainer, TrainOptions, resolve_device
from potpourri.data.transforms import images_to_tensor
from potpourri.report.tables import markdown_table

__all__ = [
    "ARMS",
    "SemiSupConfig",
    "SmallCNN",
    "fixmatch_loss",
    "fixmatch_targets",
    "nt_xent",
    "reproduce_semisup",
    "run",
    "sharded_nt_xent",
    "strong_augment",
    "train_fixmatch",
    "train_simclr",
    "train_supervised",
    "weak_augment",
]

ARMS = ("supervised", "fixmatch", "fixmatch-lowtau", "simclr")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ----------------------------------------------------------------------------------------------- losses
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2N views, cross-entropy of its positive among the other 2N-1 (cosine / τ);
    ``reduction="none"`` gives the 2N terms."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise PotpourriError(f"nt_xent needs two (N, D) embeddings of the same shape, got {z1.shape} and {z2.shape}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # view i <-> view i ± N
    return F.cross_entropy(sim, positive, reduction=reduction)


def fixmatch_targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels (argmax of the weak view) and the confidence mask ``max softmax ≥ threshold``; no gradient."""
    probs = weak_logits.detach().float().softmax(dim=1)  # (B, K)
    confidence, pseudo = probs.max(dim=1)
    return pseudo, confidence >= threshold


def fixmatch_loss(
    labelled_logits: torch.Tensor,
    labels: torch.Tensor,
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    *,
    threshold: float = 0.95,
    lambda_u: float = 1.0,
    shares: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """FixMatch: CE on the labelled batch + ``lambda_u`` · mean over U of mask · CE(strong, pseudo-label from weak).

    ``shares``: the ``Trainer.shard`` factors of a process's labelled and unlabelled slices (each mean, and its
    statistic, becomes the slice's share of the global batch's)."""
    supervised = F.cross_entropy(labelled_logits, labels) * shares[0]
    pseudo, mask = fixmatch_targets(weak_logits, threshold)
    per_sample = F.cross_entropy(strong_logits, pseudo, reduction="none")  # (μB,)
    unsupervised = (per_sample * mask.float()).mean() * shares[1]  # FixMatch divides by μB, not by the number kept
    stats = {"loss_x": supervised.item(), "loss_u": unsupervised.item(),
             "mask_rate": mask.float().mean().item() * shares[1]}  # fmt: skip
    return supervised + lambda_u * unsupervised, stats


# ----------------------------------------------------------------------------------------------- augmentation
def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def weak_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """FixMatch's weak view: random horizontal flip and a random translation of up to 1/8 of the side (reflect pad)."""
    b, _, h, w = images.shape  # (B, 3, H, W) in [0, 1]
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip.view(b, 1, 1, 1), images.flip(3), images)
    pad = max(1, h // 8)
    padded = F.pad(out, (pad, pad, pad, pad), mode="reflect")  # (B, 3, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, 3, h, w + 2 * pad)
    out = padded.gather(2, rows)  # (B, 3, H, W+2p)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, 3, h, w)
    return out.gather(3, cols)  # (B, 3, H, W)


def strong_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The strong view: weak + random affine (rotate, shear, scale), brightness/contrast/saturation, and cutout."""
    b, _, h, w = images.shape
    x = weak_augment(images, gen)
    angle = _uniform(b, -math.pi / 6, math.pi / 6, gen)
    shear = _uniform(b, -0.3, 0.3, gen)
    scale = _uniform(b, 0.8, 1.2, gen)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)  # (B, 3, H, W)
    x = x + _uniform(b, -0.3, 0.3, gen).view(b, 1, 1, 1)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * _uniform(b, 0.5, 1.5, gen).view(b, 1, 1, 1)  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * _uniform(b, 0.4, 1.6, gen).view(b, 1, 1, 1)  # saturation: the hue family is kept
    x = x.clamp(0, 1)
    side = max(2, h // 4)  # cutout: a grey square, as in FixMatch's RandAugment
    cy = torch.randint(0, h, (b,), generator=gen).view(b, 1, 1)
    cx = torch.randint(0, w, (b,), generator=gen).view(b, 1, 1)
    yy, xx = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    hole = ((yy - cy).abs() <= side // 2) & ((xx - cx).abs() <= side // 2)  # (B, H, W)
    return torch.where(hole.unsqueeze(1), torch.full_like(x, 0.5), x)


# ----------------------------------------------------------------------------------------------- model
class SmallCNN(nn.Module):
    """A 4-conv CNN for 32 px images in [0, 1] (normalised inside); ``forward_features`` gives pooled (B, 4w)."""

    def __init__(self, num_classes: int, *, width: int = 16) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *conv(3, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.num_features = 4 * w
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - 0.5) / 0.5)  # (B, 4w)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes)


# ----------------------------------------------------------------------------------------------- training loops
def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _set_lr(opt: torch.optim.Optimizer, step: int, total: int, lr: float) -> None:
    from potpourri.core.training import lr_at

    for group in opt.param_groups:
        group["lr"] = lr_at(step, base=lr, total=total, warmup=max(1, total // 20))


def _sample(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` indices into ``n`` items: a fresh permutation, with wrap-around when k > n (labelled sets are tiny)."""
    reps = -(-k // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:k]


def _phase_options(options: TrainOptions | None, folder: Path | None, *, first: bool) -> TrainOptions:
    """A later phase resumes only when it had written a checkpoint (the run may have been killed before it began)."""
    options = options or TrainOptions(progress=False)
    if options.resume and not first and (folder is None or not (folder / "last.json").is_file()):
        return replace(options, resume=False)
    return options


def train_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    augment: Augment = weak_augment,
    progress: bool = False,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Cross-entropy on the labelled images for ``steps`` steps; returns the per-step loss.

    ``options`` sets device, precision, clipping and resume (from ``checkpoints``); ``progress`` is used only
    without ``options``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model.parameters(), lr, weight_decay)
    trainer = Trainer(
        model, opt, total_steps=steps, options=options or TrainOptions(progress=progress), folder=checkpoints,
        generators={"batches": gen}, desc="supervised",
    )  # fmt: skip
    model.train()
    losses: list[float] = trainer.state.setdefault("losses", [])
    for step in trainer.steps():
        _set_lr(opt, step, steps, lr)
        idx = _sample(len(images), batch_size, gen)
        x = augment(images[idx], gen)  # the global batch on every process, then this process's slice (torchrun)
        local, share = trainer.shard(range(len(idx)))
        x, y = x[list(local)].to(trainer.device), labels[idx][list(local)].to(trainer.device)
        with trainer.autocast():
            loss = F.cross_entropy(model(x), y) * share
        losses.append(trainer.mean_over_processes(loss.item()))  # before update: a checkpoint written there has it
        trainer.update(loss)
    trainer.finish()
    return list(losses)


def train_fixmatch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    unlabelled: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    mu: int = 3,
    threshold: float = 0.95,
    lambda_u: float = 1.0,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    weak: Augment = weak_augment,
    strong: Augment = strong_augment,
    progress: bool = False,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[dict[str, float]]:
    """FixMatch for ``steps`` steps: labelled, weak and strong batches in one forward (shared BN statistics)."""
    if len(unlabelled) == 0:
        raise PotpourriError("FixMatch needs unlabelled images; pass a non-empty `unlabelled` tensor")
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model.parameters(), lr, weight_decay)
    trainer = Trainer(
        model, opt, total_steps=steps, options=options or TrainOptions(progress=progress), folder=checkpoints,
        generators={"batches": gen}, desc="fixmatch",
    )  # fmt: skip
    model.train()
    history: list[dict[str, float]] = trainer.state.setdefault("history", [])
    for step in trainer.steps():
        _set_lr(opt, step, steps, lr)
        idx = _sample(len(images), batch_size, gen)
        uidx = _sample(len(unlabelled), mu * batch_size, gen)
        x_l, u = weak(images[idx], gen), unlabelled[uidx]
        u_weak, u_strong = weak(u, gen), strong(u, gen)
        y = labels[idx]
        # the global batches' augmentations on every process, then this process's slice of each (torchrun); the
        # two means (over B and over μB) each take their own share, so they add up to the global batch's loss
        local, share_l = trainer.shard(range(len(idx)))
        ulocal, share_u = trainer.shard(range(len(uidx)))
        x_l, y, u_weak, u_strong = x_l[list(local)], y[list(local)], u_weak[list(ulocal)], u_strong[list(ulocal)]
        batch = torch.cat([x_l, u_weak, u_strong]).to(trainer.device)
        n_l, n_u = len(x_l), len(u_weak)
        with trainer.autocast():
            logits = model(batch)  # (B + 2μB, K)
            loss, stats = fixmatch_loss(
                logits[:n_l],
                y.to(trainer.device),
                logits[n_l : n_l + n_u],
                logits[n_l + n_u :],
                threshold=threshold,
                lambda_u=lambda_u,
                shares=(share_l, share_u),
            )
        row = trainer.sums_over_processes({"loss": loss.item(), **stats})  # each a mean over the global batch
        history.append({k: v / trainer.group.world for k, v in row.items()})  # before update: its checkpoint has it
        trainer.update(loss)
    trainer.finish()
    return list(history)


def sharded_nt_xent(z: torch.Tensor, group: ProcessGroup, n: int, temperature: float) -> torch.Tensor:
    """This process's part of NT-Xent over a global batch of ``n`` images sliced ``[rank::world]``: ``z`` holds its
    images' first views, then their second views. Negatives come from every process (``gather_rows``); the rows
    of its own views, summed over 2n and times ``world``, make gradients that average to one process's."""
    everyone = group.gather_rows(z)  # per rank: its first views, then its second views
    first, second, offset = [0] * n, [0] * n, 0
    for rank in range(group.world):
        images = range(n)[rank :: group.world]
        for j, image in enumerate(images):
            first[image], second[image] = offset + j, offset + len(images) + j
        offset += 2 * len(images)
    mine = list(range(n)[group.rank :: group.world])
    anchors = torch.tensor(mine + [n + i for i in mine])
    per_view = nt_xent(everyone[first], everyone[second], temperature, reduction="none")  # (2n,)
    return per_view[anchors.to(per_view.device)].sum() / (2 * n) * group.world


class _Projector(nn.Module):
    def __init__(self, dim: int, out: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # (B, out)


def train_simclr(
    model: nn.Module,
    unlabelled: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 96,
    temperature: float = 0.2,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    augment: Augment = strong_augment,
    progress: bool = False,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """SimCLR pretraining of ``model.forward_features`` (a projection MLP is trained alongside and then dropped)."""
    gen = torch.Generator().manual_seed(seed)
    projector = _Projector(model.num_features)
    params = [*model.parameters(), *projector.parameters()]
    opt = _optimizer(params, lr, weight_decay)
    trainer = Trainer(
        model, opt, total_steps=steps, options=options or TrainOptions(progress=progress), folder=checkpoints,
        params=params, modules={"projector": projector}, generators={"batches": gen}, desc="simclr",
    )  # fmt: skip
    model.train()
    losses: list[float] = trainer.state.setdefault("losses", [])
    for step in trainer.steps():
        _set_lr(opt, step, steps, lr)
        u = unlabelled[_sample(len(unlabelled), batch_size, gen)]
        first, second = augment(u, gen), augment(u, gen)  # the global batch's views on every process
        local, _ = trainer.shard(range(len(u)))  # under torchrun: this process's images, both views
        views = torch.cat([first[list(local)], second[list(local)]]).to(trainer.device)
        with trainer.autocast():
            z = projector(model.forward_features(views)).float()  # (2b, out)
            if not trainer.group.distributed:
                loss = nt_xent(z[: len(u)], z[len(u) :], temperature)
            else:
                loss = sharded_nt_xent(z, trainer.group, len(u), temperature)
        losses.append(trainer.mean_over_processes(loss.item()))  # before update: a checkpoint written there has it
        trainer.update(loss)
    trainer.finish()
    return list(losses)


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class SemiSupConfig:
    """Settings of the comparison; the defaults take about 5 core-minutes (4 arms x 3 seeds)."""

    arms: tuple[str, ...] = ARMS
    labels_per_class: int = 10
    n_unlabelled: int = 2000
    n_test: int = 500
    image_size: int = 32
    width: int = 16
    steps: int = 300  # optimiser steps per arm (SimCLR: pretraining + fine-tuning together)
    batch_size: int = 16  # labelled batch
    mu: int = 3  # unlabelled batch = mu * batch_size (FixMatch) = SimCLR's batch of images (two views each)
    threshold: float = 0.95  # FixMatch's default
    low_threshold: float = 0.7  # arm fixmatch-lowtau: in a short CPU schedule few predictions ever reach 0.95
    lambda_u: float = 1.0
    pretrain_fraction: float = 0.6
    temperature: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    corruptions: tuple[str, ...] = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
    severities: tuple[int, ...] = (1, 3)

    def quick(self) -> SemiSupConfig:
        """A seconds-long smoke configuration of the same code path (numbers not meaningful)."""
        return SemiSupConfig(
            n_unlabelled=64,
            n_test=40,
            steps=8,
            batch_size=8,
            mu=2,
            seeds=(0,),
            corruptions=("contrast",),
            severities=(3,),
        )


def _labelled_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The first ``per_class`` indices of each class in a seeded permutation: the labelled set L."""
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen = [order[labels[order] == k][:per_class] for k in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def run_arm(
    arm: str,
    cfg: SemiSupConfig,
    seed: int,
    labelled: tuple[torch.Tensor, torch.Tensor],
    unlabelled: torch.Tensor,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one arm from the seed's initialisation (identical across arms) and return it with its training notes.

    With ``checkpoints`` every phase checkpoints into its own sub-folder, so ``options.resume`` skips finished phases.
    """
    if arm not in ARMS:
        raise PotpourriError(f"unknown arm '{arm}'; choose from {', '.join(ARMS)}")
    images, labels = labelled
    num_classes = int(labels.max()) + 1
    seed_everything(seed)
    model = SmallCNN(num_classes, width=cfg.width)
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": seed}
    folder = Path(checkpoints) if checkpoints is not None else None

    def phase(name: str, *, first: bool = True) -> dict[str, Any]:
        sub = folder / name if folder is not None else None
        return {"options": _phase_options(options, sub, first=first), "checkpoints": sub}

    notes: dict[str, Any] = {}
    if arm == "supervised":
        losses = train_supervised(
            model, images, labels, steps=cfg.steps, batch_size=cfg.batch_size, **common, **phase("supervised")
        )
        notes["final_loss"] = statistics.fmean(losses[-20:])
    elif arm.startswith("fixmatch"):
        history = train_fixmatch(
            model,
            images,
            labels,
            unlabelled,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            mu=cfg.mu,
            threshold=cfg.threshold if arm == "fixmatch" else cfg.low_threshold,
            lambda_u=cfg.lambda_u,
            **common,
            **phase("fixmatch"),
        )
        notes["final_loss"] = statistics.fmean(h["loss"] for h in history[-20:])
        notes["mask_rate"] = statistics.fmean(h["mask_rate"] for h in history[-20:])
    else:
        pretrain = round(cfg.pretrain_fraction * cfg.steps)
        ssl = train_simclr(
            model, unlabelled, steps=pretrain, batch_size=cfg.mu * cfg.batch_size, temperature=cfg.temperature,
            **common, **phase("simclr"),
        )  # fmt: skip
        notes["ssl_loss_first_last"] = (statistics.fmean(ssl[:10]), statistics.fmean(ssl[-10:]))
        seed_everything(seed + 1)
        model.reset_classifier(num_classes)
        losses = train_supervised(
            model, images, labels, steps=cfg.steps - pretrain, batch_size=cfg.batch_size, **common,
            **phase("finetune", first=False),
        )  # fmt: skip
        notes["final_loss"] = statistics.fmean(losses[-20:])
    return model, notes


def summarise(rows: list[dict[str, Any]], arms: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per arm: mean ± std over seeds, and the mean paired delta against ``supervised``."""
    base = {r["seed"]: r for r in rows if r["arm"] == "supervised"}
    table = []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        if not runs:
            continue
        entry: dict[str, Any] = {"arm": arm, "seeds": len(runs)}
        for key in ("clean_acc", "corrupt_acc", "seconds"):
            entry[key] = mean_std([r[key] for r in runs])
        for key in ("clean_acc", "corrupt_acc"):
            deltas = [r[key] - base[r["seed"]][key] for r in runs if r["seed"] in base]
            entry[f"{key}_delta"] = f"{statistics.fmean(deltas):+.3f}" if deltas and arm != "supervised" else "—"
        table.append(entry)
    return table


def _markdown(table: list[dict[str, Any]], corruption_names: list[str]) -> str:
    header = ["arm", "clean acc", "Δ vs supervised", "corruption acc (mean)", "Δ vs supervised", "s/run"]
    rows = [
        [e["arm"], e["clean_acc"], e["clean_acc_delta"], e["corrupt_acc"], e["corrupt_acc_delta"], e["seconds"]]
        for e in table
    ]
    return markdown_table(header, rows) + f"\n\nCorruptions averaged: {', '.join(corruption_names)}."


def reproduce_semisup(
    cfg: SemiSupConfig | None = None, *, out: str | None = None, options: TrainOptions | None = None
) -> Run:
    """Train every arm for every seed; evaluate clean and corrupted accuracy; write results.md and report.html.

    ``options`` sets the device and precision of training (and the device of evaluation).
    """
    from potpourri.data.clutter import make_clutter
    from potpourri.data.corruptions import corrupt
    from potpourri.report.html import Report
    from potpourri.tune.trainer import evaluate

    cfg = cfg or SemiSupConfig()
    options = options or TrainOptions(progress=False)
    device = resolve_device(options.device)
    started = time.perf_counter()
    run = new_run("reproduce-semi-supervised", out, config=asdict(cfg), seed=cfg.seeds[0])
    pool_images, pool_labels, _ = make_clutter(cfg.n_unlabelled, size=cfg.image_size, seed=10)
    test_images, test_labels, _ = make_clutter(cfg.n_test, size=cfg.image_size, seed=11)
    unlabelled = images_to_tensor(pool_images)  # U: every pool image, labels never used
    test = TensorDataset(images_to_tensor(test_images), torch.from_numpy(test_labels))
    corrupted = {}
    for name in tqdm(cfg.corruptions, desc="corrupting the test set", unit="corruption", leave=False):
        for severity in cfg.severities:
            stack = np.stack([corrupt(img, name, severity, seed=i) for i, img in enumerate(test_images)])
            corrupted[f"{name}@{severity}"] = TensorDataset(images_to_tensor(stack), torch.from_numpy(test_labels))
    rows: list[dict[str, Any]] = []
    jobs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]  # seed-major: a partial run is still paired
    for arm, seed in tqdm(jobs, desc="semi-supervised arms x seeds", unit="run"):
        chosen = _labelled_subset(pool_labels, cfg.labels_per_class, seed)  # L is a labelled subset of U's pool
        labelled = (unlabelled[chosen], torch.from_numpy(pool_labels[chosen]))
        t0 = time.perf_counter()
        model, notes = run_arm(arm, cfg, seed, labelled, unlabelled, options=options)
        per_corruption = {key: evaluate(model, data, device=device)["acc"] for key, data in corrupted.items()}
        row = {
            "arm": arm,
            "seed": seed,
            "clean_acc": evaluate(model, test, device=device)["acc"],
            "corrupt_acc": statistics.fmean(per_corruption.values()),
            "seconds": time.perf_counter() - t0,
            **{f"acc_{k}": v for k, v in per_corruption.items()},
            **{k: v for k, v in notes.items() if isinstance(v, float)},
        }
        rows.append(row)
        run.log_metrics({k: row.get(k, "") for k in ("arm", "seed", "clean_acc", "corrupt_acc", "seconds")})
    table = summarise(rows, cfg.arms)
    markdown = _markdown(table, list(corrupted))
    seconds = time.perf_counter() - started
    (run.path / "results.md").write_text(markdown + "\n")
    run.write_summary({"table": table, "runs": rows, "seconds": seconds})
    report = Report("potpourri reproduce semi-supervised")
    report.section(
        "Semi-supervised (FixMatch) vs self-supervised (SimCLR) + fine-tuning, same labels and steps",
        f"Clutter at {cfg.image_size} px, {cfg.labels_per_class} labels per class, {cfg.n_unlabelled} unlabelled "
        f"images, {cfg.steps} optimiser steps per arm, SmallCNN width {cfg.width}, seeds {list(cfg.seeds)}. "
        "The paper (rejected at ICLR 2024) claims Semi-SL beats Self-SL in-domain and under perturbations.",
    )
    report.table(table)
    report.code(markdown)
    report.text(f"Total {seconds:.0f} s.", note=True)
    report.write(run.path / "report.html")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce semi-supervised`` (or its smoke run with ``quick``) on ``options``' device/precision."""
    cfg = SemiSupConfig()
    return reproduce_semisup(cfg.quick() if quick else cfg, out=out, options=options)
