"""SMR-style pretraining: "Image Compression Is an Effective Objective for Visual Representation Learning"
(submitted to ICLR 2024, **withdrawn**), at CPU scale, against an MAE-style masking baseline.

SMR (Semantic Merging and Reconstruction) feeds the *whole* image to a ViT that progressively merges tokens, and
trains it so that a decoder can reconstruct the teacher's semantic features of every patch from the few remaining
tokens: compression instead of masking. No code is public; this module writes its pieces here:

- ``bipartite_soft_matching``: ToMe's merge (Bolya et al., ICLR 2023): split tokens alternately into sets A and B,
  join each of the ``r`` most similar A tokens (cosine of the attention keys) to its best B partner by a size-weighted
  average; ``Merge.unmerge`` copies a merged token back to every original position it covers.
- ``SMRViT``: a small ViT (own blocks, proportional attention ``+ log(size)``) that merges ``r`` tokens after every
  block (``objective="smr"``), keeps all tokens (``"distill"``), or sees only a random subset (``"mae"``).
- ``FeatureDecoder``: one transformer block that maps the encoder's tokens, put back on the full patch grid (unmerged
  for SMR; visible tokens + a learned mask token for MAE), to the teacher's per-patch features.

The teacher is the frozen ImageNet EfficientNet-Lite0 (stage ``blocks.4``, 112 channels at stride 16) on the image
upsampled 4x, so its 8 x 8 feature map lines up with the student's 8 x 8 patch grid. The paper uses CLIP targets;
no CLIP weights exist offline here, so this is a declared deviation. Targets are per-token layer-normalised (as in
MAE's normalised-pixel and MILAN's feature targets) and cached once: only the student and decoder train.

``potpourri reproduce smr`` pretrains each arm on unlabelled object-in-clutter images (``potpourri.data.clutter``)
and reports the linear-probe accuracy of the mean-pooled student tokens on the 10-class clutter task. Compute is
matched by encoder multiply-accumulates: the MAE arm's visible-token count is chosen so that its encoder costs what
SMR's shrinking token schedule costs (the decoder is identical for both); all arms run the same steps and batch.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from potpourri.core.errors import PotpourriError
from potpourri.core.results import mean_std
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import Trainer, TrainOptions, autocast, lr_at, resolve_device
from potpourri.data.transforms import images_to_tensor
from potpourri.models.smr import (
    FeatureDecoder,
    Lite0Teacher,
    SMRViT,
    encoder_macs,
    mae_visible_for_equal_macs,
    random_masking,
    unmerge,
)

__all__ = [
    "ARMS",
    "SMRConfig",
    "pretrain",
    "reproduce_smr",
    "run",
    "teacher_targets",
]

ARMS = ("random-init", "distill", "smr", "mae-matched", "mae-75")


# ----------------------------------------------------------------------------------------------- teacher
@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-token layer-normalised teacher features ``(N_img, N_tok, T)`` of images ``(N_img, 3, H, W)`` in [0, 1].

    ``teacher`` maps a batch of [0, 1] images to a feature map ``(B, T, h, w)``; it is put in eval mode, never trained.
    With ``device`` the teacher moves there and runs under ``precision``; the targets come back float32 on the CPU.
    """
    teacher.eval()
    if device is not None:
        teacher.to(device)
    where = torch.device(device) if device is not None else images.device
    chunks = []
    for start in range(0, len(images), batch_size):
        with autocast(where, precision):
            fmap = teacher(images[start : start + batch_size].to(where))  # (B, T, h, w)
        chunks.append(fmap.float().flatten(2).transpose(1, 2).cpu())  # (B, h*w, T)
    targets = torch.cat(chunks)
    return F.layer_norm(targets, targets.shape[-1:])


