"""SAM-CLIP-style merging (Wang et al., arXiv 2310.15308): one student backbone, two heads, two frozen teachers.

The paper keeps SAM's ViT and mask decoder, adds a CLIP head, probes that head, then distils both teachers at
once on small subsets of their data, rehearsing SAM's data so the segmenter is not forgotten. Here, on CPU:

* teacher A: the small SAM of ``potpourri.inspect.sam`` (frozen); its task is the image embedding that SAM's
  prompt encoder and mask decoder read. Metric: 1-click mIoU of the *frozen SAM decoder on the student's
  embedding* (held-out DS-Synth regions), and the embedding's normalised MSE.
* teacher B: the ImageNet EfficientNet-Lite0 (frozen); its task is the pooled 1280-d feature (cosine distillation,
  as SAM-CLIP does for CLIP). Metric: cosine on held-out natural-photo crops and top-1 agreement of the teacher's
  own ImageNet classifier applied to the student's feature.
* student: a backbone to stride 16 with a SAM head (SAM's neck layout) and a new CLIP head (conv, pool, linear).
  Default ``"sam"``: a copy of teacher A's encoder (Lite0 stages 0-4 + neck; BatchNorm statistics kept frozen), as
  SAM-CLIP starts from SAM's ViT. Or a randomly initialised timm model (e.g. ``mobilenetv3_small_050``).

Stages: (1) A only (backbone + SAM head; 0 steps for the "sam" student, which already is teacher A); (2) probe the
CLIP head on B with the backbone frozen; (3) from the probe, B only (no rehearsal) vs B mixed with rehearsed A data
in a stated share of each batch. Forgetting = A's metric after minus before.

Reading order: student → rehearsal sampler → ``train_stage`` → metrics → data → ``run_sam_clip_experiment``.

Example:
    >>> run = run_sam_clip_experiment(SamClipConfig(), sam_path="runs/ssprompt/v0/sam")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.errors import PotpourriError
from potpourri.inspect.sam import LayerNorm2d, Sam

__all__ = [
    "HEADS",
    "RehearsalSampler",
    "SamClipConfig",
    "SamClipStudent",
    "StageConfig",
    "build_student",
    "photo_crops",
    "run",
    "run_sam_clip_experiment",
    "train_stage",
]

HEADS = ("sam", "clip")  # source name = the head it trains: "sam" (teacher A data), "clip" (teacher B data)
PARTS = ("backbone", "sam_head", "clip_head")


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
    """One backbone, a SAM head (image embedding (B, C_sam, h, w)) and a CLIP head (pooled feature (B, D))."""

    def __init__(self, backbone: nn.Module, *, sam_dim: int, clip_dim: int, head_width: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            channels = backbone.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        self.sam_head = nn.Sequential(  # the layout of SAM's neck
            nn.Conv2d(channels, sam_dim, 1, bias=False),
            LayerNorm2d(sam_dim),
            nn.Conv2d(sam_dim, sam_dim, 3, padding=1, bias=False),
            LayerNorm2d(sam_dim),
        )
        self.bn_eval = False  # True: BatchNorm layers keep their running statistics while training
        self.clip_head = nn.Sequential(
            nn.Conv2d(channels, head_width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(head_width, clip_dim),
        )

    def forward(self, x: torch.Tensor, heads: Sequence[str] = HEADS) -> dict[str, torch.Tensor]:
        """Normalised images (B, 3, S, S) → {"sam": (B, C_sam, S/16, S/16), "clip": (B, D)} for ``heads``."""
        features = self.backbone(x)  # (B, C, S/16, S/16)
        return {name: getattr(self, f"{name}_head")(features) for name in heads}


def build_student(name: str, *, sam_dim: int, clip_dim: int, seed: int = 0, sam: Sam | None = None) -> SamClipStudent:
    """``"sam"``: teacher A's image encoder (backbone + neck) copied, as SAM-CLIP starts from SAM's ViT, with a new
    random CLIP head; otherwise a randomly initialised ``"tiny"`` trunk (tests) or timm model cut at stride 16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "sam":
            if sam is None:
                raise PotpourriError("student 'sam' copies teacher A's encoder; pass sam=")
            student = SamClipStudent(copy.deepcopy(sam.image_encoder.backbone), sam_dim=sam_dim, clip_dim=clip_dim)
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
        return SamClipStudent(trunk, sam_dim=sam_dim, clip_dim=clip_dim)


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


