"""``potpourri reproduce mask-frozen-detr``: the same mask head on a frozen DETR and on a frozen YOLO detector.

Mask Frozen-DETR (Liang & Yuan, arXiv 2308.03747; withdrawn from ICLR 2024, no official code) trains only a light
mask head on a frozen DETR-style detector. Here the head (``potpourri.detect.mask_head``) sees each detector through
the ``FrozenDetector`` contract (``potpourri.detect.frozen``), so the two frozen arms run identical head code; two
end-to-end arms are the comparison:

- **DETR arm**: our small DETR on frozen ImageNet EfficientNet-Lite0 features (``potpourri.detect.detr``: 16 queries,
  3 decoder layers, d 128, Hungarian matching, focal + L1 + GIoU), trained here for ``detr_steps`` steps, at most
  ``detr_minutes`` per invocation; its checkpoints (``<out>/detr_checkpoints``) make the training resumable in
  pieces: ``potpourri reproduce mask-frozen-detr --out SAME`` continues it (a folder of another config is refused).
  Then the head, for ``head_seconds``, on the frozen DETR (query = the Hungarian-matched query's last-decoder-layer
  state).
- **YOLO arm**: ``yolo_rep_n`` trained from scratch here for ``yolo_epochs`` (``potpourri.detect.train``), frozen,
  the same head for the same seconds (query = the winning anchor's head features).
- **Full fine-tuning arm**: the same small DETR and the same head trained jointly, end to end
  (``potpourri.detect.mask_joint``), from the frozen arm's initialisation, with the ImageNet Lite0 trunk frozen as
  in the DETR arm.
- **Mask R-CNN arm**: torchvision's ``MaskRCNN`` on the ImageNet Lite0 stages + FPN 64, everything trained
  (``potpourri.detect.maskrcnn``, the implementation ``benchmarks/mask_head.py`` uses too).

Same DS-Synth data (one instance per merged connected defect region), COCO box and mask AP by pycocotools. Every
training phase's CPU seconds are recorded (``time.process_time``). **Equal budget, enforced in code**: the two
end-to-end arms stop once they have spent ``budget`` = the DETR arm's detector CPU s + its head's CPU s (checked
before each step, so an arm ends at most one step over). Every arm's row is kept in ``<out>/arms/<arm>.json`` (the
YOLO's weights in ``<out>/yolo``) with the config it was made under; a re-run with the same ``--out`` and config
reuses the finished arms and trains only what is missing; a folder of the version before ``arms/`` gives its frozen
arms' rows from its ``summary.json``. The end-to-end arms are not resumable inside one arm: each is one budget, a
few CPU-minutes, re-run whole if killed. Reading order: ``MaskFrozenDetrConfig`` →
``reproduce_mask_frozen_detr`` (data → DETR → YOLO → heads → equal-budget arms → tables) → ``run``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run, new_run
from potpourri.core.training import TrainOptions
from potpourri.papers.registry import compute_options

__all__ = ["MaskFrozenDetrConfig", "frozen_trunk", "reproduce_mask_frozen_detr", "run"]


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
    pretrained_backbone: bool = True  # the ImageNet Lite0 under the DETRs and Mask R-CNN (False: random, smoke runs)
    maskrcnn_backbone: str = "lite0"  # lite0 (ImageNet) | rep (EfficientRep from scratch)
    arm_max_steps: int = 100_000  # a safety cap of the equal-budget arms; their CPU budget is what stops them
    seed: int = 0
    progress: bool = True


def frozen_trunk(cfg: MaskFrozenDetrConfig) -> torch.nn.Module:
    """The frozen Lite0 trunk of the DETR arms: ImageNet weights, or (quick runs) a random one drawn from the run's
    seed, so that a restored DETR sees the trunk it was trained on (the trunk is not in its checkpoints)."""
    from potpourri.models.yolo import Lite0Backbone

    if cfg.pretrained_backbone:
        return Lite0Backbone(pretrained=True)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return Lite0Backbone(pretrained=False)


def _detr_arm(cfg: MaskFrozenDetrConfig, train: list, names: tuple[str, ...], folder: Path, options: TrainOptions):
    """Train (or continue) the small DETR; the frozen adapter and a record of this invocation's cost."""
    from potpourri.core.io import atomic_write_bytes
    from potpourri.detect.detr import LiteDetr, LiteDetrFrozen, SmallDetrConfig, train_small_detr

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
    backbone = frozen_trunk(cfg)
    cpu = time.process_time()
    detr, history = train_small_detr(train, detr_cfg, backbone=backbone, checkpoints=folder,
                                     options=TrainOptions(**{**asdict(options), "resume": resume,
                                                             "checkpoint_every": 200}))  # fmt: skip
    if not pieces or pieces[-1]["steps_after"] != history["steps"]:  # restoring a finished DETR is no new piece
        pieces.append({"steps_after": history["steps"], "cpu_s": time.process_time() - cpu,
                       "wall_s": history["train_s"]})  # fmt: skip
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