def _loss(
    student: SMRViT,
    decoder: FeatureDecoder,
    images: torch.Tensor,
    targets: torch.Tensor,
    objective: str,
    *,
    r: int,
    visible: int,
    generator: torch.Generator,
    local: Sequence[int] | None = None,
) -> torch.Tensor:
    """The objective's loss on ``images[local]`` (all of them when None): MAE's masks are drawn for every image
    first, so a process's slice of a global batch gets the masks one process would give it."""
    local = list(range(len(images))) if local is None else list(local)
    if objective in ("smr", "distill"):
        images, targets = images[local], targets[local]
        tokens, _, assignment = student.forward_tokens(images, r=r if objective == "smr" else 0)
        prediction = decoder(unmerge(tokens, assignment))  # (B, N, T): every patch, from the merged tokens
        return F.mse_loss(prediction.float(), targets)
    if objective == "mae":
        keep, hidden = random_masking(len(images), student.num_tokens, visible, generator)
        images, targets, keep, hidden = images[local], targets[local], keep[local], hidden[local]
        keep, hidden = keep.to(images.device), hidden.to(images.device)
        tokens, _, _ = student.forward_tokens(images, visible=keep)  # (B, V, C)
        grid = tokens.new_zeros(len(images), student.num_tokens, tokens.shape[-1])
        grid = grid.scatter(1, keep.unsqueeze(-1).expand_as(tokens), tokens)  # (B, N, C)
        prediction = decoder(grid, hidden)
        return F.mse_loss(prediction[hidden].float(), targets[hidden])  # MAE: the loss is on the hidden tokens only
    raise PotpourriError(f"unknown pretraining objective '{objective}'; choose smr, distill or mae")


