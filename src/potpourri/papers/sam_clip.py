"""``potpourri reproduce sam-clip``: SAM-CLIP-style merging (Wang et al.) of two teachers into one student.

Teacher B is either our CLIP-style model (``teacher_b="clip"``, the default: ``clip_vit_tiny_minilm``, separate trunk,
patch tokens distilled, zero-shot segmentation by text on surfaces the clip never saw) or, as before, the ImageNet
Lite0's pooled feature (``teacher_b="lite0"``: no language, shares the student's trunk). Both report forgetting of the
SAM head with vs without rehearsal. With weights on disk the language path takes an official SAM / MobileSAM as
teacher A (``sam_weights``: ``models.sam_official``) and an open_clip ViT as teacher B (``clip_arch`` +
``clip_weights``: ``segment.clip_teacher.OpenClipTeacher``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions
from potpourri.report.tables import markdown_table
from potpourri.segment.sam_clip import (
    PARTS,
    SamClipStudent,
    StageConfig,
    build_student,
    click_miou,
    evaluate_student,
    normalised,
    photo_crops,
    teacher_b,
    train_stage,
)


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
    teacher_b: str = "clip"  # "clip": our CLIP-style model (language); "lite0": the ImageNet Lite0 feature (before)
    clip_path: str | None = None  # a clip_vit_tiny_minilm model folder; None: train one here (clip_steps)
    clip_steps: int = 300  # when no clip is given: a time-capped `reproduce clip-small` (1 arm, frozen MiniLM)
    clip_per_kind: int = 30  # its training images per kind and surface (+ close-ups, + clutter_images clutter)
    held_out: tuple[str, ...] = ("moon", "tissue")  # surfaces the clip (and SAM) never saw: every test lives here
    b_per_kind: int = 12  # teacher B's distillation data: DS-Synth train images per kind on the clip's surfaces
    clutter_images: int = 120  # ... plus clutter images (the clip's other training data)
    zs_per_kind: int = 8  # zero-shot test images per defect kind and held-out surface
    segmenter_steps: int = 400  # the supervised baseline (Lite0 UNet, trained on the clip's surfaces' masks)
    margin: float = 0.0  # zero-shot: a defect must beat the background prompt's cosine by this much
    dpam_from: int | None = None  # teacher B's patch tokens from DPAM's V-V stream from this block on (None: q-k)
    sam_weights: str | None = None  # teacher A = an official SAM / MobileSAM checkpoint (run at image_size), not ours
    clip_arch: str | None = None  # teacher B = this open_clip architecture (or .json config) with clip_weights
    clip_weights: str | None = None  # ... its local checkpoint (never downloaded)
    extra: dict[str, Any] = field(default_factory=dict)


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = ["A: 1-click mIoU", "A: embedding nMSE", "B: cosine", "B: top-1 agreement"]
    header = ["arm", "trainable", "data (A : B)", "steps", *keys, "A forgetting (Δ mIoU)"]
    cells = [
        [r["arm"], r["trainable"], r["data"], r["steps"], *(f"{r[k]:.3f}" for k in keys),
         "—" if r.get("forgetting") is None else f"{r['forgetting']:+.3f}"]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


def run_sam_clip_experiment(
    config: SamClipConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    progress: bool = True,
    options: TrainOptions | None = None,
):
    """Stage 1 (A), probe (B head), then B without vs with rehearsal of A; a table of both tasks after each arm.

    ``options``: device and precision of the stages, checkpoints (``<run>/checkpoints/<stage>``), and resuming the run
    in ``out`` (finished stages are restored, not retrained)."""
    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run
    from potpourri.segment.sam import check_resumable, continue_metrics, synth_regions
    from potpourri.segment.sam_prompt import image_embeddings, load_or_pretrain_sam

    cfg = config or SamClipConfig()
    if cfg.teacher_b == "clip":
        return run_sam_clip_language(cfg, out=out, sam_path=sam_path, progress=progress, options=options)
    if cfg.teacher_b != "lite0":
        raise PotpourriError(f"teacher_b '{cfg.teacher_b}' must be clip or lite0")
    if cfg.sam_weights or cfg.clip_arch or cfg.clip_weights:
        raise PotpourriError("official SAM / open_clip teachers apply to teacher_b clip (the language path)")
    options = options or TrainOptions(progress=progress)
    check_resumable(out, options)
    started = time.perf_counter()
    run = new_run(
        "sam-clip", out, config={**asdict(cfg), "sam_path": str(sam_path) if sam_path else None}, seed=cfg.seed
    )
    timings: dict[str, float] = {}

    # teachers, frozen
    checkpoints = run.path / "checkpoints"
    log = continue_metrics(run, options.resume)
    sam = load_or_pretrain_sam(sam_path, cfg, run.path / "sam", options=options, checkpoints=checkpoints / "sam")
    device = sam.pixel_mean.device
    lite0 = create_model("efficientnet_lite0", pretrained=True).eval().requires_grad_(False).to(device)
    mean, std = sam.pixel_mean, sam.pixel_std  # Lite0's normalisation, shared by both teachers and the student

    # data and teacher targets
    a_train, _ = synth_regions("train", cfg.sam_per_category, size=cfg.image_size, seed=cfg.seed)
    a_test, a_items = synth_regions("test", cfg.sam_test_per_category, size=cfg.image_size, seed=cfg.seed)
    b_train = photo_crops("train", cfg.photo_train, size=cfg.image_size, seed=cfg.seed)
    b_test = photo_crops("test", cfg.photo_test, size=cfg.image_size, seed=cfg.seed)
    train = {"sam": (normalised(a_train, mean, std), image_embeddings(sam, a_train)),
             "clip": (normalised(b_train, mean, std), teacher_b(lite0, normalised(b_train, mean, std)))}  # fmt: skip
    test = {"sam": (normalised(a_test, mean, std), image_embeddings(sam, a_test)),
            "clip": (normalised(b_test, mean, std), teacher_b(lite0, normalised(b_test, mean, std))),
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
        model.to(device)
        if steps:  # 0 steps: evaluate as is (the teacher-initialised student needs no stage 1)
            folder = checkpoints / f"stage{len(rows)}"  # one folder per stage, in the order they run
            losses = train_stage(model, train, StageConfig(name, trainable, shares, steps, cfg.lr, cfg.batch_size,
                                 cfg.seed, cfg.backbone_lr), log=log, options=options, checkpoints=folder)  # fmt: skip
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


# ----------------------------------------------------------------------------------------------- with language
LANGUAGE_KEYS = ("A: 1-click mIoU", "A: box mIoU", "A: embedding nMSE", "B: patch cosine", "zero-shot mIoU (defects)")


def _language_markdown(rows: list[dict[str, Any]], classes: tuple[str, ...]) -> str:
    header = ["arm", "trainable", "data (A : B)", "steps", *LANGUAGE_KEYS, "A forgetting (Δ click mIoU)",
              *(f"IoU {c}" for c in classes)]  # fmt: skip

    def cell(value: Any) -> str:
        return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"

    cells = [[r["arm"], r.get("trainable", "—"), r.get("data", "—"), r.get("steps", 0),
              *(cell(r.get(k)) for k in LANGUAGE_KEYS),
              "—" if r.get("forgetting") is None else f"{r['forgetting']:+.3f}",
              *(cell(r.get("per_class", {}).get(c)) for c in classes)] for r in rows]  # fmt: skip
    return markdown_table(header, cells)


def check_teachers(cfg: SamClipConfig, sam_path: str | os.PathLike | None = None) -> None:
    """One-line errors, before anything is written, for teachers given twice, half or not on disk."""
    if cfg.sam_weights is not None:
        if sam_path is not None:
            raise PotpourriError("teacher A is our SAM (--sam FOLDER) or an official one (--sam-weights), not both")
        if not Path(cfg.sam_weights).is_file():
            raise PotpourriError(f"SAM checkpoint '{cfg.sam_weights}' not found (sam_vit_b_01ec64.pth, mobile_sam.pt)")
    if (cfg.clip_arch is None) != (cfg.clip_weights is None):
        raise PotpourriError("an open_clip teacher B needs both --clip-arch ARCH and --clip-weights PATH")
    if cfg.clip_arch is not None:
        if cfg.clip_path:
            raise PotpourriError("teacher B is either our clip (--clip FOLDER) or open_clip (--clip-arch), not both")
        if not Path(cfg.clip_weights).is_file():
            raise PotpourriError(f"CLIP weights '{cfg.clip_weights}' not found; pass a local open_clip checkpoint")


def _sam_teacher(cfg: SamClipConfig, sam_path, save_to: Path, options: TrainOptions, checkpoints: Path):
    """(teacher A, its name): an official SAM / MobileSAM from ``cfg.sam_weights`` at ``cfg.image_size`` (frozen), or
    our small SAM, loaded from ``sam_path`` or pretrained here."""
    from potpourri.segment.sam_prompt import load_or_pretrain_sam

    if cfg.sam_weights is None:
        return load_or_pretrain_sam(sam_path, cfg, save_to, options=options, checkpoints=checkpoints), "small SAM"
    from potpourri.core.training import resolve_device
    from potpourri.models.sam_official import load_official_sam

    sam = load_official_sam(cfg.sam_weights, image_size=cfg.image_size).to(resolve_device(options.device))
    return sam, f"official {sam.config.variant} SAM, `{cfg.sam_weights}`, at {cfg.image_size} px"


def _clip_teacher(cfg: SamClipConfig, quick: bool, folder: Path, options: TrainOptions):
    """(teacher B, its data's surfaces, how it was obtained): open_clip from ``cfg.clip_arch`` + ``cfg.clip_weights``,
    our clip loaded from ``cfg.clip_path``, a random tiny one (quick), or trained here by a time-capped
    ``reproduce clip-small``."""
    from potpourri.models.clip_small import load_small_clip
    from potpourri.papers.clip_small import QUICK, ClipSmallConfig, build_model, reproduce_clip_small
    from potpourri.segment.clip_teacher import OpenClipTeacher, SmallClipTeacher
    from potpourri.vlm.clip import ClipTrainConfig

    def check(trained_on: tuple[str, ...]) -> tuple[str, ...]:
        overlap = set(trained_on) & set(cfg.held_out)
        if overlap:
            raise PotpourriError(f"held-out surfaces {sorted(overlap)} were in the clip's training data")
        return trained_on

    if cfg.clip_arch:  # web-trained: its distillation data here are clip-small's surfaces, never a held-out one
        teacher = OpenClipTeacher.load(cfg.clip_arch, cfg.clip_weights, image_size=cfg.image_size)
        how = f"loaded from `{cfg.clip_weights}` at {cfg.image_size} px, MaskCLIP-style patch tokens"
        return teacher, check(ClipSmallConfig().train_surfaces), how
    if cfg.clip_path:
        path = Path(cfg.clip_path)
        config = path / "config.json" if path.is_dir() else path.parent / "config.json"
        trained_on = json.loads(config.read_text()).get("trained_on") if config.is_file() else None
        trained_on = check(tuple(trained_on or ("brick", "grass", "gravel")))  # clip-small's default surfaces
        return SmallClipTeacher(load_small_clip(path)), trained_on, f"loaded from `{path}`"
    if quick:
        how = "a random tiny clip (quick run: numbers meaningless)"
        return SmallClipTeacher(build_model(QUICK, 0).eval()), check(QUICK.train_surfaces), how
    check(ClipSmallConfig().train_surfaces)
    steps = cfg.clip_steps
    clip_cfg = ClipSmallConfig(image_size=cfg.image_size, train_per_kind=cfg.clip_per_kind, clutter=cfg.clutter_images,
                               test_per_kind=2, text_arms=(0,), held_out=cfg.held_out, progress=False,
                               train=ClipTrainConfig(steps=steps, batch_size=32, warmup=max(1, steps // 10),
                                                     seed=cfg.seed))  # fmt: skip
    clip_cfg.vision["img_size"] = cfg.image_size
    run = reproduce_clip_small(clip_cfg, out=str(folder), options=options)
    model_folder = run.read_summary()["model_folder"]
    how = (
        f"trained here, time-capped: `reproduce clip-small` code, {steps} steps at batch 32, {cfg.clip_per_kind} "
        f"images per kind (the documented model has 1000 steps at batch 64, 60 per kind), `{model_folder}`"
    )
    return SmallClipTeacher(load_small_clip(model_folder)), clip_cfg.train_surfaces, how


def run_sam_clip_language(
    config: SamClipConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    progress: bool = True,
    options: TrainOptions | None = None,
    quick: bool = False,
):
    """Teacher A = small SAM, teacher B = our CLIP-style model (patch tokens, text prompts); stage 1, probe, then B
    without vs with rehearsal of A. Every test image is on ``cfg.held_out`` surfaces; zero-shot segmentation by text
    for the student, teacher B alone and a supervised segmenter."""
    import torch.nn.functional as F

    from potpourri.core.runs import new_run
    from potpourri.data.captions import clutter_pairs
    from potpourri.data.synth import CLASSES, DEFECTS, make_samples
    from potpourri.segment.sam import check_resumable, continue_metrics, synth_regions
    from potpourri.segment.sam_clip import predict_head, prompt_miou, text_prompts, zero_shot_segment
    from potpourri.segment.sam_prompt import image_embeddings
    from potpourri.segment.segmenter import SegmenterConfig, evaluate_segmentation, train_segmenter

    cfg = config or SamClipConfig()
    options = options or TrainOptions(progress=progress)
    check_resumable(out, options)
    check_teachers(cfg, sam_path)
    started = time.perf_counter()
    run = new_run("sam-clip", out, config={**asdict(cfg), "sam_path": str(sam_path) if sam_path else None},
                  seed=cfg.seed)  # fmt: skip
    timings: dict[str, float] = {}
    checkpoints = run.path / "checkpoints"
    log = continue_metrics(run, options.resume)
    sam, sam_name = _sam_teacher(cfg, sam_path, run.path / "sam", options, checkpoints / "sam")
    device = sam.pixel_mean.device
    clip, trained_on, clip_how = _clip_teacher(cfg, quick, run.path / "clip-small", options)
    clip.to(device)
    timings["teachers_s"] = time.perf_counter() - started
    mean, std = sam.pixel_mean, sam.pixel_std  # the student reads SAM's normalisation; the clip its own
    size = cfg.image_size

    # data: A = SAM's DS-Synth regions; B = the clip's training surfaces + clutter; every test on held-out surfaces
    a_train, _ = synth_regions("train", cfg.sam_per_category, size=size, seed=cfg.seed)
    a_test, a_items = synth_regions("test", cfg.sam_test_per_category, size=size, seed=cfg.seed,
                                    categories=cfg.held_out)  # fmt: skip
    n_b = cfg.b_per_kind * len(CLASSES)
    b_samples = [s for surface in trained_on
                 for s in make_samples(surface, "train", n_b, seed=cfg.seed, size=size, kinds=CLASSES)]  # fmt: skip
    clutter = clutter_pairs(cfg.clutter_images, size=size, seed=cfg.seed).images if cfg.clutter_images else None
    b_images = np.stack([s.image for s in b_samples] + ([*clutter] if clutter is not None else []))
    zs = {surface: make_samples(surface, "test", cfg.zs_per_kind * len(DEFECTS), seed=cfg.seed, size=size,
                                kinds=DEFECTS) for surface in cfg.held_out}  # fmt: skip
    zs_images = np.stack([s.image for surface in cfg.held_out for s in zs[surface]])
    zs_masks = np.stack([s.mask for surface in cfg.held_out for s in zs[surface]]).astype(np.int64)
    zs_surface = [surface for surface in cfg.held_out for _ in zs[surface]]

    grid = size // 16  # the student's stride-16 grid; a clip with another patch size is average-pooled onto it

    def b_targets(images: np.ndarray) -> torch.Tensor:
        patches = clip.patch_tokens(clip.normalise(images), dpam_from=cfg.dpam_from)
        return patches if patches.shape[-1] == grid else F.adaptive_avg_pool2d(patches, grid)

    train = {"sam": (normalised(a_train, mean, std), image_embeddings(sam, a_train)),
             "clip": (normalised(b_images, mean, std), b_targets(b_images))}  # fmt: skip
    a_test_x, a_test_emb = normalised(a_test, mean, std), image_embeddings(sam, a_test)
    zs_x, zs_teacher = normalised(zs_images, mean, std), b_targets(zs_images)
    texts = {surface: clip.encode_texts(text_prompts(surface, CLASSES)).to(device) for surface in cfg.held_out}
    timings["data_s"] = time.perf_counter() - started - timings["teachers_s"]

    def zero_shot(patches: torch.Tensor) -> dict[str, Any]:
        pred = torch.cat([zero_shot_segment(patches[i : i + 1], texts[zs_surface[i]], size, cfg.margin)
                          for i in range(len(patches))]).cpu().numpy()  # fmt: skip
        scores = evaluate_segmentation(pred, zs_masks, CLASSES)
        return {"zero-shot mIoU (defects)": scores["miou_defects"], "per_class": scores["per_class_iou"],
                "pixel accuracy": scores["pixel_accuracy"]}  # fmt: skip

    def sam_metrics(embeddings: torch.Tensor) -> dict[str, float]:
        target = a_test_emb.to(embeddings.device)
        return {"A: 1-click mIoU": prompt_miou(sam, embeddings, a_items, "click"),
                "A: box mIoU": prompt_miou(sam, embeddings, a_items, "box"),
                "A: embedding nMSE": float(F.mse_loss(embeddings, target) / target.var())}  # fmt: skip

    native = clip.patch_tokens(clip.normalise(zs_images), dpam_from=cfg.dpam_from)  # B on its own grid
    sam_arm = "small SAM" if cfg.sam_weights is None else f"official {sam.config.variant} SAM"
    rows: list[dict[str, Any]] = [
        {"arm": f"teacher A ({sam_arm})", **sam_metrics(a_test_emb)},
        {"arm": "teacher B alone (clip patch–text cosine)", "B: patch cosine": 1.0, **zero_shot(native)},
    ]
    t0 = time.perf_counter()
    seg_images = np.stack([s.image for s in b_samples])
    seg_masks = np.stack([s.mask for s in b_samples]).astype(np.int64)
    segmenter = train_segmenter(seg_images, seg_masks, SegmenterConfig(image_size=size, steps=cfg.segmenter_steps,
                                seed=cfg.seed), progress=False, options=options)  # fmt: skip
    scores = evaluate_segmentation(segmenter.predict(zs_images), zs_masks, CLASSES)
    rows.append({"arm": f"supervised segmenter (Lite0 UNet, {cfg.segmenter_steps} steps on {len(seg_images)} "
                        f"masked images of {', '.join(trained_on)})",
                 "zero-shot mIoU (defects)": scores["miou_defects"],
                 "per_class": scores["per_class_iou"], "pixel accuracy": scores["pixel_accuracy"]})  # fmt: skip
    timings["segmenter_s"] = time.perf_counter() - t0

    student = build_student(cfg.student, sam_dim=sam.config.prompt_dim, clip_dim=clip.embed_dim, seed=cfg.seed,
                            sam=sam, clip_head="patch")  # fmt: skip
    curves: dict[str, tuple[float, float]] = {}

    def stage(model: SamClipStudent, name: str, trainable: tuple[str, ...], shares: dict[str, float], steps: int):
        t1 = time.perf_counter()
        model.to(device)
        if steps:
            losses = train_stage(model, train, StageConfig(name, trainable, shares, steps, cfg.lr, cfg.batch_size,
                                 cfg.seed, cfg.backbone_lr), log=log, options=options,
                                 checkpoints=checkpoints / f"stage{len(rows)}")  # fmt: skip
            curves[name] = (float(np.mean(losses[:20])), float(np.mean(losses[-20:])))
        patches = predict_head(model, zs_x, "clip")
        row = {"arm": name, "trainable": " + ".join(trainable), "data": f"{shares.get('sam', 0):.0%} : "
               f"{shares.get('clip', 0):.0%}", "steps": steps, **sam_metrics(predict_head(model, a_test_x, "sam")),
               "B: patch cosine": float(F.cosine_similarity(patches, zs_teacher.to(patches.device), dim=1).mean()),
               **zero_shot(patches), "seconds": round(time.perf_counter() - t1, 1)}  # fmt: skip
        rows.append(row)
        return row

    first = "1: A only (from scratch)" if cfg.student != "sam" else "1: A (student = copy of teacher A's encoder)"
    base = stage(student, first, ("backbone", "sam_head"), {"sam": 1.0}, cfg.stage1_steps)
    probe = copy.deepcopy(student)
    stage(probe, "2a: probe B head (backbone frozen)", ("clip_head",), {"clip": 1.0}, cfg.probe_steps)
    arms = [("2b: B, no rehearsal", ("backbone", "clip_head"), {"clip": 1.0})]
    arms += [(f"2c: B + rehearse A ({share:.0%})", PARTS, {"sam": share, "clip": 1 - share})
             for share in cfg.rehearsal_shares]  # fmt: skip
    for name, trainable, shares in arms:
        stage(copy.deepcopy(probe), name, trainable, shares, cfg.stage2_steps)
    first_stage = rows.index(base)
    for row in rows[first_stage + 1 :]:
        row["forgetting"] = row["A: 1-click mIoU"] - base["A: 1-click mIoU"]
    timings["total_s"] = time.perf_counter() - started
    student_rows = rows[first_stage + 2 :]
    best_student = max(r["zero-shot mIoU (defects)"] for r in student_rows)
    no_rehearsal, rehearsed = student_rows[0], student_rows[1:]
    verdict = {
        "student_zero_shot_vs_teacher_b": best_student - rows[1]["zero-shot mIoU (defects)"],
        "student_zero_shot_vs_segmenter": best_student - rows[2]["zero-shot mIoU (defects)"],
        "forgetting_no_rehearsal": no_rehearsal["forgetting"],
        "forgetting_with_rehearsal": [r["forgetting"] for r in rehearsed],
        "miou_dropped_without_rehearsal": no_rehearsal["forgetting"] < 0,  # else mIoU shows no forgetting to undo
        "nmse_no_rehearsal": no_rehearsal["A: embedding nMSE"],
        "nmse_with_rehearsal": [r["A: embedding nMSE"] for r in rehearsed],
        "rehearsal_keeps_embedding_closer": all(
            r["A: embedding nMSE"] < no_rehearsal["A: embedding nMSE"] for r in rehearsed
        ),
    }
    summary = {"rows": rows, "verdict": verdict, "loss_first_last": curves, "clip": clip_how,
               "clip_trained_on": list(trained_on), "held_out": list(cfg.held_out),
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "train_sizes": {k: len(v[0]) for k, v in train.items()}, "test_regions": len(a_items),
               "zero_shot_images": len(zs_images)}  # fmt: skip
    if cfg.sam_weights or cfg.clip_arch:  # teachers from disk: named (the default summary keeps its keys)
        summary["teachers"] = {"A": sam_name, "B": clip.name}
    run.write_summary(summary)
    header = (
        f"SAM-CLIP with language at {size} px: teacher A = {sam_name} ({len(a_train)} train images), teacher B = "
        f"{clip.name} ({clip_how}; {'distilled' if cfg.clip_arch else 'trained'} on {', '.join(trained_on)}), "
        f"student = "
        f"{'copy of teacher A encoder' if cfg.student == 'sam' else cfg.student} + a patch CLIP head. B data: "
        f"{len(b_images)} images. Tests on held-out surfaces {', '.join(cfg.held_out)} only: {len(a_items)} SAM "
        f"regions, {len(zs_images)} zero-shot images (prompts: 'a <surface> surface with a <defect>', background "
        f"'... with no defect'). Seed {cfg.seed}; {timings['total_s']:.0f} s."
    )
    Path(run.path / "results.md").write_text(header + "\n\n" + _language_markdown(rows, CLASSES) + "\n\nVerdict: "
                                             + json.dumps(verdict) + "\n")  # fmt: skip
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce sam-clip``: the full experiment, or a seconds-long smoke run of the same code path;
    ``options`` (a ``core.training.TrainOptions``: device, precision) reach ``run_sam_clip_experiment``."""

    if quick:  # same code path, minutes -> seconds, a random tiny clip: numbers not meaningful
        cfg = QUICK
        return run_sam_clip_language(cfg, out=out, progress=False, options=options, quick=True)
    return run_sam_clip_experiment(SamClipConfig(), out=out, progress=False, options=options)


QUICK = SamClipConfig(image_size=64, sam_per_category=3, sam_test_per_category=2, photo_train=8, photo_test=4,
                      stage1_steps=2, probe_steps=2, stage2_steps=2, sam_steps=2, batch_size=4, b_per_kind=1,
                      clutter_images=4, zs_per_kind=1, segmenter_steps=2)  # fmt: skip