def _kept_arm(run_path: Path, key: str, identity: dict[str, Any], compute: Callable[[], dict]) -> dict[str, Any]:
    """The row of arm ``key`` from ``<run>/arms/<key>.json`` when it was made under ``identity``, else computed and
    written there; ``reused`` says which."""
    from potpourri.core.io import atomic_write_bytes

    path = run_path / "arms" / f"{key}.json"
    identity = json.loads(json.dumps(identity))  # tuples as lists, as read back
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("identity") == identity:
            return {**record["row"], "reused": True}
    row = compute()
    atomic_write_bytes(path, json.dumps({"identity": identity, "row": row}, indent=1).encode())
    return {**row, "reused": False}


_SPLIT_ONLY = ("detr_minutes", "detr_checkpoints", "progress")  # how the DETR's training is split and shown


def _adopt_earlier_rows(path: Path, base: dict[str, Any]) -> list[str]:
    """Keep the frozen arms' rows of a folder written before ``arms/`` existed (its ``summary.json``), when its
    ``config.yaml`` equals ``base`` on every field it has; the arms adopted. The end-to-end arms are new."""
    import yaml

    from potpourri.core.io import atomic_write_bytes

    config_path, summary_path = path / "config.yaml", path / "summary.json"
    if (path / "arms").exists() or not config_path.is_file() or not summary_path.is_file():
        return []
    config = {k: v for k, v in (yaml.safe_load(config_path.read_text()) or {}).items() if k not in _SPLIT_ONLY}
    rows = json.loads(summary_path.read_text()).get("rows", {})
    if any(base.get(k, object()) != v for k, v in config.items()) or not {FROZEN_DETR, FROZEN_YOLO} <= rows.keys():
        return []
    detr, yolo = rows[FROZEN_DETR], rows[FROZEN_YOLO]
    head_keys = ("head_steps", "head_cpu_s", "head_params", "mask_map50", "mask_map")
    records = {
        "detr_head": ({**base, "detr_steps_done": detr["steps"]}, {k: detr[k] for k in head_keys}),
        "yolo": (base, {k: v for k, v in yolo.items() if k not in head_keys}),
        "yolo_head": (base, {k: yolo[k] for k in head_keys}),
    }
    for key, (identity, row) in records.items():
        record = {"identity": json.loads(json.dumps(identity)), "row": {**row, "adopted": True}}
        atomic_write_bytes(path / "arms" / f"{key}.json", json.dumps(record, indent=1).encode())
    return list(records)


def _yolo_arm(cfg: MaskFrozenDetrConfig, train: list, test: list, names: tuple[str, ...], folder: Path, options):
    """Train ``yolo_rep_n`` from scratch, save it in ``folder``; its cost and box AP."""
    from potpourri.detect.train import DetectTrainConfig, evaluate_detector, save_detector, train_detector

    yolo_cfg = DetectTrainConfig(class_names=names, image_size=cfg.image_size, epochs=cfg.yolo_epochs, seed=cfg.seed,
                                 progress=cfg.progress, **compute_options(DetectTrainConfig, options))  # fmt: skip
    cpu = time.process_time()
    yolo = train_detector(train, None, yolo_cfg, options=options)
    cost = {"steps": yolo.steps, "finished": True, "pieces": 1, "cpu_s": time.process_time() - cpu,
            "wall_s": yolo.seconds}  # fmt: skip
    save_detector(folder, yolo.model, {"model": yolo_cfg.model, "class_names": list(names),
                                       "image_size": cfg.image_size})  # fmt: skip
    boxes = evaluate_detector(yolo.model, test, image_size=cfg.image_size)
    return {**cost, "box_map50": boxes["map50"], "box_map": boxes["map"]}