def pretrain(
    student: SMRViT,
    decoder: FeatureDecoder,
    teacher: nn.Module | torch.Tensor,
    images: torch.Tensor,
    objective: str,
    *,
    steps: int,
    batch_size: int = 32,
    r: int = 12,
    visible: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Train ``student`` + ``decoder`` to predict the frozen teacher's patch features; returns the per-step loss.

    ``teacher`` is the teacher module or its precomputed ``teacher_targets`` for ``images``. ``options`` sets device,
    precision, clipping and resume (``options.resume`` continues from ``checkpoints``); ``progress`` is used only
    without ``options``.
    """
    options = options or TrainOptions(progress=progress)
    device = resolve_device(options.device)
    targets = teacher if isinstance(teacher, torch.Tensor) else teacher_targets(teacher, images, device=device)
    if targets.shape[:2] != (len(images), student.num_tokens):
        raise PotpourriError(
            f"teacher targets {tuple(targets.shape)} do not match {len(images)} images x {student.num_tokens} patches; "
            "the teacher's feature map must have the student's patch grid"
        )
    gen = torch.Generator().manual_seed(seed)
    params = [*student.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    trainer = Trainer(
        student, opt, total_steps=steps, options=options, folder=checkpoints, params=params,
        modules={"decoder": decoder}, generators={"batches": gen}, desc=f"pretrain {objective}",
    )  # fmt: skip
    images, targets = images.to(trainer.device), targets.to(trainer.device)
    student.train()
    decoder.train()
    losses: list[float] = trainer.state.setdefault("losses", [])
    for step in trainer.steps():
        for group in opt.param_groups:
            group["lr"] = lr_at(step, base=lr, total=steps, warmup=max(1, steps // 20))
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)  # drawn on the CPU: the same on any device
        flip = torch.rand(batch_size, generator=gen) < 0.5  # flip image and the target grid together
        idx, flip = idx.to(trainer.device), flip.to(trainer.device)
        x, t = images[idx], targets[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        g = student.grid
        t_flipped = t.view(batch_size, g, g, -1).flip(2).reshape_as(t)
        t = torch.where(flip.view(-1, 1, 1), t_flipped, t)
        # every process draws the global batch (one generator state), then keeps its slice under torchrun; every
        # image has the same number of loss terms, so the slices' shares add up to the global batch's mean
        local, share = trainer.shard(range(batch_size))
        with trainer.autocast():
            loss = _loss(student, decoder, x, t, objective, r=r, visible=visible, generator=gen, local=local) * share
        losses.append(trainer.mean_over_processes(loss.item()))  # before update: a checkpoint written there has it
        trainer.update(loss)
    trainer.finish()
    return list(losses)


@torch.no_grad()
def pooled_features(
    encoder, images: torch.Tensor, *, batch_size: int = 128, device: str | torch.device = "cpu", precision: str = "fp32"
) -> np.ndarray:
    """``encoder(batch) -> (B, C)`` over all images (batches moved to ``device``), as a float64 NumPy array."""
    device = torch.device(device)
    chunks = []
    for i in range(0, len(images), batch_size):
        with autocast(device, precision):
            chunks.append(encoder(images[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(chunks).double().numpy()


def linear_probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of an L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(scaler.transform(train), y_train)
    return float(clf.score(scaler.transform(test), y_test))


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class SMRConfig:
    """Settings of the comparison; the defaults take about 7 core-minutes (4 pretrained arms x 3 seeds)."""

    arms: tuple[str, ...] = ARMS
    n_pretrain: int = 1500
    n_probe_train: int = 1000
    n_probe_test: int = 500
    image_size: int = 32
    patch_size: int = 4  # 8 x 8 patches: the teacher's stride-16 map of the 4x upsampled image
    dim: int = 64
    depth: int = 4
    heads: int = 4
    decoder_dim: int = 64
    r: int = 12  # tokens merged after each block: 64 -> 52 -> 40 -> 28 -> 16
    mae_75_visible: int = 16  # MAE's usual 75 % masking
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    teacher_stage: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)

    def quick(self) -> SMRConfig:
        """A seconds-long smoke configuration of the same code path (numbers not meaningful)."""
        return SMRConfig(n_pretrain=32, n_probe_train=40, n_probe_test=20, steps=3, batch_size=8, seeds=(0,))


def reproduce_smr(
    cfg: SMRConfig | None = None,
    *,
    out: str | None = None,
    teacher: nn.Module | None = None,
    options: TrainOptions | None = None,
) -> Run:
    """Pretrain every arm for every seed, linear-probe it; write results.md and report.html.

    ``teacher`` defaults to the frozen ImageNet EfficientNet-Lite0 (``Lite0Teacher``); ``options`` sets the device
    and precision of pretraining, the teacher and the probe features.
    """
    from potpourri.data.clutter import make_clutter
    from potpourri.report.html import Report

    cfg = cfg or SMRConfig()
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise PotpourriError(f"unknown SMR arm '{unknown[0]}'; choose from {', '.join(ARMS)}")
    started = time.perf_counter()
    run = new_run("reproduce-smr", out, config=asdict(cfg), seed=cfg.seeds[0])
    teacher = teacher if teacher is not None else Lite0Teacher(stage=cfg.teacher_stage, upsample=4)
    pre_images = images_to_tensor(make_clutter(cfg.n_pretrain, size=cfg.image_size, seed=20)[0])  # labels never used
    probe_x, probe_y, _ = make_clutter(cfg.n_probe_train, size=cfg.image_size, seed=21)
    test_x, test_y, _ = make_clutter(cfg.n_probe_test, size=cfg.image_size, seed=22)
    probe_x, test_x = images_to_tensor(probe_x), images_to_tensor(test_x)
    options = options or TrainOptions(progress=False)
    device, precision = resolve_device(options.device), options.precision
    targets = teacher_targets(teacher, pre_images, device=device, precision=precision)

    def probe(encoder) -> float:
        train = pooled_features(encoder, probe_x, device=device, precision=precision)
        test = pooled_features(encoder, test_x, device=device, precision=precision)
        return linear_probe(train, probe_y, test, test_y)

    teacher_acc = probe(lambda x: teacher_targets(teacher, x, device=device, precision=precision).mean(1))

    shape = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "dim": cfg.dim, "depth": cfg.depth}
    reference = SMRViT(**shape, heads=cfg.heads)
    matched_visible = mae_visible_for_equal_macs(reference, cfg.r)
    schedules = {
        "random-init": [],
        "distill": reference.token_schedule(),
        "smr": reference.token_schedule(r=cfg.r),
        "mae-matched": reference.token_schedule(visible=matched_visible),
        "mae-75": reference.token_schedule(visible=cfg.mae_75_visible),
    }
    rows: list[dict[str, Any]] = []
    jobs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
    for arm, seed in tqdm(jobs, desc="smr arms x seeds", unit="run"):
        seed_everything(seed)
        student = SMRViT(**shape, heads=cfg.heads)  # the same initialisation for every arm of a seed
        decoder = FeatureDecoder(cfg.dim, targets.shape[-1], student.num_tokens, decoder_dim=cfg.decoder_dim)
        t0 = time.perf_counter()
        losses: list[float] = []
        if arm != "random-init":
            objective = "mae" if arm.startswith("mae") else arm
            visible = matched_visible if arm == "mae-matched" else cfg.mae_75_visible
            losses = pretrain(
                student, decoder, targets, pre_images, objective, steps=cfg.steps, batch_size=cfg.batch_size,
                r=cfg.r, visible=visible, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, options=options,
            )  # fmt: skip
        student.to(device).eval()
        row: dict[str, Any] = {
            "arm": arm,
            "seed": seed,
            "probe_acc": probe(student.forward_features),
            "encoder_mmacs": encoder_macs(schedules[arm], cfg.dim) / 1e6,
            "loss_first": statistics.fmean(losses[:10]) if losses else float("nan"),
            "loss_last": statistics.fmean(losses[-10:]) if losses else float("nan"),
            "seconds": time.perf_counter() - t0,
        }
        if arm == "smr":  # the merged encoder at probe time too (size-weighted mean of the 16 final tokens)
            row["probe_acc_merged"] = probe(partial(student.forward_features, r=cfg.r))
        rows.append(row)
        run.log_metrics({k: row.get(k, "") for k in ("arm", "seed", "probe_acc", "loss_first", "loss_last", "seconds")})
    table = []
    for arm in cfg.arms:
        runs = [r for r in rows if r["arm"] == arm]
        table.append(
            {
                "arm": arm,
                "tokens per block": "—" if arm == "random-init" else "/".join(map(str, schedules[arm])),
                "encoder MMACs/img": f"{encoder_macs(schedules[arm], cfg.dim) / 1e6:.2f}",
                "probe acc": mean_std([r["probe_acc"] for r in runs]),
                "probe acc (merged at test)": mean_std(
                    [r["probe_acc_merged"] for r in runs if "probe_acc_merged" in r]
                ),
                "loss first→last": "—" if arm == "random-init" else (
                    f"{statistics.fmean(r['loss_first'] for r in runs):.3f}→"
                    f"{statistics.fmean(r['loss_last'] for r in runs):.3f}"
                ),
                "s/run": f"{statistics.fmean(r['seconds'] for r in runs):.0f}",
            }
        )  # fmt: skip
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(e[h]) for h in header) + " |" for e in table]
    lines.append("")
    lines.append(
        f"Teacher (frozen EfficientNet-Lite0 blocks.{cfg.teacher_stage}, mean-pooled) linear probe: {teacher_acc:.3f}. "
        f"MAE-matched keeps {matched_visible} of {reference.num_tokens} tokens "
        f"({1 - matched_visible / reference.num_tokens:.0%} masked)."
    )
    markdown = "\n".join(lines)
    seconds = time.perf_counter() - started
    (run.path / "results.md").write_text(markdown + "\n")
    run.write_summary({"table": table, "runs": rows, "teacher_probe_acc": teacher_acc, "seconds": seconds})
    report = Report("potpourri reproduce smr")
    report.section(
        "Compression (token merging) vs masking as a feature-reconstruction objective",
        f"Student ViT d={cfg.dim}, depth {cfg.depth}, patch {cfg.patch_size} on {cfg.image_size} px clutter images; "
        f"{cfg.steps} steps x batch {cfg.batch_size} on {cfg.n_pretrain} unlabelled images; linear probe trained on "
        f"{cfg.n_probe_train}, tested on {cfg.n_probe_test}. SMR was withdrawn from ICLR 2024.",
    )
    report.table(table)
    report.code(markdown)
    report.text(f"Total {seconds:.0f} s.", note=True)
    report.write(run.path / "report.html")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce smr`` (or its smoke run with ``quick``) on ``options``' device and precision."""
    cfg = SMRConfig()
    return reproduce_smr(cfg.quick() if quick else cfg, out=out, options=options)
