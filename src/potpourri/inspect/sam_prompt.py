"""Learning to prompt a frozen SAM (SSPrompt: SpaPrompt + SemPrompt, Huang et al., arXiv 2401.04651), small and on CPU.

A click lives in a 2-D coordinate space that the prompt encoder maps to tokens; SSPrompt learns the tokens
directly in the prompt-embedding space instead and blends them with what the pretrained encoder produces:

    sparse = a ⊙ PromptEncoder(anchor clicks) + (1 - a) ⊙ spatial_tokens      # SpaPrompt, a ∈ [0, 1]^(K, C)
    dense  = b ⊙ no_mask_embed               + (1 - b) ⊙ semantic_dense      # SemPrompt, b ∈ [0, 1]^C

The anchor clicks (pixel coordinates), the tokens, the dense map and both blend weights are the only parameters;
the SAM stays frozen. One prompt per defect class segments that class with no clicks. Because the spatial tokens
start as the encoder's tokens for the anchor click, the learned space contains every coordinate prompt: with
``a = 0`` and the tokens set to the encoder's output, the decoder sees exactly the click's tokens (tested).

Reading order: ``LearnedPrompt`` → ``decode_embeddings`` → ``learn_prompt`` / ``segment_with_prompt`` →
``run_ssprompt_experiment`` (DS-Synth: learned prompt vs the best single click vs the supervised segmenter).

Example:
    >>> prompt = learn_prompt(sam, embeddings, targets, PromptConfig(steps=300))  # doctest: +SKIP
    >>> masks = segment_with_prompt(sam, prompt, embeddings)  # (N, S, S) bool  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.errors import PotpourriError
from potpourri.inspect.sam import PromptEncoder, Sam, dice_loss, focal_loss

__all__ = [
    "LearnedPrompt",
    "PromptConfig",
    "SSPromptConfig",
    "decode_embeddings",
    "learn_prompt",
    "run",
    "run_ssprompt_experiment",
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
        anchor_points = anchor_points.detach().float().reshape(-1, 2)
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
        labels = torch.ones(1, len(self.anchor_points), dtype=torch.long)
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
    """(N, S, S, 3) uint8 at the SAM's ``image_size`` → frozen image embeddings (N, C, S/16, S/16)."""
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
) -> tuple[LearnedPrompt, list[float]]:
    """Learn a class prompt on frozen image embeddings (N, C, h, w) and binary targets (N, S, S); SAM frozen.

    Example:
        prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks == class_id)
    """
    from tqdm import tqdm

    cfg = config or PromptConfig()
    if len(embeddings) != len(targets) or not len(targets):
        raise PotpourriError(f"{len(embeddings)} embeddings vs {len(targets)} targets; pass one mask per image (>0)")
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
    size = sam.config.image_size
    target = torch.from_numpy(np.asarray(targets, bool)).float()[:, None]  # (N, 1, S, S)
    losses = []
    for _ in tqdm(range(cfg.steps), disable=not progress, desc=f"ssprompt-{cfg.mode}"):
        chosen = torch.randint(len(target), (cfg.batch_size,), generator=generator)
        sparse, dense = prompt(sam.prompt_encoder, len(chosen))
        logits, _ = decode_embeddings(sam, embeddings[chosen], sparse, dense)  # (B, 1, S/4, S/4)
        logits = _upsample(logits, size)
        loss = (cfg.focal_weight * focal_loss(logits, target[chosen]) + dice_loss(logits, target[chosen])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # keep the clicks on the image
            prompt.anchor_points[:, 0].clamp_(0, size - 1)
            prompt.anchor_points[:, 1].clamp_(0, size - 1)
        losses.append(float(loss.detach()))
    return prompt, losses


@torch.no_grad()
def segment_with_prompt(sam: Sam, prompt: LearnedPrompt, embeddings: torch.Tensor, *, batch: int = 32) -> np.ndarray:
    """Zero-click masks (N, S, S) bool from a learned class prompt."""
    out = []
    for first in range(0, len(embeddings), batch):
        chunk = embeddings[first : first + batch]
        sparse, dense = prompt(sam.prompt_encoder, len(chunk))
        logits, _ = decode_embeddings(sam, chunk, sparse, dense)
        out.append((_upsample(logits, sam.config.image_size)[:, 0] > 0).numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class SSPromptConfig:
    """The DS-Synth experiment: a small SAM pretrained with random prompts, then one learned prompt per class."""

    category: str = "brick"  # prompts are learned and tested on this texture
    image_size: int = 96
    sam_per_category: int = 150  # SAM pretraining images per texture (brick, grass, gravel; training rows)
    sam_steps: int = 2000
    train_per_class: int = 16  # prompt / segmenter training images of one class each, plus ``train_multi``
    train_multi: int = 32
    test_per_class: int = 8  # held-out rows, plus ``test_multi`` images with 2–3 defects
    test_multi: int = 24
    prompt_steps: int = 300
    segmenter_steps: int = 400
    segmenter_encoder: str = "frozen"  # the SAM's image encoder is frozen too
    seed: int = 0


def _class_data(category: str, split: str, per_class: int, multi: int, size: int, seed: int):
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    samples = make_samples(category, split, per_class * len(DEFECTS), seed=seed, size=size, kinds=DEFECTS)
    samples += make_samples(category, split, multi, seed=seed, size=size, kinds=(MULTI,))
    return np.stack([s.image for s in samples]), np.stack([s.mask for s in samples]).astype(np.int64)


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred & target).sum() / max(1, (pred | target).sum()))