def _joint_arm(cfg: MaskFrozenDetrConfig, train: list, test: list, names: tuple[str, ...], budget: float, options):
    """Full fine-tuning: the small DETR and the head trained jointly for ``budget`` CPU seconds; box and mask AP."""
    from potpourri.detect.detr import LiteDetrFrozen, SmallDetrConfig, predict_boxes
    from potpourri.detect.mask_head import MaskHeadConfig, mask_coco_map, predict_instances
    from potpourri.detect.mask_joint import train_detr_and_mask_head
    from potpourri.detect.train import coco_map

    detr_cfg = SmallDetrConfig(num_classes=len(names), max_steps=cfg.detr_steps, seed=cfg.seed, progress=cfg.progress)
    head_cfg = MaskHeadConfig(dim=cfg.head_dim, seed=cfg.seed, progress=cfg.progress)
    backbone = frozen_trunk(cfg)
    cpu = time.process_time()
    detector, head, history = train_detr_and_mask_head(train, detr_cfg, head_cfg, backbone=backbone,
                                                       max_steps=cfg.arm_max_steps, max_cpu_seconds=budget,
                                                       options=options)  # fmt: skip
    cpu = time.process_time() - cpu
    frozen = LiteDetrFrozen(detector)
    images = [s.image for s in test]
    boxes = coco_map(predict_boxes(frozen, images), test, len(names))
    masks = mask_coco_map(predict_instances(frozen, head, images, conf=0.001, device=options.device), test, len(names))
    mask_losses = [v for v in history["mask_losses"] if v == v]  # NaN: a batch without instances
    return {"steps": history["steps"], "cpu_s": cpu, "wall_s": history["wall_s"], "max_step_cpu_s":
            history["max_step_cpu_s"], "params": history["detr_params"] + history["head_params"],
            "box_map50": boxes["map50"], "box_map": boxes["map"],
            "mask_map50": masks["map50"], "mask_map": masks["map"],
            "detr_loss_last20": sum(history["detr_losses"][-20:]) / max(1, len(history["detr_losses"][-20:])),
            "mask_loss_last20": sum(mask_losses[-20:]) / max(1, len(mask_losses[-20:]))}  # fmt: skip


def _maskrcnn_arm(cfg: MaskFrozenDetrConfig, train: list, test: list, names: tuple[str, ...], budget: float) -> dict:
    """Mask R-CNN end to end for ``budget`` CPU seconds (on the CPU); box and mask AP."""
    from potpourri.detect.mask_head import mask_coco_map
    from potpourri.detect.maskrcnn import build_maskrcnn, predict_maskrcnn, train_maskrcnn
    from potpourri.detect.train import coco_map

    torch.manual_seed(cfg.seed)
    model = build_maskrcnn(len(names), cfg.maskrcnn_backbone, pretrained=cfg.pretrained_backbone,
                           image_size=cfg.image_size)  # fmt: skip
    cpu = time.process_time()
    history = train_maskrcnn(model, train, max_steps=cfg.arm_max_steps, max_cpu_seconds=budget, seed=cfg.seed)
    cpu = time.process_time() - cpu
    found = predict_maskrcnn(model, test, score_thresh=0.001)  # the other arms' confidence threshold
    boxes, masks = coco_map(found, test, len(names)), mask_coco_map(found, test, len(names))
    return {"steps": history["steps"], "cpu_s": cpu, "wall_s": history["wall_s"],
            "max_step_cpu_s": history["max_step_cpu_s"], "params": history["trainable_params"],
            "box_map50": boxes["map50"], "box_map": boxes["map"],
            "mask_map50": masks["map50"], "mask_map": masks["map"],
            "loss_last20": sum(history["losses"][-20:]) / max(1, len(history["losses"][-20:]))}  # fmt: skip


