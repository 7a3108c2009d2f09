"""``potpourri reproduce sam-clip``: SAM-CLIP-style merging (Wang et al.) of a small SAM and a Lite0 teacher into one
student; forgetting of the SAM head with vs without rehearsal.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce sam-clip``: the full experiment, or a seconds-long smoke run of the same code path;
    ``options`` (a ``core.training.TrainOptions``: device, precision) reach ``run_sam_clip_experiment``."""

    cfg = SamClipConfig()
    if quick:  # same code path, minutes -> seconds, numbers not meaningful
        cfg = SamClipConfig(image_size=64, sam_per_category=3, sam_test_per_category=2, photo_train=8, photo_test=4,
                            stage1_steps=2, probe_steps=2, stage2_steps=2, sam_steps=2, batch_size=4)  # fmt: skip
    return run_sam_clip_experiment(cfg, out=out, progress=False, options=options)