def _distill_loss(name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "sam":  # the image embedding: MSE over channels and positions
        return F.mse_loss(prediction, target)
    return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()  # SAM-CLIP's cosine distillation


def train_stage(
    student: SamClipStudent,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    stage: StageConfig,
    *,
    progress: bool = False,
    log=None,
) -> list[float]:
    """Train ``stage.trainable`` on {source: (normalised inputs, teacher targets)} mixed by ``stage.shares``."""
    from tqdm import tqdm

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
    student.train()
    if "backbone" not in stage.trainable:
        student.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics too
    if student.bn_eval:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = []
    for step in tqdm(range(stage.steps), disable=not progress, desc=stage.name):
        batch = sampler.next_batch()
        names = list(batch)
        inputs = torch.cat([data[n][0][batch[n]] for n in names])
        features = student.backbone(inputs)  # one pass over the mixed batch, as in multi-task distillation
        loss, offset, parts = torch.zeros(()), 0, {}
        for name in names:
            count = len(batch[name])
            prediction = getattr(student, f"{name}_head")(features[offset : offset + count])
            part = _distill_loss(name, prediction, data[name][1][batch[name]])
            loss = loss + part * count / stage.batch_size
            parts[name] = float(part.detach())
            offset += count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == stage.steps - 1):
            log({"stage": stage.name, "step": step, "loss": losses[-1],
                 **{f"loss_{k}": parts.get(k, float("nan")) for k in HEADS}})  # fmt: skip
    student.eval()
    return losses


# ----------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def click_miou(sam: Sam, embeddings: torch.Tensor, items: list[tuple[int, np.ndarray]]) -> float:
    """1-click mIoU of SAM's frozen prompt encoder + decoder on given image embeddings (best-predicted of 3)."""
    from potpourri.inspect.sam import centre_click
    from potpourri.inspect.sam_prompt import decode_embeddings

    scores = []
    size = sam.config.image_size
    for index, region in items:
        point = torch.from_numpy(centre_click(region))[None, None]
        sparse, dense = sam.prompt_encoder(point, torch.ones(1, 1, dtype=torch.long), None, 1)
        logits, iou = decode_embeddings(sam, embeddings[index : index + 1], sparse, dense, multimask_output=True)
        best = int(iou[0].argmax())
        mask = F.interpolate(logits[:, best : best + 1], size=(size, size), mode="bilinear", align_corners=False)
        pred = (mask[0, 0] > 0).numpy()
        scores.append(float((pred & region).sum() / max(1, (pred | region).sum())))
    return float(np.mean(scores))


