"""One-shot segmentation on DS-Synth: SLiMe-style embeddings vs the nearest-prototype baseline, k = 1 and 5.

Protocol. A DS-Synth image carries one defect class, so "k-shot" means k annotated support images per defect
class (k=1: 6 images, one per class; k=5: 30), drawn from the train split (rows 0-62.5 % of the photo); each seed
draws different support images. Test: held-out images of the same category from the test split (10 per defect
class + 10 "multi" images with 2-3 classes). Metrics over all test pixels: per-class IoU and mIoU over the 7
classes (background included) and over the 6 defect classes. Features: frozen ImageNet EfficientNet-Lite0.

    .venv/bin/python benchmarks/oneshot_ds_synth.py --categories brick gravel --seeds 0 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from potpourri.core.metrics import iou_per_class
from potpourri.data.synth import CLASSES, DEFECTS, MULTI, make_samples
from potpourri.segment.oneshot import OneShotConfig, OneShotSegmenter


def support_set(category: str, k: int, seed: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """k train images per defect class; seed s takes the s-th disjoint block of k images of each class."""
    pool = make_samples(category, "train", len(DEFECTS) * k * (seed + 1), size=size, kinds=DEFECTS)
    chosen = [s for s in pool if s.index // k == seed]
    return [s.image for s in chosen], [s.mask for s in chosen]


def evaluate(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ious = iou_per_class(predicted, truth, len(CLASSES))
    row = {name: float(ious[i]) for i, name in enumerate(CLASSES)}
    row["miou"] = float(np.nanmean(ious))
    row["miou_defects"] = float(np.nanmean(ious[1:]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["brick", "gravel"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--test-per-kind", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows, source = [], None
    for category in args.categories:
        kinds = (*DEFECTS, MULTI)
        test = make_samples(category, "test", len(kinds) * args.test_per_kind, size=args.size, kinds=kinds)
        truth = np.stack([s.mask for s in test])
        config = OneShotConfig(image_size=args.size, steps=args.steps)
        probe = OneShotSegmenter(config, source=source)
        source = probe.source  # one frozen Lite0 for everything
        tick = time.perf_counter()
        prepared = probe.prepare([s.image for s in test])  # test features computed once per category
        print(f"[{category}] test features for {len(test)} images: {time.perf_counter() - tick:.1f} s", flush=True)
        for k in args.shots:
            for seed in args.seeds:
                images, masks = support_set(category, k, seed, args.size)
                for method in ("prototype", "slime"):
                    tick = time.perf_counter()
                    model = OneShotSegmenter(
                        OneShotConfig(**{**vars(config), "method": method, "seed": seed}), source=source
                    )
                    model.fit(images, masks)
                    fit_s = time.perf_counter() - tick
                    variants = (
                        [("prototype", True)] if method == "prototype" else [("slime", True), ("slime-cross", False)]
                    )
                    for name, refine in variants:
                        model.config.refine = refine
                        row = {"category": category, "k": k, "seed": seed, "method": name, "fit_s": round(fit_s, 1)}
                        row.update(evaluate(model.labels(model.scores_prepared(prepared)), truth))
                        rows.append(row)
                        print(
                            f"[{category}] k={k} seed={seed} {name:12s} mIoU {row['miou']:.3f} "
                            f"defects {row['miou_defects']:.3f} fit {fit_s:.1f} s",
                            flush=True,
                        )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s\n")
    print("| category | k | method | mIoU (7 cl.) | mIoU defects | " + " | ".join(CLASSES) + " | fit s |")
    print("|---|---|---|---|---|" + "---|" * len(CLASSES) + "---|")
    groups = sorted({(r["category"], r["k"], r["method"]) for r in rows}, key=lambda g: (g[0], g[1], g[2]))
    for category, k, method in groups:
        group = [r for r in rows if (r["category"], r["k"], r["method"]) == (category, k, method)]

        def cell(key: str, group=group) -> str:
            values = np.array([r[key] for r in group], dtype=float)
            return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"

        per_class = " | ".join(f"{np.nanmean([r[c] for r in group]):.3f}" for c in CLASSES)
        fit = np.mean([r["fit_s"] for r in group])
        print(f"| {category} | {k} | {method} | {cell('miou')} | {cell('miou_defects')} | {per_class} | {fit:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "total_s": total, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
