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

import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from potpourri.errors import PotpourriError
from potpourri.runs import Run, new_run, seed_everything

__all__ = [
    "ARMS",
    "FeatureDecoder",
    "Lite0Teacher",
    "Merge",
    "SMRConfig",
    "SMRViT",
    "bipartite_soft_matching",
    "encoder_macs",
    "mae_visible_for_equal_macs",
    "pretrain",
    "random_masking",
    "reproduce_smr",
    "run",
    "teacher_targets",
]

ARMS = ("random-init", "distill", "smr", "mae-matched", "mae-75")


# ----------------------------------------------------------------------------------------------- token merging
class Merge:
    """One bipartite merge step: ``merge`` (N → N - r tokens, size-weighted) and where each old token went."""

    def __init__(self, unmerged_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, n: int) -> None:
        self.unmerged_idx, self.src_idx, self.dst_idx, self.n = unmerged_idx, src_idx, dst_idx, n  # (B, ·) each
        self.r = src_idx.shape[1]

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]  # (B, Na, C), (B, Nb, C)
        c = x.shape[-1]
        kept = a.gather(1, self.unmerged_idx.unsqueeze(-1).expand(-1, -1, c))  # (B, Na - r, C)
        moved = a.gather(1, self.src_idx.unsqueeze(-1).expand(-1, -1, c))  # (B, r, C)
        b = b.scatter_reduce(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c), moved, reduce="sum")
        return torch.cat([kept, b], dim=1)  # (B, N - r, C)

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge tokens ``(B, N, C)`` with sizes ``(B, N, 1)``: merged tokens are size-weighted means, sizes add."""
        new_size = self._reduce(size)
        return self._reduce(x * size) / new_size, new_size

    def new_position(self) -> torch.Tensor:
        """``(B, N)``: the index in the merged sequence that each old token ended up in."""
        batch = self.src_idx.shape[0]
        n_a = (self.n + 1) // 2
        kept = n_a - self.r
        out = torch.empty(batch, self.n, dtype=torch.long, device=self.src_idx.device)
        a_pos = torch.empty(batch, n_a, dtype=torch.long, device=out.device)
        a_pos.scatter_(1, self.unmerged_idx, torch.arange(kept, device=out.device).expand(batch, -1))
        a_pos.scatter_(1, self.src_idx, kept + self.dst_idx)
        out[:, ::2] = a_pos
        out[:, 1::2] = kept + torch.arange(self.n // 2, device=out.device)
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Merge:
    """ToMe's matching on ``metric`` ``(B, N, C)``: merge the ``r`` A tokens (even positions) most similar to B."""
    n = metric.shape[1]
    r = min(r, (n + 1) // 2, n // 2)  # every merged A token needs a B partner
    if r < 0:
        raise PotpourriError(f"token merging needs r >= 0, got {r}")
    metric = F.normalize(metric, dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, Na, Nb) cosine
    best, best_idx = scores.max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)  # most similar A tokens first
    src_idx, unmerged_idx = order[:, :r], order[:, r:]
    dst_idx = best_idx.gather(1, src_idx)  # (B, r) B partner of each merged A token
    return Merge(unmerged_idx, src_idx, dst_idx, n)