@torch.no_grad()
def _predict(student: SamClipStudent, x: torch.Tensor, head: str, batch: int = 64) -> torch.Tensor:
    student.eval()
    return torch.cat([student(x[i : i + batch], heads=(head,))[head] for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate_student(student, sam: Sam, classifier: nn.Module, test: dict[str, Any], teacher_norm: float):
    """A: click mIoU through the frozen SAM decoder and embedding nMSE; B: cosine and ImageNet top-1 agreement."""
    emb = _predict(student, test["sam"][0], "sam")
    target = test["sam"][1]
    nmse = float(F.mse_loss(emb, target) / target.var())
    feats = _predict(student, test["clip"][0], "clip")
    teacher = test["clip"][1]
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


def _normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2) / 255.0
    return (x - mean) / std


@torch.no_grad()
def _teacher_b(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model.forward_head(model.forward_features(x[i : i + batch]), pre_logits=True)
                      for i in range(0, len(x), batch)])  # fmt: skip


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class SamClipConfig:
    """Data, student and stage budgets of the forgetting experiment (defaults: a few minutes on one core)."""

    image_size: int = 96
    student: str = "sam"  # teacher A's encoder (SAM-CLIP's recipe), or a timm name for a random-init student
    sam_per_category: int = 150  # teacher A's data: DS-Synth training rows, brick/grass/gravel
    sam_test_per_category: int = 12
    photo_train: int = 600  # teacher B's data: crops of scikit-image photos
    photo_test: int = 200
    stage1_steps: int = 0  # the "sam" student already is teacher A; a random-init student needs ~600
    probe_steps: int = 200
    stage2_steps: int = 150
    rehearsal_shares: tuple[float, ...] = (0.5,)  # share of each stage-2 batch taken from teacher A's data
    lr: float = 2e-3  # heads (and a random-init backbone)
    backbone_lr: float | None = 2e-4  # None: ``lr`` (for a random-init backbone)
    batch_size: int = 8
    seed: int = 0
    sam_steps: int = 2000  # when no SAM is given: pretrain one as in ``potpourri reproduce ssprompt``
    extra: dict[str, Any] = field(default_factory=dict)


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = ["A: 1-click mIoU", "A: embedding nMSE", "B: cosine", "B: top-1 agreement"]
    lines = ["| arm | trainable | data (A : B) | steps | " + " | ".join(keys) + " | A forgetting (Δ mIoU) |",
             "|---|---|---|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for r in rows:
        forgetting = "—" if r.get("forgetting") is None else f"{r['forgetting']:+.3f}"
        lines.append(f"| {r['arm']} | {r['trainable']} | {r['data']} | {r['steps']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {forgetting} |")  # fmt: skip
    return "\n".join(lines)


def run_sam_clip_experiment(
    config: SamClipConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Stage 1 (A), probe (B head), then B without vs with rehearsal of A; a table of both tasks after each arm."""
    from potpourri.inspect.sam import synth_regions
    from potpourri.inspect.sam_prompt import image_embeddings, load_or_pretrain_sam
    from potpourri.registry import create_model
    from potpourri.runs import new_run

    cfg = config or SamClipConfig()
    started = time.perf_counter()
    run = new_run(
        "sam-clip", out, config={**asdict(cfg), "sam_path": str(sam_path) if sam_path else None}, seed=cfg.seed
    )
    timings: dict[str, float] = {}

    # teachers, frozen
    sam = load_or_pretrain_sam(sam_path, cfg, run.path / "sam", progress=progress)
    lite0 = create_model("efficientnet_lite0", pretrained=True).eval().requires_grad_(False)
    mean, std = sam.pixel_mean, sam.pixel_std  # Lite0's normalisation, shared by both teachers and the student

    # data and teacher targets
    a_train, _ = synth_regions("train", cfg.sam_per_category, size=cfg.image_size, seed=cfg.seed)
    a_test, a_items = synth_regions("test", cfg.sam_test_per_category, size=cfg.image_size, seed=cfg.seed)
    b_train = photo_crops("train", cfg.photo_train, size=cfg.image_size, seed=cfg.seed)
    b_test = photo_crops("test", cfg.photo_test, size=cfg.image_size, seed=cfg.seed)
    train = {"sam": (_normalise(a_train, mean, std), image_embeddings(sam, a_train)),
             "clip": (_normalise(b_train, mean, std), _teacher_b(lite0, _normalise(b_train, mean, std)))}  # fmt: skip
    test = {"sam": (_normalise(a_test, mean, std), image_embeddings(sam, a_test)),
            "clip": (_normalise(b_test, mean, std), _teacher_b(lite0, _normalise(b_test, mean, std))),
            "items": a_items}  # fmt: skip
    teacher_norm = float(train["clip"][1].norm(dim=-1).mean())
    timings["data_s"] = time.perf_counter() - started
    reference = {"arm": "teachers (A: small SAM, B: Lite0)", "trainable": "—", "data": "—", "steps": 0,
                 "A: 1-click mIoU": click_miou(sam, test["sam"][1], a_items), "A: embedding nMSE": 0.0,
                 "B: cosine": 1.0, "B: top-1 agreement": 1.0, "forgetting": None}  # fmt: skip

    student = build_student(cfg.student, sam_dim=sam.config.prompt_dim, clip_dim=train["clip"][1].shape[1],
                            seed=cfg.seed, sam=sam)  # fmt: skip
    rows, curves = [reference], {}

    def stage(model: SamClipStudent, name: str, trainable: tuple[str, ...], shares: dict[str, float], steps: int):
        t0 = time.perf_counter()
        if steps:  # 0 steps: evaluate as is (the teacher-initialised student needs no stage 1)
            losses = train_stage(model, train, StageConfig(name, trainable, shares, steps, cfg.lr, cfg.batch_size,
                                 cfg.seed, cfg.backbone_lr), progress=progress, log=run.log_metrics)  # fmt: skip
            curves[name] = (float(np.mean(losses[:20])), float(np.mean(losses[-20:])))
        metrics = evaluate_student(model, sam, lite0.classifier, test, teacher_norm)
        data = f"{shares.get('sam', 0):.0%} : {shares.get('clip', 0):.0%}"
        row = {"arm": name, "trainable": " + ".join(trainable), "data": data, "steps": steps, **metrics,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        rows.append(row)  # per-arm results go to summary.json; metrics.csv holds the loss curves
        return row

    first = "1: A only (from scratch)" if cfg.student != "sam" else "1: A (student = copy of teacher A's encoder)"
    base = stage(student, first, ("backbone", "sam_head"), {"sam": 1.0}, cfg.stage1_steps)
    base["forgetting"] = None
    probe = copy.deepcopy(student)
    stage(probe, "2a: probe B head (backbone frozen)", ("clip_head",), {"clip": 1.0}, cfg.probe_steps)
    arms = [("2b: B, no rehearsal", ("backbone", "clip_head"), {"clip": 1.0})]
    arms += [(f"2c: B + rehearse A ({share:.0%})", PARTS, {"sam": share, "clip": 1 - share})
             for share in cfg.rehearsal_shares]  # fmt: skip
    for name, trainable, shares in arms:
        stage(copy.deepcopy(probe), name, trainable, shares, cfg.stage2_steps)
    for row in rows[2:]:
        row["forgetting"] = row["A: 1-click mIoU"] - base["A: 1-click mIoU"]
    timings["total_s"] = time.perf_counter() - started
    summary = {"rows": rows, "loss_first_last": curves, "timings": {k: round(v, 1) for k, v in timings.items()},
               "train_sizes": {k: len(v[0]) for k, v in train.items()}, "test_regions": len(a_items),
               "test_photos": len(b_test)}  # fmt: skip
    run.write_summary(summary)
    student_text = "copy of teacher A's encoder" if cfg.student == "sam" else f"{cfg.student} (random init)"
    header = (
        f"SAM-CLIP-style merging at {cfg.image_size} px: student {student_text}, teacher A = small SAM "
        f"(DS-Synth, {len(a_train)} train images, {len(a_items)} held-out regions), teacher B = Lite0 pooled "
        f"features ({len(b_train)} / {len(b_test)} photo crops); {timings['total_s']:.0f} s."
    )
    Path(run.path / "results.md").write_text(header + "\n\n" + _markdown(rows) + "\n")
    return run


def run(quick: bool, out: str | None):
    """``potpourri reproduce sam-clip``: the full experiment, or a seconds-long smoke run of the same code path."""
    cfg = SamClipConfig()
    if quick:  # same code path, minutes -> seconds, numbers not meaningful
        cfg = SamClipConfig(image_size=64, sam_per_category=3, sam_test_per_category=2, photo_train=8, photo_test=4,
                            stage1_steps=2, probe_steps=2, stage2_steps=2, sam_steps=2, batch_size=4)  # fmt: skip
    return run_sam_clip_experiment(cfg, out=out, progress=False)
