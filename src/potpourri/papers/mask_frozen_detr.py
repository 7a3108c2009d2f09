"""``potpourri reproduce mask-frozen-detr``: the same mask head on a frozen DETR and on a frozen YOLO detector.

Mask Frozen-DETR (Liang & Yuan, arXiv 2308.03747; withdrawn from ICLR 2024, no official code) trains only a light
mask head on a frozen DETR-style detector. Here the head (``potpourri.detect.mask_head``) sees each detector through
the ``FrozenDetector`` contract (``potpourri.detect.frozen``), so the two arms run identical head code:

- **DETR arm**: our small DETR on frozen ImageNet EfficientNet-Lite0 features (``potpourri.detect.detr``: 16 queries,
  3 decoder layers, d 128, Hungarian matching, focal + L1 + GIoU), trained here for ``detr_steps`` steps, at most
  ``detr_minutes`` per invocation; its checkpoints (``<out>/detr_checkpoints``) make the training resumable in
  pieces: ``potpourri reproduce mask-frozen-detr --out SAME`` continues it (a folder of another config is refused).
  Then the head, for ``head_seconds``, on the frozen DETR (query = the Hungarian-matched query's last-decoder-layer
  state).
- **YOLO arm**: ``yolo_rep_n`` trained from scratch here for ``yolo_epochs`` (``potpourri.detect.train``), frozen,
  the same head for the same seconds (query = the winning anchor's head features).

Same DS-Synth data (one instance per merged connected defect region), COCO box and mask AP by pycocotools. Each
detector's training CPU seconds are recorded (``time.process_time``), so the cost of each arm is on the table.
Not run: full fine-tuning and a Mask R-CNN at equal CPU time (``benchmarks/mask_head.py`` has the Mask R-CNN arm
against the YOLO head; see docs/results.md). Reading order: ``MaskFrozenDetrConfig`` → ``reproduce_mask_frozen_detr``
(data → DETR → YOLO → heads → table) → ``run``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run, new_run
from potpourri.core.training import TrainOptions
from potpourri.papers.registry import compute_options

__all__ = ["MaskFrozenDetrConfig", "reproduce_mask_frozen_detr", "run"]


@dataclass
class MaskFrozenDetrConfig:
    """Every knob of the comparison."""

    category: str = "brick"
    image_size: int = 256
    per_kind: int = 40  # training images per defect kind (+ half as many good ones); test: half as many
    detr_steps: int = 2000
    detr_minutes: float = 10.0  # cap of one invocation; re-run with the same --out (or detr_checkpoints) to continue
    detr_checkpoints: str | None = None  # default: <run>/detr_checkpoints
    yolo_epochs: int = 21  # about the DETR's training CPU seconds (8 epochs took 141 CPU s, the DETR 374)
    head_seconds: float = 90.0
    head_steps: int = 600
    head_dim: int = 64
    pretrained_backbone: bool = True  # the ImageNet Lite0 under the DETR (False: random, for smoke runs)
    seed: int = 0
    progress: bool = True


def _detr_arm(cfg: MaskFrozenDetrConfig, train: list, names: tuple[str, ...], folder: Path, options: TrainOptions):
    """Train (or continue) the small DETR; the frozen adapter and a record of this invocation's cost."""
    from potpourri.core.io import atomic_write_bytes
    from potpourri.detect.detr import LiteDetr, LiteDetrFrozen, SmallDetrConfig, train_small_detr
    from potpourri.models.yolo import Lite0Backbone

    detr_cfg = SmallDetrConfig(num_classes=len(names), max_steps=cfg.detr_steps, max_seconds=cfg.detr_minutes * 60,
                               seed=cfg.seed, progress=cfg.progress)  # fmt: skip
    identity = {"detr": {k: v for k, v in asdict(detr_cfg).items() if k not in ("max_seconds", "progress")},
                "data": [cfg.category, cfg.image_size, cfg.per_kind]}  # fmt: skip
    identity = json.loads(json.dumps(identity))  # tuples as lists, as read back
    record_path = folder / "pieces.json"
    resume = (folder / "last.json").is_file()
    pieces: list[dict[str, Any]] = []
    if resume:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if record.get("identity") != identity:
            raise PotpourriError(f"'{folder}' holds a DETR trained with another config; use a new detr_checkpoints")
        pieces = record["pieces"]
    backbone = Lite0Backbone(pretrained=cfg.pretrained_backbone)
    cpu = time.process_time()
    detr, history = train_small_detr(train, detr_cfg, backbone=backbone, checkpoints=folder,
                                     options=TrainOptions(**{**asdict(options), "resume": resume,
                                                             "checkpoint_every": 200}))  # fmt: skip
    pieces.append({"steps_after": history["steps"], "cpu_s": time.process_time() - cpu, "wall_s": history["train_s"]})
    atomic_write_bytes(record_path, json.dumps({"identity": identity, "pieces": pieces}, indent=1).encode())
    losses = history["losses"]
    cost = {"steps": history["steps"], "finished": history["finished"], "pieces": len(pieces),
            "cpu_s": sum(p["cpu_s"] for p in pieces), "wall_s": sum(p["wall_s"] for p in pieces),
            "loss_first20": sum(losses[:20]) / max(1, len(losses[:20])),
            "loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:]))}  # fmt: skip
    return LiteDetrFrozen(LiteDetr(backbone, detr).eval()), cost


def _head_arm(frozen, train: list, test: list, names: tuple[str, ...], cfg: MaskFrozenDetrConfig, options) -> dict:
    """Train the mask head on ``frozen`` for ``cfg.head_seconds``; mask AP on ``test``."""
    from potpourri.detect.mask_head import MaskHeadConfig, mask_coco_map, predict_instances, train_mask_head

    head_cfg = MaskHeadConfig(dim=cfg.head_dim, max_steps=cfg.head_steps, max_seconds=cfg.head_seconds,
                              seed=cfg.seed, progress=cfg.progress)  # fmt: skip
    cpu = time.process_time()
    head, history = train_mask_head(frozen, train, head_cfg, options=options)
    cpu = time.process_time() - cpu
    found = predict_instances(frozen, head, [s.image for s in test], conf=0.001, device=options.device)
    masks = mask_coco_map(found, test, len(names))
    return {"head_steps": history["steps"], "head_cpu_s": cpu, "head_params": history["trainable_params"],
            "mask_map50": masks["map50"], "mask_map": masks["map"]}  # fmt: skip


def reproduce_mask_frozen_detr(
    cfg: MaskFrozenDetrConfig, *, out: str | None = None, options: TrainOptions | None = None
) -> Run:
    """Train the DETR (or continue it) and the YOLO detector, a mask head on each frozen; ``results.md``.

    Example:
        run = reproduce_mask_frozen_detr(MaskFrozenDetrConfig(detr_minutes=5)); print(run.path / "results.md")
    """
    from potpourri.detect.detr import predict_boxes
    from potpourri.detect.frozen import YoloFrozen
    from potpourri.detect.mask_head import read_instance_data
    from potpourri.detect.train import DetectTrainConfig, coco_map, evaluate_detector, train_detector

    started = time.perf_counter()
    options = options or TrainOptions(progress=False)
    run = new_run("reproduce-mask-frozen-detr", out, config=asdict(cfg), seed=cfg.seed)
    train, test, names = read_instance_data(f"ds-synth:{cfg.category}", image_size=cfg.image_size,
                                            per_kind=cfg.per_kind, seed=0)  # fmt: skip
    folder = Path(cfg.detr_checkpoints) if cfg.detr_checkpoints else run.path / "detr_checkpoints"
    detr, detr_cost = _detr_arm(cfg, train, names, folder, options)
    detr_boxes = coco_map(predict_boxes(detr, [s.image for s in test]), test, len(names))
    rows = {"DETR (ours, frozen Lite0)": {**detr_cost, "box_map50": detr_boxes["map50"], "box_map": detr_boxes["map"],
                                          **_head_arm(detr, train, test, names, cfg, options)}}  # fmt: skip

    yolo_cfg = DetectTrainConfig(class_names=names, image_size=cfg.image_size, epochs=cfg.yolo_epochs, seed=cfg.seed,
                                 progress=cfg.progress, **compute_options(DetectTrainConfig, options))  # fmt: skip
    cpu = time.process_time()
    yolo = train_detector(train, None, yolo_cfg, options=options)
    yolo_cost = {"steps": yolo.steps, "finished": True, "pieces": 1, "cpu_s": time.process_time() - cpu,
                 "wall_s": yolo.seconds}  # fmt: skip
    yolo_boxes = evaluate_detector(yolo.model, test, image_size=cfg.image_size)
    yolo_head = _head_arm(YoloFrozen(yolo.model), train, test, names, cfg, options)
    rows["yolo_rep_n (from scratch)"] = {**yolo_cost, "box_map50": yolo_boxes["map50"], "box_map": yolo_boxes["map"],
                                         **yolo_head}  # fmt: skip

    detr_row, yolo_row = rows["DETR (ours, frozen Lite0)"], rows["yolo_rep_n (from scratch)"]
    verdict = {
        "detr_useful": bool(detr_row["box_map50"] >= 0.3),  # our bar: a detector worth putting a mask head on
        "mask_map50_better_arm": (
            "tie"
            if detr_row["mask_map50"] == yolo_row["mask_map50"]
            else "DETR"
            if detr_row["mask_map50"] > yolo_row["mask_map50"]
            else "YOLO"
        ),
        "mask_bounded_by_box_detr": bool(detr_row["mask_map50"] <= detr_row["box_map50"] + 0.05),
    }
    lines = [
        "# Mask Frozen-DETR: one mask head on a frozen DETR and on a frozen YOLO",
        "",
        f"DS-Synth {cfg.category}, {cfg.image_size} px: {len(train)} training images "
        f"({sum(len(s.boxes) for s in train)} instances), {len(test)} test images; one seed ({cfg.seed}). "
        "Paper withdrawn from ICLR 2024; our own code; toy scale.",
        "",
        "| detector | detector steps | detector CPU s | box mAP50 / mAP | head steps | head CPU s | head params "
        "| **mask mAP50** / mAP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        steps = f"{r['steps']}" + ("" if r["finished"] else " (capped)") + (f", {r['pieces']} pieces")
        lines.append(f"| {name} | {steps} | {r['cpu_s']:.0f} | {r['box_map50']:.3f} / {r['box_map']:.3f} | "
                     f"{r['head_steps']} | {r['head_cpu_s']:.0f} | {r['head_params']:,} | "
                     f"**{r['mask_map50']:.3f}** / {r['mask_map']:.3f} |")  # fmt: skip
    lines += [
        "",
        f"Verdict: DETR box mAP50 {'≥' if verdict['detr_useful'] else '<'} 0.3 "
        f"({'useful' if verdict['detr_useful'] else 'not useful'} as a frozen detector); better mask mAP50: "
        f"{verdict['mask_map50_better_arm']}. Not run: full fine-tuning, Mask R-CNN at equal CPU time.",
        f"DETR loss (mean of first / last 20 steps): {detr_row['loss_first20']:.2f} / {detr_row['loss_last20']:.2f}.",
    ]
    summary = {"rows": rows, "verdict": verdict, "seconds": time.perf_counter() - started,
               "threads": torch.get_num_threads()}  # fmt: skip
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary(summary)
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """``potpourri reproduce mask-frozen-detr``: the comparison, or a seconds-long smoke run of the same code path;
    ``seed`` seeds both detectors, the heads and the batches (the data set stays seed 0's)."""
    cfg = MaskFrozenDetrConfig(seed=seed)
    if quick:  # same code path, numbers not meaningful
        cfg = MaskFrozenDetrConfig(image_size=64, per_kind=1, detr_steps=3, yolo_epochs=1, head_seconds=5.0,
                                   head_steps=3, head_dim=16, pretrained_backbone=False, progress=False,
                                   seed=seed)  # fmt: skip
    return reproduce_mask_frozen_detr(cfg, out=out, options=options)
