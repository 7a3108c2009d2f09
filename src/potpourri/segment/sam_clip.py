"""SAM-CLIP-style merging (Wang et al., arXiv 2310.15308): one student backbone, two heads, two frozen teachers.

The paper keeps SAM's ViT and mask decoder, adds a CLIP head, probes that head, then distils both teachers at
once on small subsets of their data, rehearsing SAM's data so the segmenter is not forgotten. Here, on CPU:

* teacher A: the small SAM of ``potpourri.segment.sam`` (frozen); its task is the image embedding that SAM's
  prompt encoder and mask decoder read. Metric: 1-click mIoU of the *frozen SAM decoder on the student's
  embedding* (held-out DS-Synth regions), and the embedding's normalised MSE.
* teacher B: the ImageNet EfficientNet-Lite0 (frozen); its task is the pooled 1280-d feature (cosine distillation,
  as SAM-CLIP does for CLIP). Metric: cosine on held-out natural-photo crops and top-1 agreement of the teacher's
  own ImageNet classifier applied to the student's feature.
* teacher B with language (the default of ``potpourri sam-clip``): our ``clip_vit_tiny_minilm``, its own ViT trunk;
  its task is its patch tokens in the joint space (``teacher_b_patches``), distilled per patch by cosine into a
  patch CLIP head. Metric: zero-shot segmentation by text (``zero_shot_segment``: patch–text cosine against one
  prompt per class and a background prompt) on surfaces the clip never saw, and click / box mIoU (``prompt_miou``).
* student: a backbone to stride 16 with a SAM head (SAM's neck layout) and a new CLIP head (conv, pool, linear; or
  conv, conv1×1 per patch for the clip teacher).
  Default ``"sam"``: a copy of teacher A's encoder (Lite0 stages 0-4 + neck; BatchNorm statistics kept frozen), as
  SAM-CLIP starts from SAM's ViT. Or a randomly initialised timm model (e.g. ``mobilenetv3_small_050``).

Stages: (1) A only (backbone + SAM head; 0 steps for the "sam" student, which already is teacher A); (2) probe the
CLIP head on B with the backbone frozen; (3) from the probe, B only (no rehearsal) vs B mixed with rehearsed A data
in a stated share of each batch. Forgetting = A's metric after minus before. Under torchrun each process trains on
its rows of every mixed batch (the sources may split unevenly); ``TrainOptions.sync_bn`` for BatchNorm that trains.

Reading order: student → rehearsal sampler → ``train_stage`` → metrics → data. The experiment itself is
``papers/sam_clip.run_sam_clip_experiment``.

Example:
    >>> from potpourri.papers.sam_clip import SamClipConfig, run_sam_clip_experiment
    >>> run = run_sam_clip_experiment(SamClipConfig(), sam_path="runs/ssprompt/v0/sam")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from potpourri.models.sam import LayerNorm2d, Sam

__all__ = [
    "CLIP_HEADS",
    "HEADS",
    "RehearsalSampler",
    "SamClipStudent",
    "StageConfig",
    "build_student",
    "distill_loss",
    "photo_crops",
    "predict_head",
    "prompt_miou",
    "teacher_b_patches",
    "text_prompts",
    "train_stage",
    "zero_shot_segment",
]

HEADS = ("sam", "clip")  # source name = the head it trains: "sam" (teacher A data), "clip" (teacher B data)
PARTS = ("backbone", "sam_head", "clip_head")
CLIP_HEADS = ("pooled", "patch")  # pooled: (B, D) (the Lite0 teacher); patch: (B, D, h, w) (a CLIP's patch tokens)


# ----------------------------------------------------------------------------------------------- student
class _FeatureTrunk(nn.Module):
    """A timm ``features_only`` model reduced to its one output map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


def _tiny_trunk() -> nn.Module:
    """A 4-conv stride-16 stand-in for tests (16 channels)."""
    layers: list[nn.Module] = []
    for cin, cout in ((3, 8), (8, 8), (8, 16), (16, 16)):
        layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


