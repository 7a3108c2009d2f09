"""``potpourri reproduce simdetr``: SimDETR-style unsupervised detection pretraining at CPU scale, on DS-Synth.

SimDETR ("Simplifying Self-Supervised Object Detection Pretraining", arXiv 2307.15697) was **withdrawn from ICLR
2024**; its claims (proposals from high-level features beat low-level cues; pseudo-class pretraining + self-training
help most in low-data regimes) are what we test, with ``potpourri.detect.simdetr`` and the YOLOv6-style detector:

1. Proposals on the unlabelled pool (no labels used): recall@IoU 0.5 against the boxes from DS-Synth masks, for
   frozen ImageNet Lite0 features vs raw pixels (the low-level baseline), top-1/3/10/20 per image.
2. Pseudo-classes: k-means over the pooled proposal features of the whole pool; purity against the true defect
   classes (proposals that hit a ground-truth box), next to the purity chance gives with the same cluster sizes.
3. Detector pretraining on the pool with the pseudo-boxes (round 1), then self-training (round 2: the round-1
   detector's confident predictions as labels); the detector's own class-agnostic recall after each round.
4. Low-label fine-tuning: ``labelled_per_kind`` labelled images per kind, the same epochs for every arm: from
   scratch, from round 1, from round 2; test mAP@0.5 and mAP@0.5:0.95 (pycocotools), over seeds.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.papers.registry import compute_options
from potpourri.report.tables import mean_std

__all__ = ["SimDETRConfig", "reproduce_simdetr", "run"]


@dataclass
class SimDETRConfig:
    """Every knob of the SimDETR study."""

    category: str = "brick"
    image_size: int = 128
    pool_per_kind: int = 20  # unlabelled images per kind (six defects + multi); the labelled ones are among them
    labelled_per_kind: int = 5
    test_per_kind: int = 10
    feature_upsample: int = 2  # Lite0 sees the image at 2x: a 32x32 stride-8 grid for 128 px
    proposals_per_image: int = 3  # round-1 pseudo-boxes per image
    pseudo_classes: int = 8
    purity_ks: tuple[int, ...] = (6, 12)
    model: str = "yolo_rep_n"
    pretrain_epochs: int = 15  # per round
    rounds: int = 2  # 1: proposals only; 2: + one self-training round
    self_train_conf: float = 0.3
    finetune_epochs: int = 50
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    finetune_seeds: tuple[int, ...] = (0, 1)
    progress: bool = True


COLUMNS = ("stage", "arm", "k", "seed", "recall@1", "recall@3", "recall@10", "recall@20", "purity", "chance",
           "boxes_per_image", "map50", "map", "seconds")  # fmt: skip


def _log(run: Run, row: dict[str, Any]) -> None:
    """One metrics.csv row with every column (``Run.log_metrics`` keeps the first row's header)."""
    run.log_metrics({column: row.get(column, "") for column in COLUMNS})


def _detections_as_boxes(
    model: Any, samples: list, cfg: SimDETRConfig, device: torch.device | None = None
) -> list[dict[str, np.ndarray]]:
    from potpourri.detect.train import detect_images

    images = [s.image for s in samples]
    return detect_images(model, images, image_size=cfg.image_size, conf=0.001, max_det=50, device=device or "cpu")


def reproduce_simdetr(cfg: SimDETRConfig, *, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """The four measurements above; writes ``results.md`` and ``summary.json`` into the run folder.

    ``options`` (device, precision) reach the detector's training config and loop where they take them; proposals
    (Lite0 features, clustering) are computed on the CPU.

    Example:
        run = reproduce_simdetr(SimDETRConfig(finetune_seeds=(0,))); print((run.path / "results.md").read_text())
    """
    from potpourri.core.boxes import box_iou
    from potpourri.data.boxes import DetectionSample, synth_detection_samples
    from potpourri.data.synth import DEFECTS, MULTI
    from potpourri.detect.simdetr import (
        ProposalConfig,
        chance_purity,
        confident_labels,
        fit_pseudo_classes,
        lite0_feature_maps,
        pixel_feature_maps,
        proposal_recall,
        propose_boxes,
        purity,
        region_descriptors,
    )
    from potpourri.detect.train import DetectTrainConfig, build_detector, evaluate_detector, train_detector

    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-simdetr", out, config=asdict(cfg), seed=cfg.seed)
    seed_everything(cfg.seed)
    kinds = (*DEFECTS, MULTI)
    size = (cfg.image_size, cfg.image_size)
    pool = synth_detection_samples(cfg.category, "train", cfg.pool_per_kind * len(kinds), seed=cfg.seed,
                                   size=cfg.image_size)  # fmt: skip
    labelled = pool[: cfg.labelled_per_kind * len(kinds)]  # kinds cycle: indices 0..labelled_per_kind-1 of each
    test = synth_detection_samples(cfg.category, "test", cfg.test_per_kind * len(kinds), seed=cfg.seed,
                                   size=cfg.image_size)  # fmt: skip
    truth = [s.boxes for s in pool]
    summary: dict[str, Any] = {"config": asdict(cfg)}
    lines = [f"# SimDETR-style pretraining on DS-Synth {cfg.category} ({cfg.image_size} px)", ""]
    lines += ["SimDETR (arXiv 2307.15697) was **withdrawn from ICLR 2024**; toy re-implementation, our own code.", ""]

    # 1. proposals: Lite0 features vs pixels
    tic = time.perf_counter()
    features = lite0_feature_maps([s.image for s in pool], upsample=cfg.feature_upsample, progress=cfg.progress)
    grid = features.shape[-1]
    pixels = pixel_feature_maps([s.image for s in pool], grid)
    pcfg = ProposalConfig()
    proposals = {
        "lite0 features": [propose_boxes(f, size, pcfg) for f in features],
        "pixels (RGB)": [propose_boxes(p, size, pcfg) for p in pixels],
    }
    seconds_proposals = time.perf_counter() - tic
    tops = (1, 3, 10, 20)
    lines += [f"## 1. Unsupervised proposals: recall@IoU0.5 on the {len(pool)}-image pool ({sum(map(len, truth))} "
              f"boxes, grid {grid}x{grid})", "", "| features | " + " | ".join(f"top-{k}" for k in tops) + " |",
              "|---|" + "---|" * len(tops)]  # fmt: skip
    for name, found in proposals.items():
        recalls = [proposal_recall([p.boxes for p in found], truth, top=k) for k in tops]
        summary[f"recall_{name}"] = dict(zip(map(str, tops), recalls, strict=True))
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}" for r in recalls) + " |")
        _log(run, {"stage": "proposals", "arm": name, **{f"recall@{k}": r for k, r in zip(tops, recalls, strict=True)}})
    lines.append("")

    # 2. pseudo-classes over the pool's top proposals
    top_boxes = [p.boxes[: cfg.proposals_per_image] for p in proposals["lite0 features"]]
    descriptors = {
        sub: np.concatenate([region_descriptors(f, b, size, subtract_image_mean=sub) for f, b in
                             zip(features, top_boxes, strict=True)])
        for sub in (True, False)
    }  # fmt: skip
    hit_class = []  # the true class of the ground-truth box each proposal hits (IoU ≥ 0.5), else -1
    for boxes, sample in zip(top_boxes, pool, strict=True):
        overlap = box_iou(boxes, sample.boxes) if len(sample.boxes) else np.zeros((len(boxes), 0))
        for row in overlap:
            hit_class.append(int(sample.labels[row.argmax()]) if len(row) and row.max() >= 0.5 else -1)
    hit_class = np.asarray(hit_class)
    hits = hit_class >= 0
    gt_descriptors = np.concatenate([region_descriptors(f, s.boxes, size) for f, s in zip(features, pool, strict=True)])
    gt_classes = np.concatenate([s.labels for s in pool])
    lines += [f"## 2. Pseudo-classes: purity against the true defect classes ({int(hits.sum())} of {len(hits)} "
              f"top-{cfg.proposals_per_image} proposals hit a box)", "",
              "| regions clustered | k | purity | chance (same cluster sizes) |", "|---|---|---|---|"]  # fmt: skip
    for k in cfg.purity_ks:
        for name, desc, keep_rows, classes in (
            ("proposals, minus image mean", descriptors[True], hits, hit_class),
            ("proposals, raw pooled", descriptors[False], hits, hit_class),
            ("ground-truth boxes (upper bound)", gt_descriptors, np.ones(len(gt_classes), bool), gt_classes),
        ):
            clusters, _ = fit_pseudo_classes(desc, k, seed=cfg.seed)
            value, chance = (
                purity(clusters[keep_rows], classes[keep_rows]),
                chance_purity(clusters[keep_rows], classes[keep_rows]),
            )
            summary[f"purity_k{k}_{name}"] = {"purity": value, "chance": chance}
            lines.append(f"| {name} | {k} | {value:.3f} | {chance:.3f} |")
            _log(run, {"stage": "purity", "arm": name, "k": k, "purity": value, "chance": chance})
    lines.append("")

    # 3. pretraining rounds on pseudo-boxes
    pseudo, _ = fit_pseudo_classes(descriptors[True], cfg.pseudo_classes, seed=cfg.seed)
    labels, start = [], 0
    for boxes in top_boxes:
        labels.append((boxes, pseudo[start : start + len(boxes)]))
        start += len(boxes)
    pseudo_names = tuple(f"pseudo{i}" for i in range(cfg.pseudo_classes))
    pretrain_cfg = DetectTrainConfig(model=cfg.model, class_names=pseudo_names,
                                     image_size=cfg.image_size, epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size,
                                     lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                                     **compute_options(DetectTrainConfig, options))  # fmt: skip
    pretrained: dict[str, Any] = {}
    model = None
    lines += ["## 3. Pretraining on pseudo-boxes and self-training: the detector's class-agnostic recall on the pool",
              "", "| round | labels | boxes/image | recall top-1 | top-3 | top-10 | seconds |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for round_index in range(1, cfg.rounds + 1):
        train = [DetectionSample(s.image, b, lab, s.name) for s, (b, lab) in zip(pool, labels, strict=True)]
        tic = time.perf_counter()
        result = train_detector(train, None, pretrain_cfg, model=model, options=options)
        model = result.model
        detections = _detections_as_boxes(model, pool, cfg, device)
        recalls = [proposal_recall([d["boxes"] for d in detections], truth, top=k) for k in (1, 3, 10)]
        source = (
            f"top-{cfg.proposals_per_image} proposals" if round_index == 1 else f"detections ≥ {cfg.self_train_conf}"
        )
        per_image = float(np.mean([len(b) for b, _ in labels]))
        seconds = time.perf_counter() - tic
        lines.append(f"| {round_index} | {source} | {per_image:.2f} | " + " | ".join(f"{r:.3f}" for r in recalls)
                     + f" | {seconds:.0f} |")  # fmt: skip
        recall_row = {f"recall@{k}": r for k, r in zip((1, 3, 10), recalls, strict=True)}
        _log(run, {"stage": "pretrain", "arm": f"round{round_index}", "boxes_per_image": per_image,
                         **recall_row, "seconds": seconds})  # fmt: skip
        summary[f"pretrain_round{round_index}"] = {"recall": recalls, "boxes_per_image": per_image}
        pretrained[f"SimDETR round {round_index}"] = copy.deepcopy(model)
        labels = confident_labels(detections, conf=cfg.self_train_conf, fallback=labels)
    lines.append("")

    # 4. low-label fine-tuning, the same budget for every arm
    finetune_rows: dict[str, list[dict[str, float]]] = {}
    for seed in cfg.finetune_seeds:
        ft_cfg = DetectTrainConfig(model=cfg.model, class_names=tuple(DEFECTS), image_size=cfg.image_size,
                                   epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                   progress=cfg.progress, **compute_options(DetectTrainConfig, options))  # fmt: skip
        for arm in ("scratch", *pretrained):
            seed_everything(seed)
            if arm == "scratch":
                start_model = build_detector(ft_cfg)
            else:
                start_model = copy.deepcopy(pretrained[arm])
                start_model.reset_classifier(len(DEFECTS))
            tic = time.perf_counter()
            result = train_detector(labelled, None, ft_cfg, model=start_model, options=options)
            metrics = evaluate_detector(result.model, test, image_size=cfg.image_size, device=device)
            row = {"map50": metrics["map50"], "map": metrics["map"], "seconds": time.perf_counter() - tic}
            finetune_rows.setdefault(arm, []).append(row)
            _log(run, {"stage": "finetune", "arm": arm, "seed": seed, **row})
    lines += [f"## 4. Low-label fine-tuning: {len(labelled)} labelled images ({cfg.labelled_per_kind} per kind), "
              f"{cfg.finetune_epochs} epochs each, test {len(test)} images; mean ± std over seeds "
              f"{list(cfg.finetune_seeds)}", "", "| start | test mAP@0.5 | test mAP@0.5:0.95 |",
              "|---|---|---|"]  # fmt: skip
    for arm, rows in finetune_rows.items():
        map50, map_ = [r["map50"] for r in rows], [r["map"] for r in rows]
        lines.append(f"| {arm} | {mean_std(map50)} | {mean_std(map_)} |")
        summary[f"finetune_{arm}"] = {"map50": map50, "map": map_}
    total = time.perf_counter() - started
    summary["seconds"] = total
    summary["seconds_proposals"] = seconds_proposals
    lines += ["", f"Total {total / 60:.1f} min on {torch.get_num_threads()} thread(s)."]
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary(summary)
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce simdetr``: the full study, or a seconds-long smoke run of the same code path."""
    cfg = SimDETRConfig()
    if quick:  # same code path, numbers not meaningful
        cfg = SimDETRConfig(image_size=64, pool_per_kind=2, labelled_per_kind=1, test_per_kind=1, pseudo_classes=3,
                            purity_ks=(2,), pretrain_epochs=1, finetune_epochs=1, finetune_seeds=(0,),
                            feature_upsample=1, batch_size=7, progress=False)  # fmt: skip
    return reproduce_simdetr(cfg, out=out, options=options)
