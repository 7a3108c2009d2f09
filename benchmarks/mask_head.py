"""Mask Frozen-DETR at toy scale: frozen detector + light mask head vs end-to-end Mask R-CNN, same wall clock.

(a) the trained ``yolo_rep_n`` brick detector (a ``potpourri detect train`` run) frozen, only the mask head of
``potpourri.detect.mask_head`` trained for ``--budget`` seconds (including the one-off feature cache);
(b) torchvision's ``MaskRCNN`` class with a small backbone (ImageNet EfficientNet-Lite0 stages, or our EfficientRep
from scratch) + FPN (64 channels) and slim heads, trained end to end for the same seconds (``--maskrcnn-budgets``);
builder and loop are ``potpourri.detect.maskrcnn``'s, shared with ``reproduce mask-frozen-detr``.
Same DS-Synth brick data (one instance per connected defect region), 256 px, 1 thread, COCO mask AP (pycocotools).
Run: `.venv/bin/python benchmarks/mask_head.py --run /tmp/yolo_work/run_brick --budget 150 --maskrcnn-budgets 150`
Total cost (detector training + head): `... --maskrcnn-only --maskrcnn-budgets 685` (records wall and CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn

from potpourri.data.boxes import DetectionSample
from potpourri.data.transforms import images_to_tensor
from potpourri.detect.mask_head import (
    InstanceSample,
    MaskHead,
    MaskHeadConfig,
    frozen_outputs,
    mask_coco_map,
    paste_masks,
    predict_instances,
    read_instance_data,
    train_mask_head,
    winning_anchors,
)
from potpourri.detect.maskrcnn import build_maskrcnn, predict_maskrcnn, train_maskrcnn
from potpourri.detect.train import coco_map, evaluate_detector, load_detector


def _as_boxes(samples: list[InstanceSample]) -> list[DetectionSample]:
    return [DetectionSample(s.image, s.boxes, s.labels, s.name) for s in samples]


@torch.no_grad()
def oracle_box_masks(detector: nn.Module, head: MaskHead, samples: list[InstanceSample]) -> list[dict]:
    """Masks of the head inside the ground-truth boxes (score 1): mask quality without detection errors."""
    out = []
    for s in samples:
        frozen = frozen_outputs(detector, images_to_tensor([s.image], detector.mean, detector.std).contiguous())
        boxes = torch.from_numpy(s.boxes)
        masks = np.zeros((0, *s.image.shape[:2]), bool)
        if len(boxes):
            anchors = winning_anchors(frozen.boxes[0], boxes)
            rows = torch.zeros(len(boxes), dtype=torch.long)
            logits = head(head.pixel_map(frozen.fine, frozen.p3), torch.cat([rows[:, None].float(), boxes], 1),
                          head.queries(frozen.embeds, rows, anchors))  # fmt: skip
            masks = (paste_masks(logits.sigmoid(), boxes, s.image.shape[:2]) > 0.5).numpy()
        out.append({"masks": masks, "scores": np.ones(len(boxes)), "labels": s.labels})
    return out


def _frozen_arm(detector: nn.Module, meta: dict, train: list, test: list, names: tuple, budget: float) -> dict:
    """Arm (a): the mask head trained on the frozen detector for ``budget`` seconds, then box, mask and oracle AP."""
    box = evaluate_detector(detector, _as_boxes(test), image_size=meta["image_size"])
    head, history = train_mask_head(detector, train, MaskHeadConfig(max_steps=100_000, max_seconds=budget))
    t0 = time.perf_counter()
    mask = mask_coco_map(predict_instances(detector, head, [s.image for s in test], conf=0.001), test, len(names))
    infer_s = time.perf_counter() - t0
    oracle = mask_coco_map(oracle_box_masks(detector, head, test), test, len(names))
    return {"arm": "(a) frozen yolo_rep_n + mask head", "train_s": history["train_s"], "steps": history["steps"],
            "cache_s": history["cache_s"], "trainable_params": history["trainable_params"],
            "frozen_params": sum(p.numel() for p in detector.parameters()), "box_map": box["map"],
            "box_map50": box["map50"], "mask_map": mask["map"], "mask_map50": mask["map50"],
            "gt_box_mask_map": oracle["map"], "gt_box_mask_map50": oracle["map50"], "test_infer_s": infer_s,
            "first_loss": float(np.mean(history["losses"][:10])),
            "last_loss": float(np.mean(history["losses"][-10:]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/yolo_work/run_brick", help="a `potpourri detect train` folder")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the mask head (a)")
    parser.add_argument("--maskrcnn-budgets", type=float, nargs="*", default=[150.0], help="seconds for (b)")
    parser.add_argument("--maskrcnn-backbone", choices=("lite0", "rep"), default="lite0")
    parser.add_argument("--maskrcnn-only", action="store_true", help="skip arm (a); --run still names the data")
    parser.add_argument("--out", default="/tmp/mask_work/mask_head.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    detector, meta = load_detector(args.run)
    train, test, names = read_instance_data(meta.get("data", "ds-synth:brick"), image_size=meta["image_size"])
    rows = []
    if not args.maskrcnn_only:
        rows.append(_frozen_arm(detector, meta, train, test, names, args.budget))
        print(json.dumps(rows[-1]), flush=True)
    for seconds in args.maskrcnn_budgets:
        torch.manual_seed(0)
        model = build_maskrcnn(len(names), args.maskrcnn_backbone)
        trained = train_maskrcnn(model, train, max_seconds=seconds)
        steps, train_s, cpu_s = trained["steps"], trained["wall_s"], trained["cpu_s"]
        preds = predict_maskrcnn(model, test)
        box_b = coco_map(preds, _as_boxes(test), len(names))
        mask_b = mask_coco_map(preds, test, len(names))
        rows.append({"arm": f"(b) Mask R-CNN ({args.maskrcnn_backbone}+FPN64) end to end", "train_s": train_s,
                     "steps": steps, "train_cpu_s": cpu_s,
                     "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "box_map": box_b["map"], "box_map50": box_b["map50"], "mask_map": mask_b["map"],
                     "mask_map50": mask_b["map50"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