class SamClipStudent(nn.Module):
    """One backbone, a SAM head (image embedding (B, C_sam, h, w)) and a CLIP head: a pooled feature (B, D), or with
    ``clip_head="patch"`` one embedding per stride-16 patch (B, D, h, w), distilled from a CLIP's patch tokens."""

    def __init__(
        self, backbone: nn.Module, *, sam_dim: int, clip_dim: int, head_width: int = 128, clip_head: str = "pooled"
    ) -> None:
        super().__init__()
        if clip_head not in CLIP_HEADS:
            raise PotpourriError(f"unknown clip head '{clip_head}'; choose from {', '.join(CLIP_HEADS)}")
        self.backbone = backbone
        channels = getattr(backbone, "out_channels", None)  # an official SAM trunk states it (fixed input size)
        if channels is None:
            with torch.no_grad():
                device = next(backbone.parameters()).device  # a teacher's copy may sit on the GPU
                channels = backbone.eval()(torch.zeros(1, 3, 64, 64, device=device)).shape[1]
        self.sam_head = nn.Sequential(  # the layout of SAM's neck
            nn.Conv2d(channels, sam_dim, 1, bias=False),
            LayerNorm2d(sam_dim),
            nn.Conv2d(sam_dim, sam_dim, 3, padding=1, bias=False),
            LayerNorm2d(sam_dim),
        )
        self.bn_eval = False  # True: BatchNorm layers keep their running statistics while training
        tail = (
            [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head_width, clip_dim)]
            if clip_head == "pooled"
            else [nn.Conv2d(head_width, clip_dim, 1)]  # per patch, SAM-CLIP's CLIP head keeps the token grid
        )
        self.clip_head = nn.Sequential(nn.Conv2d(channels, head_width, 3, padding=1), nn.GELU(), *tail)

    def forward(self, x: torch.Tensor, heads: Sequence[str] = HEADS) -> dict[str, torch.Tensor]:
        """Normalised images (B, 3, S, S) → {"sam": (B, C_sam, S/16, S/16), "clip": (B, D) or (B, D, S/16, S/16)}."""
        features = self.backbone(x)  # (B, C, S/16, S/16)
        return {name: getattr(self, f"{name}_head")(features) for name in heads}