def _regions_of(masks: np.ndarray, class_id: int, min_pixels: int = 16) -> list[int]:
    return [i for i, m in enumerate(masks) if (m == class_id).sum() >= min_pixels]


def _markdown(rows: list[dict[str, Any]], arms: list[str]) -> str:
    lines = ["| class | test regions | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for r in rows:
        lines.append(f"| {r['class']} | {r['regions']} | " + " | ".join(f"{r[a]:.3f}" for a in arms) + " |")
    return "\n".join(lines)


def load_or_pretrain_sam(sam_path: str | os.PathLike | None, cfg: Any, save_to: Path, *, progress: bool = True) -> Sam:
    """The frozen SAM of the experiments: loaded from ``sam_path``, or pretrained with random clicks and boxes on
    DS-Synth (``cfg.sam_steps``, ``cfg.sam_per_category``) and saved to ``save_to``."""
    from potpourri.inspect.sam import SamConfig, synth_regions, train_sam
    from potpourri.registry import create_model

    if sam_path is not None:
        sam = Sam.load(sam_path)
        if sam.config.image_size != cfg.image_size:
            raise PotpourriError(f"{sam_path}: SAM image_size {sam.config.image_size} != {cfg.image_size}")
    else:
        sam_cfg = SamConfig(image_size=cfg.image_size, steps=cfg.sam_steps, seed=cfg.seed)
        sam = Sam(sam_cfg, backbone=create_model(sam_cfg.backbone, pretrained=True))
        images, items = synth_regions("train", cfg.sam_per_category, size=cfg.image_size, seed=cfg.seed)
        train_sam(sam, images, items, progress=progress)
        sam.save(save_to)
    return sam.eval().requires_grad_(False)


def run_ssprompt_experiment(
    config: SSPromptConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Pretrain (or load) the small SAM, learn one prompt per defect class, compare with clicks and a segmenter.

    Writes summary.json, metrics.csv, results.md, prompts.safetensors and the SAM (``sam/``) into the run folder.
    """
    from potpourri.data.synth import CLASSES, DEFECTS
    from potpourri.inspect.sam import centre_click, predict_mask
    from potpourri.inspect.segment import SegmenterConfig, train_segmenter
    from potpourri.runs import new_run
    from potpourri.weights import save_state_dict_atomic

    cfg = config or SSPromptConfig()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = new_run(
        "ssprompt", out, config={**asdict(cfg), "sam_path": str(sam_path) if sam_path else None}, seed=cfg.seed
    )
    timings: dict[str, float] = {}

    # 1. the "pretrained" SAM: trained once with random clicks and boxes, then frozen
    sam = load_or_pretrain_sam(sam_path, cfg, run.path / "sam", progress=progress)
    frozen = {k: v.clone() for k, v in sam.state_dict().items()}
    timings["sam_s"] = time.perf_counter() - started

    # 2. the category's training and held-out images (one class each, plus multi-defect images)
    train_x, train_y = _class_data(cfg.category, "train", cfg.train_per_class, cfg.train_multi, cfg.image_size,
                                   cfg.seed)  # fmt: skip
    test_x, test_y = _class_data(cfg.category, "test", cfg.test_per_class, cfg.test_multi, cfg.image_size, cfg.seed)
    train_emb, test_emb = image_embeddings(sam, train_x), image_embeddings(sam, test_x)
    test_features = torch.cat([sam.backbone_features(test_x[i : i + 16]) for i in range(0, len(test_x), 16)])

    # 3. the supervised segmenter on the same training images
    t0 = time.perf_counter()
    segmenter = train_segmenter(train_x, train_y, SegmenterConfig(image_size=cfg.image_size, steps=cfg.segmenter_steps,
                                encoder=cfg.segmenter_encoder, seed=cfg.seed), progress=progress)  # fmt: skip
    seg_pred = segmenter.predict(test_x)
    timings["segmenter_s"] = time.perf_counter() - t0

    # 4. one learned prompt per class, in embedding space (SSPrompt) and in coordinate space (the 2-D baseline)
    learned = [("SSPrompt, dense map (0 clicks)", "embedding", True),
               ("SSPrompt, dense vector (0 clicks)", "embedding", False),
               ("learned click coords (0 clicks)", "coordinates", True)]  # fmt: skip
    arms = [a for a, _, _ in learned] + ["untrained prompt (centre of image)", "oracle centre click (1 click)",
                                         "supervised segmenter"]  # fmt: skip
    rows, per_region, prompts, curves, train_iou = [], {a: [] for a in arms}, {}, {}, {}
    t0 = time.perf_counter()
    for class_id, name in enumerate(CLASSES):
        if name not in DEFECTS:
            continue
        train_idx, test_idx = _regions_of(train_y, class_id), _regions_of(test_y, class_id)
        if not train_idx or not test_idx:
            continue
        targets = train_y[train_idx] == class_id
        scores: dict[str, list[float]] = {a: [] for a in arms}
        truth = test_y[test_idx] == class_id
        untrained = segment_with_prompt(sam, LearnedPrompt(sam.prompt_encoder), test_emb[test_idx])
        for arm, mode, dense_map in learned:
            key = f"{name}.{mode}" + ("" if dense_map else "-vector")
            prompt, losses = learn_prompt(sam, train_emb[train_idx], targets, PromptConfig(mode=mode,
                                          dense_map=dense_map, steps=cfg.prompt_steps, seed=cfg.seed))  # fmt: skip
            pred = segment_with_prompt(sam, prompt, test_emb[test_idx])
            scores[arm] = [_iou(p, t) for p, t in zip(pred, truth, strict=True)]
            fit = segment_with_prompt(sam, prompt, train_emb[train_idx])  # training-image IoU: over- or underfit?
            train_iou[key] = float(np.mean([_iou(p, t) for p, t in zip(fit, targets, strict=True)]))
            curves[key] = (float(np.mean(losses[:20])), float(np.mean(losses[-20:])))
            prompts.update({f"{key}.{k}": v for k, v in prompt.state_dict().items()})
        scores["untrained prompt (centre of image)"] = [_iou(p, t) for p, t in zip(untrained, truth, strict=True)]
        for j, region in zip(test_idx, truth, strict=True):
            click = {"points": centre_click(region)[None], "labels": np.array([1])}
            pred = predict_mask(sam, test_features[j : j + 1], click)  # best-predicted of SAM's 3 masks
            scores["oracle centre click (1 click)"].append(_iou(pred, region))
            scores["supervised segmenter"].append(_iou(seg_pred[j] == class_id, region))
        row = {"class": name, "regions": len(test_idx), "train_images": len(train_idx)}
        row |= {a: float(np.mean(v)) for a, v in scores.items()}
        rows.append(row)
        for a in arms:
            per_region[a] += scores[a]
        run.log_metrics(row)
    timings["prompts_s"] = time.perf_counter() - t0
    unchanged = all(torch.equal(frozen[k], v) for k, v in sam.state_dict().items())
    rows.append({"class": "mean over classes", "regions": sum(r["regions"] for r in rows),
                 **{a: float(np.mean([r[a] for r in rows])) for a in arms}})  # fmt: skip
    rows.append({"class": "mean over regions", "regions": len(per_region[arms[0]]),
                 **{a: float(np.mean(v)) for a, v in per_region.items()}})  # fmt: skip
    save_state_dict_atomic(prompts, run.path / "prompts.safetensors", metadata={"format": "potpourri-ssprompt-v1"})
    timings["total_s"] = time.perf_counter() - started
    summary = {"rows": rows, "sam_unchanged": unchanged, "loss_first_last": curves, "train_iou": train_iou,
               "timings": {k: round(v, 1) for k, v in timings.items()}}  # fmt: skip
    run.write_summary(summary)
    table = _markdown(rows, arms)
    header = (
        f"SSPrompt on DS-Synth {cfg.category} at {cfg.image_size} px: IoU per held-out region of each defect class "
        f"(frozen small SAM; SAM unchanged after prompt learning: {unchanged}); {timings['total_s']:.0f} s."
    )
    Path(run.path / "results.md").write_text(header + "\n\n" + table + "\n")
    return run


def run(quick: bool, out: str | None):
    """``potpourri reproduce ssprompt``: the full experiment, or a seconds-long smoke run of the same code path."""
    cfg = SSPromptConfig()
    if quick:  # same code path, minutes -> seconds, numbers not meaningful
        cfg = SSPromptConfig(image_size=64, sam_per_category=3, sam_steps=3, train_per_class=1, train_multi=2,
                             test_per_class=1, test_multi=2, prompt_steps=3, segmenter_steps=3)  # fmt: skip
    return run_ssprompt_experiment(cfg, out=out, progress=False)