def unmerge(tokens: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Merged tokens ``(B, M, C)`` back on the original grid; ``assignment`` ``(B, N)`` names each patch's token."""
    return tokens.gather(1, assignment.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, N, C)


def random_masking(batch: int, n: int, visible: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE masking: ``visible`` sorted random token indices per image ``(B, V)`` and the hidden mask ``(B, N)``."""
    if not 0 < visible <= n:
        raise PotpourriError(f"MAE needs 0 < visible <= {n} tokens, got {visible}")
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    keep = order[:, :visible].sort(dim=1).values
    hidden = torch.ones(batch, n, dtype=torch.bool)
    hidden.scatter_(1, keep, False)
    return keep, hidden


# ----------------------------------------------------------------------------------------------- student
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, c/h)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N)
        if size is not None:  # ToMe's proportional attention: a token of size s counts s times
            logits = logits + size.log().view(b, 1, 1, n)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj(out), k.mean(dim=1)  # keys averaged over heads: ToMe's similarity metric, (B, N, c/h)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attended, keys = self.attn(self.norm1(x), size)
        x = x + attended
        return x + self.mlp(self.norm2(x)), keys  # (B, N, C), (B, N, C/h)


class SMRViT(nn.Module):
    """A small ViT (no class token; mean-pooled) that can merge ``r`` tokens after each block or see a token subset.

    Example:
        vit = SMRViT(image_size=32, patch_size=4, dim=64, depth=4, heads=4)
        tokens, size, assignment = vit.forward_tokens(images, r=12)   # (B, 16, 64), (B, 16, 1), (B, 64)
    """

    def __init__(
        self, *, image_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise PotpourriError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid = image_size // patch_size
        self.num_tokens = self.grid**2
        self.num_features = dim
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward_tokens(
        self, x: torch.Tensor, *, r: int = 0, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode images in [0, 1]: tokens ``(B, M, C)``, sizes ``(B, M, 1)``, and each patch's token ``(B, N)``."""
        tokens = self.patch_embed((x - 0.5) / 0.5).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        b, n, _ = tokens.shape
        assignment = torch.arange(n, device=x.device).expand(b, n)
        if visible is not None:  # MAE: the encoder only ever sees the visible tokens
            tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, V, C)
        size = torch.ones(b, tokens.shape[1], 1, device=x.device)
        for block in self.blocks:
            tokens, keys = block(tokens, size if r else None)
            if r:
                merge = bipartite_soft_matching(keys, r)
                assignment = merge.new_position().gather(1, assignment)
                tokens, size = merge.merge(tokens, size)  # (B, M - r, C)
        return self.norm(tokens), size, assignment

    def token_schedule(self, *, r: int = 0, visible: int | None = None) -> list[int]:
        """Tokens entering each block (for the compute budget)."""
        n = visible if visible is not None else self.num_tokens
        counts = []
        for _ in self.blocks:
            counts.append(n)
            n -= min(r, (n + 1) // 2, n // 2)
        return counts

    def forward_features(self, x: torch.Tensor, *, r: int = 0) -> torch.Tensor:
        """Size-weighted mean of the final tokens ``(B, C)`` (with r=0, the plain mean over all patches)."""
        tokens, size, _ = self.forward_tokens(x, r=r)
        return (tokens * size).sum(1) / size.sum(1)


class FeatureDecoder(nn.Module):
    """Full-grid tokens ``(B, N, C)`` (hidden positions replaced by a mask token) → teacher features ``(B, N, T)``."""

    def __init__(self, dim: int, teacher_dim: int, num_tokens: int, *, decoder_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, decoder_dim) * 0.02)
        self.block = Block(decoder_dim, heads)
        self.norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, teacher_dim)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)  # (B, N, D)
        if hidden is not None:
            x = torch.where(hidden.unsqueeze(-1), self.mask_token.expand_as(x), x)
        x, _ = self.block(x + self.pos_embed)
        return self.head(self.norm(x))  # (B, N, T)