def build_student(
    name: str, *, sam_dim: int, clip_dim: int, seed: int = 0, sam: Sam | None = None, clip_head: str = "pooled"
) -> SamClipStudent:
    """``"sam"``: teacher A's image encoder (backbone + neck) copied, as SAM-CLIP starts from SAM's ViT, with a new
    random CLIP head (an official SAM: its trunk and neck, ``models.sam_official``); otherwise a randomly initialised
    ``"tiny"`` trunk (tests) or timm model cut at stride 16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "sam":
            if sam is None:
                raise PotpourriError("student 'sam' copies teacher A's encoder; pass sam=")
            student = SamClipStudent(copy.deepcopy(sam.image_encoder.backbone), sam_dim=sam_dim, clip_dim=clip_dim,
                                     clip_head=clip_head)  # fmt: skip
            student.sam_head.load_state_dict(sam.image_encoder.neck.state_dict())
            student.requires_grad_(True)
            student.bn_eval = True  # the teacher ran with frozen BatchNorm statistics; keep them
            return student
        if name == "tiny":
            trunk = _tiny_trunk()
        else:
            import timm

            try:
                model = timm.create_model(name, pretrained=False, features_only=True)
            except RuntimeError as exc:
                raise PotpourriError(f"unknown student '{name}' ({exc}); try mobilenetv3_small_050") from None
            reductions = model.feature_info.reduction()
            if 16 not in reductions:
                raise PotpourriError(f"student '{name}' has no stride-16 stage (strides {reductions})")
            model = timm.create_model(name, pretrained=False, features_only=True,
                                      out_indices=(reductions.index(16),))  # fmt: skip
            trunk = _FeatureTrunk(model)
        return SamClipStudent(trunk, sam_dim=sam_dim, clip_dim=clip_dim, clip_head=clip_head)


# ----------------------------------------------------------------------------------------------- sampler
class RehearsalSampler:
    """Batches drawn from several sources in fixed shares, exact over time: after t batches, source s has given
    floor(t · share_s · batch_size) samples (the last source takes the rest); each source is shuffled per epoch.
    """

    def __init__(self, sizes: dict[str, int], shares: dict[str, float], batch_size: int, *, seed: int = 0) -> None:
        if set(sizes) != set(shares) or not shares:
            raise PotpourriError(f"sources {sorted(sizes)} and shares {sorted(shares)} must name the same sources")
        if any(v <= 0 for v in sizes.values()) or any(v < 0 for v in shares.values()):
            raise PotpourriError(f"every source needs samples and a share >= 0: {sizes}, {shares}")
        if abs(sum(shares.values()) - 1) > 1e-6:
            raise PotpourriError(f"shares {shares} must sum to 1")
        self.sizes, self.shares, self.batch_size = sizes, shares, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queues: dict[str, list[int]] = {name: [] for name in sizes}
        self.batches = 0

    def _take(self, name: str, count: int) -> torch.Tensor:
        queue = self.queues[name]
        while len(queue) < count:
            queue += torch.randperm(self.sizes[name], generator=self.generator).tolist()
        taken, self.queues[name] = queue[:count], queue[count:]
        return torch.tensor(taken, dtype=torch.long)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{source: indices into that source} for the next batch (sources with 0 samples this batch omitted)."""
        t, names = self.batches, list(self.shares)
        counts = {}
        for name in names[:-1]:
            counts[name] = math.floor((t + 1) * self.shares[name] * self.batch_size + 1e-9) - math.floor(
                t * self.shares[name] * self.batch_size + 1e-9
            )
        counts[names[-1]] = self.batch_size - sum(counts.values())
        self.batches += 1
        return {name: self._take(name, n) for name, n in counts.items() if n > 0}

    def state_dict(self) -> dict[str, Any]:
        """The queues and the batch count (JSON-able; the generator is checkpointed on its own)."""
        return {"queues": {k: list(v) for k, v in self.queues.items()}, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queues = {k: list(v) for k, v in state["queues"].items()}
        self.batches = int(state["batches"])


# ----------------------------------------------------------------------------------------------- training
@dataclass
class StageConfig:
    """One distillation stage: what trains, which sources feed it in which shares, how long."""

    name: str
    trainable: tuple[str, ...]  # parts of the student: backbone, sam_head, clip_head
    shares: dict[str, float]  # source ("sam" / "clip") -> share of each batch
    steps: int = 400
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    backbone_lr: float | None = None  # default: ``lr``; lower for a pretrained backbone


def _set_trainable(student: SamClipStudent, trainable: Sequence[str]) -> None:
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise PotpourriError(f"unknown student parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    for part in PARTS:
        getattr(student, part).requires_grad_(part in trainable)


def distill_loss(name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ "sam": MSE over channels and positions; "clip": 1 - cosine over the channel dim 1 (of each pooled feature
    (B, D) or each patch of (B, D, h, w)), averaged: SAM-CLIP's cosine distillation."""
    if name == "sam":
        return F.mse_loss(prediction, target)
    return (1 - F.cosine_similarity(prediction, target, dim=1)).mean()


def train_stage(
    student: SamClipStudent,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    stage: StageConfig,
    *,
    progress: bool = False,
    log=None,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Train ``stage.trainable`` on {source: (normalised inputs, teacher targets)} mixed by ``stage.shares``.

    ``options`` (device, precision, resume, ...) and ``checkpoints`` (a folder) go to ``core.training.Trainer``."""
    missing = [name for name in stage.shares if name not in data]
    if missing:
        raise PotpourriError(f"stage {stage.name}: no data for sources {missing}")
    _set_trainable(student, stage.trainable)
    heads = [p for n, p in student.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    backbone = [p for p in student.backbone.parameters() if p.requires_grad]
    if not heads and not backbone:
        raise PotpourriError(f"stage {stage.name}: nothing to train")
    groups = [{"params": heads, "lr": stage.lr}] if heads else []
    if backbone:
        groups.append({"params": backbone, "lr": stage.backbone_lr or stage.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, stage.steps) / stage.steps))
    )
    sampler = RehearsalSampler({n: len(data[n][0]) for n in stage.shares}, stage.shares, stage.batch_size,
                               seed=stage.seed)  # fmt: skip
    torch.manual_seed(stage.seed)
    trainer = Trainer(student, optimizer, total_steps=stage.steps, options=options or TrainOptions(progress=progress),
                      folder=checkpoints, schedulers={"lr": schedule}, generators={"sampler": sampler.generator},
                      desc=stage.name)  # fmt: skip
    if "sampler" in trainer.state:
        sampler.load_state_dict(trainer.state["sampler"])
    device = trainer.device
    data = {name: (x.to(device), y.to(device)) for name, (x, y) in data.items()}
    student.train()
    if "backbone" not in stage.trainable:
        student.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics too
    if student.bn_eval:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = trainer.state.setdefault("losses", [])
    world = trainer.group.world
    for step in trainer.steps():
        batch = sampler.next_batch()
        trainer.state["sampler"] = sampler.state_dict()  # the queues move on with every batch
        if trainer.group.distributed:  # this process's slice of the mixed batch: rows [rank::world] of it
            mixed = trainer.shard([(n, int(i)) for n in batch for i in batch[n]])[0]
            counts = {n: len(batch[n]) for n in batch}  # the global batch's rows per source (for the logs)
            batch = {n: torch.tensor([i for m, i in mixed if m == n], dtype=torch.long) for n in batch}
            batch = {n: rows for n, rows in batch.items() if len(rows)}
        names = list(batch)
        inputs = torch.cat([data[n][0][batch[n]] for n in names])
        loss, offset, parts = torch.zeros((), device=device), 0, {}
        with trainer.autocast():
            features = student.backbone(inputs)  # one pass over the mixed batch, as in multi-task distillation
            predictions = {}
            for name in names:
                count = len(batch[name])
                predictions[name] = getattr(student, f"{name}_head")(features[offset : offset + count])
                offset += count
        for name in names:
            part = distill_loss(name, predictions[name].float(), data[name][1][batch[name]])
            # a mean over the global batch's rows: each process adds its rows' share (the trainer averages)
            loss = loss + part * (len(batch[name]) * world) / stage.batch_size
            parts[name] = float(part.detach())
        if trainer.group.distributed:  # the global batch's loss and per-source means, in one all-reduce
            sums = trainer.sums_over_processes(
                {"loss": float(loss.detach()), **{n: parts.get(n, 0.0) * len(batch.get(n, ())) for n in counts}}
            )
            losses.append(sums.pop("loss") / world)
            parts = {n: sums[n] / counts[n] for n in counts}
        else:
            losses.append(float(loss.detach()))  # before update: its checkpoint holds this step's loss
        trainer.update(loss)
        if log is not None and (step % 50 == 0 or step == stage.steps - 1):
            log({"stage": stage.name, "step": step, "loss": losses[-1],
                 **{f"loss_{k}": parts.get(k, float("nan")) for k in HEADS}})  # fmt: skip
    trainer.finish()
    student.eval()
    return list(losses)


# ----------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def prompt_miou(
    sam: Sam, embeddings: torch.Tensor, items: list[tuple[int, np.ndarray]], prompt: str = "click"
) -> float:
    """mIoU of SAM's frozen prompt encoder + decoder on given image embeddings: "click" (centre click, best-predicted
    of 3 masks) or "box" (the region's tight box, one mask)."""
    from potpourri.segment.sam import box_of, centre_click
    from potpourri.segment.sam_prompt import decode_embeddings

    if prompt not in ("click", "box"):
        raise PotpourriError(f"prompt '{prompt}' must be click or box")
    scores = []
    size = sam.config.image_size
    device = embeddings.device
    for index, region in items:
        if prompt == "click":
            point = torch.from_numpy(centre_click(region))[None, None].to(device)
            sparse, dense = sam.prompt_encoder(point, torch.ones(1, 1, dtype=torch.long, device=device), None, 1)
        else:
            box = torch.from_numpy(np.asarray(box_of(region), np.float32))[None].to(device)
            sparse, dense = sam.prompt_encoder(None, None, box, 1)
        logits, iou = decode_embeddings(sam, embeddings[index : index + 1], sparse, dense,
                                        multimask_output=prompt == "click")  # fmt: skip
        best = int(iou[0].argmax())
        mask = F.interpolate(logits[:, best : best + 1].float(), size=(size, size), mode="bilinear",
                             align_corners=False)  # fmt: skip
        pred = (mask[0, 0] > 0).cpu().numpy()
        scores.append(float((pred & region).sum() / max(1, (pred | region).sum())))
    return float(np.mean(scores))


def click_miou(sam: Sam, embeddings: torch.Tensor, items: list[tuple[int, np.ndarray]]) -> float:
    """1-click mIoU of SAM's frozen prompt encoder + decoder on given image embeddings (best-predicted of 3)."""
    return prompt_miou(sam, embeddings, items, "click")


@torch.no_grad()
def predict_head(student: SamClipStudent, x: torch.Tensor, head: str, batch: int = 64) -> torch.Tensor:
    """One head's output for normalised images ``x``, in batches, in eval mode (float32, on the student's device)."""
    student.eval()
    device = next(student.parameters()).device
    return torch.cat([student(x[i : i + batch].to(device), heads=(head,))[head].float()
                      for i in range(0, len(x), batch)])  # fmt: skip


@torch.no_grad()
def evaluate_student(student, sam: Sam, classifier: nn.Module, test: dict[str, Any], teacher_norm: float):
    """A: click mIoU through the frozen SAM decoder and embedding nMSE; B: cosine and ImageNet top-1 agreement."""
    emb = predict_head(student, test["sam"][0], "sam")
    target = test["sam"][1].to(emb.device)
    nmse = float(F.mse_loss(emb, target) / target.var())
    feats = predict_head(student, test["clip"][0], "clip")
    teacher = test["clip"][1].to(feats.device)
    cosine = float(F.cosine_similarity(feats, teacher, dim=-1).mean())
    scaled = F.normalize(feats, dim=-1) * teacher_norm  # the student matches directions; use the teacher's norm
    agree = float((classifier(scaled).argmax(-1) == classifier(teacher).argmax(-1)).float().mean())
    return {"A: 1-click mIoU": click_miou(sam, emb, test["items"]), "A: embedding nMSE": nmse,
            "B: cosine": cosine, "B: top-1 agreement": agree}  # fmt: skip


# ----------------------------------------------------------------------------------------------- data
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "coins", "clock")  # fmt: skip
TRAIN_COLUMNS = 0.7  # crops for training come from the left 70 % of each photo, test crops from the rest


def photo_crops(split: str, n: int, *, size: int, seed: int = 0, photos: Sequence[str] = PHOTOS) -> np.ndarray:
    """(n, size, size, 3) uint8 random square crops of scikit-image's bundled photos (teacher B's "pretraining
    data"); train and test crops come from disjoint column ranges of each photo."""
    import skimage.data
    from PIL import Image

    if split not in ("train", "test"):
        raise PotpourriError(f"split '{split}' must be train or test")
    rng = np.random.default_rng([seed, split == "test"])
    sources = []
    for name in photos:
        image = np.asarray(getattr(skimage.data, name)())
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
        cut = int(image.shape[1] * TRAIN_COLUMNS)
        full_side = min(image.shape[:2])
        sources.append((image[:, :cut] if split == "train" else image[:, cut:], full_side))
    crops = []
    for i in range(n):
        image, full_side = sources[i % len(sources)]
        h, w = image.shape[:2]
        # the same crop scale in both splits: 15-30 % of the photo's short side (the test strip is 30 % wide)
        side = max(16, min(int(rng.uniform(0.15, 0.3) * full_side), h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(image[y : y + side, x : x + side]))
        crop = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return np.stack(crops).astype(np.uint8)


def normalised(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 → normalised (N, 3, S, S) float on the device of ``mean``."""
    x = torch.from_numpy(np.array(images, np.float32)).to(mean.device).permute(0, 3, 1, 2) / 255.0
    return (x - mean) / std


@torch.no_grad()
def teacher_b(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Teacher B's pooled features (N, D) of normalised images, computed on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([model.forward_head(model.forward_features(x[i : i + batch].to(device)), pre_logits=True)
                      for i in range(0, len(x), batch)])  # fmt: skip


# ------------------------------------------------------------------------------ language (teacher B = a CLIP)
@torch.no_grad()
def teacher_b_patches(
    clip: nn.Module, x: torch.Tensor, batch: int = 32, *, dpam_from: int | None = None
) -> torch.Tensor:
    """A ``SmallClip``'s patch tokens in its joint space, (N, D, h, w), of images normalised for that clip: the ViT's
    normed tokens without the class token, through the image projection (as ``OwnClipTowers`` maps patches). With
    ``dpam_from`` (a 1-based block) the tokens are DPAM's V-V stream from that block on (``models.dpam``), which keeps
    each patch's own content where q-k attention mixes in the whole image."""
    from potpourri.models.dpam import vit_dual_path

    device = next(clip.parameters()).device
    vit = clip.visual
    patch = vit.patch_embed.patch_size[0]
    depth = len(vit.blocks)
    if dpam_from is not None and not 1 <= dpam_from <= depth:
        raise PotpourriError(f"dpam_from {dpam_from} is not a block of this {depth}-block ViT (1..{depth})")
    out = []
    for i in range(0, len(x), batch):
        images = x[i : i + batch].to(device)
        if dpam_from is None:
            tokens = clip.image_projection(clip.image_tokens(images)[:, vit.num_prefix_tokens :])  # (B, h*w, D)
        else:
            _, taps = vit_dual_path(vit, images, dual_from=dpam_from, layers=[depth])
            tokens = clip.image_projection(vit.norm(taps[depth][:, vit.num_prefix_tokens :]))  # (B, h*w, D)
        h, w = images.shape[-2] // patch, images.shape[-1] // patch
        out.append(tokens.transpose(1, 2).reshape(len(images), -1, h, w).float())
    return torch.cat(out)


def text_prompts(surface: str, classes: Sequence[str]) -> list[str]:
    """One sentence per class on ``surface``, the clip's own training words (``data.captions.class_prompts``): class 0
    ("a moon surface with no defect") is the background prompt."""
    from potpourri.data.captions import class_prompts

    return class_prompts(surface, classes=classes)


def zero_shot_segment(patches: torch.Tensor, text: torch.Tensor, size: int, margin: float = 0.0) -> torch.Tensor:
    """Labels (B, size, size) from patch embeddings (B, D, h, w) and class text embeddings (K, D), class 0 the
    background prompt: patch–text cosine per class, bilinearly upsampled, argmax; a pixel whose best defect cosine
    does not beat the background's by ``margin`` is background."""
    sims = torch.einsum("bdhw,kd->bkhw", F.normalize(patches.float(), dim=1), F.normalize(text.float(), dim=1))
    sims = F.interpolate(sims, size=(size, size), mode="bilinear", align_corners=False)  # (B, K, S, S)
    best, label = sims[:, 1:].max(1)
    return torch.where(best > sims[:, 0] + margin, label + 1, torch.zeros_like(label))