FROZEN_DETR, FROZEN_YOLO = "DETR (ours, frozen Lite0)", "yolo_rep_n (from scratch)"
JOINT, MASKRCNN = "DETR + head jointly (full fine-tuning, Lite0 frozen)", "Mask R-CNN (Lite0 + FPN 64, end to end)"


def reproduce_mask_frozen_detr(
    cfg: MaskFrozenDetrConfig, *, out: str | None = None, options: TrainOptions | None = None
) -> Run:
    """Train the DETR (or continue it) and the YOLO detector, a mask head on each frozen, then full fine-tuning and a
    Mask R-CNN at the DETR arm's total CPU; ``results.md``. Finished arms in the same ``out`` are reused.

    Example:
        run = reproduce_mask_frozen_detr(MaskFrozenDetrConfig(detr_minutes=5)); print(run.path / "results.md")
    """
    from potpourri.detect.detr import predict_boxes
    from potpourri.detect.frozen import YoloFrozen
    from potpourri.detect.mask_head import read_instance_data
    from potpourri.detect.train import coco_map, load_detector

    started = time.perf_counter()
    options = options or TrainOptions(progress=False)
    # what makes an arm's row: the config but for how the DETR's training is split and shown
    base = {k: v for k, v in asdict(cfg).items() if k not in _SPLIT_ONLY}
    adopted = _adopt_earlier_rows(Path(out), base) if out else []  # before config.yaml is rewritten
    run = new_run("reproduce-mask-frozen-detr", out, config=asdict(cfg), seed=cfg.seed)
    train, test, names = read_instance_data(f"ds-synth:{cfg.category}", image_size=cfg.image_size,
                                            per_kind=cfg.per_kind, seed=0)  # fmt: skip
    folder = Path(cfg.detr_checkpoints) if cfg.detr_checkpoints else run.path / "detr_checkpoints"
    detr, detr_cost = _detr_arm(cfg, train, names, folder, options)
    detr_boxes = coco_map(predict_boxes(detr, [s.image for s in test]), test, len(names))
    detr_head = _kept_arm(run.path, "detr_head", {**base, "detr_steps_done": detr_cost["steps"]},
                          lambda: _head_arm(detr, train, test, names, cfg, options))  # fmt: skip
    rows = {FROZEN_DETR: {**detr_cost, "box_map50": detr_boxes["map50"], "box_map": detr_boxes["map"], **detr_head}}

    yolo_folder = run.path / "yolo"
    yolo_row = _kept_arm(run.path, "yolo", base, lambda: _yolo_arm(cfg, train, test, names, yolo_folder, options))
    yolo_head = _kept_arm(run.path, "yolo_head", base,
                          lambda: _head_arm(YoloFrozen(load_detector(yolo_folder)[0]), train, test, names, cfg,
                                            options))  # fmt: skip
    rows[FROZEN_YOLO] = {**yolo_row, **yolo_head, "reused": yolo_row["reused"] and yolo_head["reused"]}

    # equal total training CPU: the frozen DETR arm's detector + head CPU seconds, taken from the records above
    budget = rows[FROZEN_DETR]["cpu_s"] + rows[FROZEN_DETR]["head_cpu_s"]
    equal = {**base, "budget_cpu_s": round(budget, 3)}
    if detr_cost["finished"]:  # the budget of an unfinished DETR would change at the next piece
        rows[JOINT] = _kept_arm(run.path, "joint", equal, lambda: _joint_arm(cfg, train, test, names, budget, options))
        rows[MASKRCNN] = _kept_arm(run.path, "maskrcnn", equal,
                                   lambda: _maskrcnn_arm(cfg, train, test, names, budget))  # fmt: skip

    detr_row, yolo_row = rows[FROZEN_DETR], rows[FROZEN_YOLO]
    totals = {FROZEN_DETR: budget, FROZEN_YOLO: yolo_row["cpu_s"] + yolo_row["head_cpu_s"]}
    totals.update({name: rows[name]["cpu_s"] for name in (JOINT, MASKRCNN) if name in rows})
    best = max((name for name in totals if name != FROZEN_YOLO), key=lambda name: rows[name]["mask_map50"])
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
        "budget_cpu_s": budget,
        "equal_budget_run": bool(detr_cost["finished"]),
        "best_mask_map50_at_detr_budget": best,  # among the frozen DETR and the two end-to-end arms
        "head_share_of_budget": rows[FROZEN_DETR]["head_cpu_s"] / budget,
    }
    lines = [
        "# Mask Frozen-DETR: one mask head on a frozen DETR and on a frozen YOLO, against end-to-end training",
        "",
        f"DS-Synth {cfg.category}, {cfg.image_size} px: {len(train)} training images "
        f"({sum(len(s.boxes) for s in train)} instances), {len(test)} test images; one seed ({cfg.seed}). "
        "Paper withdrawn from ICLR 2024; our own code; toy scale. (reused): a row kept from an earlier invocation "
        "on this folder.",
        "",
        "| detector | detector steps | detector CPU s | box mAP50 / mAP | head steps | head CPU s | head params "
        "| **mask mAP50** / mAP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (FROZEN_DETR, FROZEN_YOLO):
        r = rows[name]
        steps = f"{r['steps']}" + ("" if r["finished"] else " (capped)") + (f", {r['pieces']} pieces")
        lines.append(f"| {name}{' (reused)' if r['reused'] else ''} | {steps} | {r['cpu_s']:.0f} | "
                     f"{r['box_map50']:.3f} / {r['box_map']:.3f} | {r['head_steps']} | {r['head_cpu_s']:.0f} | "
                     f"{r['head_params']:,} | **{r['mask_map50']:.3f}** / {r['mask_map']:.3f} |")  # fmt: skip
    lines += ["", f"## At equal total training CPU: budget {budget:.0f} CPU s (the frozen DETR arm's detector + head)",
              "", "| arm | what trains | steps | total training CPU s | box mAP50 / mAP | **mask mAP50** / mAP |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    trains = {FROZEN_DETR: "DETR, then the head on it frozen",
              FROZEN_YOLO: "YOLO, then the head on it frozen (not budget-matched: its own epochs)",
              JOINT: "DETR + head together", MASKRCNN: "everything"}  # fmt: skip
    for name, total in totals.items():
        r = rows[name]
        steps = f"{r['steps']} + {r['head_steps']}" if "head_steps" in r else f"{r['steps']}"
        lines.append(
            f"| {name}{' (reused)' if r['reused'] else ''} | {trains[name]} | {steps} | {total:.0f} | "
            f"{r['box_map50']:.3f} / {r['box_map']:.3f} | **{r['mask_map50']:.3f}** / {r['mask_map']:.3f} |"
        )
    if not detr_cost["finished"]:
        lines += ["", "The equal-budget arms wait for the finished DETR (re-run with the same --out)."]
    lines += [
        "",
        f"Verdict: DETR box mAP50 {'≥' if verdict['detr_useful'] else '<'} 0.3 "
        f"({'useful' if verdict['detr_useful'] else 'not useful'} as a frozen detector); better mask mAP50 of the two "
        f"frozen detectors: {verdict['mask_map50_better_arm']}; best mask mAP50 at the DETR arm's budget: {best}; "
        f"the head is {verdict['head_share_of_budget']:.0%} of that budget.",
        f"DETR loss (mean of first / last 20 steps): {detr_row['loss_first20']:.2f} / {detr_row['loss_last20']:.2f}.",
    ]
    if adopted:
        lines.append(
            f"Kept from this folder's earlier summary.json (written before arms/ existed): {', '.join(adopted)}."
        )
    summary = {"rows": rows, "verdict": verdict, "adopted": adopted, "seconds": time.perf_counter() - started,
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