# ----------------------------------------------------------------------------------------------- teacher
@torch.no_grad()
def teacher_targets(teacher: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Per-token layer-normalised teacher features ``(N_img, N_tok, T)`` of images ``(N_img, 3, H, W)`` in [0, 1].

    ``teacher`` maps a batch of [0, 1] images to a feature map ``(B, T, h, w)``; it is put in eval mode, never trained.
    """
    teacher.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        fmap = teacher(images[start : start + batch_size])  # (B, T, h, w)
        chunks.append(fmap.flatten(2).transpose(1, 2))  # (B, h*w, T)
    targets = torch.cat(chunks)
    return F.layer_norm(targets, targets.shape[-1:])


class Lite0Teacher(nn.Module):
    """The frozen ImageNet EfficientNet-Lite0 up to ``blocks.<stage>``, on the image upsampled by ``upsample``."""

    def __init__(self, *, stage: int = 4, upsample: int = 4) -> None:
        super().__init__()
        from potpourri.registry import create_model

        net = create_model("efficientnet_lite0", pretrained=True)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[: stage + 1]
        self.upsample = upsample
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.upsample, mode="bicubic", align_corners=False).clamp(0, 1)
        return self.blocks(self.stem((x - 0.5) / 0.5))  # Lite0's mean = std = 0.5; (B, 112, H/4, W/4) for stage 4


# ----------------------------------------------------------------------------------------------- pretraining
def encoder_macs(tokens_per_block: list[int], dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of the encoder blocks: per block 4·N·d² (qkv, proj) + 2·r·N·d² (MLP) + 2·N²·d (attn)."""
    return int(sum((4 + 2 * mlp_ratio) * n * dim**2 + 2 * n * n * dim for n in tokens_per_block))


def mae_visible_for_equal_macs(student: SMRViT, r: int) -> int:
    """The MAE visible-token count whose encoder MACs come closest to the merging schedule's."""
    target = encoder_macs(student.token_schedule(r=r), student.num_features)
    return min(
        range(1, student.num_tokens + 1),
        key=lambda v: abs(encoder_macs(student.token_schedule(visible=v), student.num_features) - target),
    )


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
) -> torch.Tensor:
    if objective in ("smr", "distill"):
        tokens, _, assignment = student.forward_tokens(images, r=r if objective == "smr" else 0)
        prediction = decoder(unmerge(tokens, assignment))  # (B, N, T): every patch, from the merged tokens
        return F.mse_loss(prediction, targets)
    if objective == "mae":
        keep, hidden = random_masking(len(images), student.num_tokens, visible, generator)
        tokens, _, _ = student.forward_tokens(images, visible=keep)  # (B, V, C)
        grid = tokens.new_zeros(len(images), student.num_tokens, tokens.shape[-1])
        grid = grid.scatter(1, keep.unsqueeze(-1).expand_as(tokens), tokens)  # (B, N, C)
        prediction = decoder(grid, hidden)
        return F.mse_loss(prediction[hidden], targets[hidden])  # MAE: the loss is on the hidden tokens only
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
) -> list[float]:
    """Train ``student`` + ``decoder`` to predict the frozen teacher's patch features; returns the per-step loss.

    ``teacher`` is the teacher module or its precomputed ``teacher_targets`` for ``images``.
    """
    from potpourri.tune.trainer import lr_at

    targets = teacher if isinstance(teacher, torch.Tensor) else teacher_targets(teacher, images)
    if targets.shape[:2] != (len(images), student.num_tokens):
        raise PotpourriError(
            f"teacher targets {tuple(targets.shape)} do not match {len(images)} images x {student.num_tokens} patches; "
            "the teacher's feature map must have the student's patch grid"
        )
    gen = torch.Generator().manual_seed(seed)
    params = [*student.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    student.train()
    decoder.train()
    losses = []
    for step in tqdm(range(steps), desc=f"pretrain {objective}", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, base=lr, total=steps, warmup=max(1, steps // 20))
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x, t = images[idx], targets[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5  # flip image and the target grid together
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        g = student.grid
        t_flipped = t.view(batch_size, g, g, -1).flip(2).reshape_as(t)
        t = torch.where(flip.view(-1, 1, 1), t_flipped, t)
        loss = _loss(student, decoder, x, t, objective, r=r, visible=visible, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def pooled_features(encoder, images: torch.Tensor, *, batch_size: int = 128) -> np.ndarray:
    """``encoder(batch) -> (B, C)`` over all images, as a float64 NumPy array."""
    return torch.cat([encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).double().numpy()


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


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.3f}±{statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def reproduce_smr(cfg: SMRConfig | None = None, *, out: str | None = None, teacher: nn.Module | None = None) -> Run:
    """Pretrain every arm for every seed, linear-probe it; write results.md and report.html.

    ``teacher`` defaults to the frozen ImageNet EfficientNet-Lite0 (``Lite0Teacher``).
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
    pre_images = _to_tensor(make_clutter(cfg.n_pretrain, size=cfg.image_size, seed=20)[0])  # labels never used
    probe_x, probe_y, _ = make_clutter(cfg.n_probe_train, size=cfg.image_size, seed=21)
    test_x, test_y, _ = make_clutter(cfg.n_probe_test, size=cfg.image_size, seed=22)
    probe_x, test_x = _to_tensor(probe_x), _to_tensor(test_x)
    targets = teacher_targets(teacher, pre_images)

    def probe(encoder) -> float:
        return linear_probe(pooled_features(encoder, probe_x), probe_y, pooled_features(encoder, test_x), test_y)

    teacher_acc = probe(lambda x: teacher_targets(teacher, x).mean(1))  # mean-pooled teacher patch features

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
                r=cfg.r, visible=visible, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
            )  # fmt: skip
        student.eval()
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
                "probe acc": _fmt([r["probe_acc"] for r in runs]),
                "probe acc (merged at test)": _fmt([r["probe_acc_merged"] for r in runs if "probe_acc_merged" in r]),
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


def run(quick: bool, out: str | None) -> Run:
    """``potpourri reproduce smr`` (or its smoke run with ``quick``)."""
    cfg = SMRConfig()
    return reproduce_smr(cfg.quick() if quick else cfg, out=out)
