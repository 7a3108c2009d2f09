"""PatchCore coreset at scale: one greedy pass over the whole bank vs the partitioned (composable) coreset.

Part 1 (quality, same run): fit on ``--train`` DS-Synth normal images of one category with the full greedy coreset
and with slices of at most ``--max-patches`` patches; report coreset time, image / pixel AUROC and AUPRO on the
DS-Synth test images of that category, and the ratio of times.
Part 2 (scale): the memory budget and the partitioned coreset time for ``--scale`` (default 1,000) images,
measured on a bank of real embedded patches tiled to that size (embedding 1,000 images is not what is timed here).
Run: ``.venv/bin/python benchmarks/patchcore_coreset_scaling.py --category brick --train 100 --threads 2``
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from potpourri.core.metrics import aupro, image_auroc, pixel_auroc
from potpourri.data.synth import make_samples
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig, memory_budget, partitioned_coreset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brick")
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=42, help="test images (cycling good + 6 defect kinds)")
    parser.add_argument("--max-patches", type=int, default=20_000)
    parser.add_argument("--scale", type=int, default=1000)
    parser.add_argument("--scale-max-patches", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = [s.image for s in make_samples(args.category, "train", args.train, size=224, kinds=("good",))]
    test = make_samples(args.category, "test", args.test, size=224)
    labels = np.array([s.kind != "good" for s in test])
    masks = np.stack([s.mask > 0 for s in test])
    base = PatchCoreConfig(coreset_threads=1)
    method = PatchCore(base)
    bank = method.embed(train).permute(0, 2, 3, 1).reshape(-1, base.embed_dim)  # embedded once, shared by both arms
    results = {}
    for name, max_rows in (("full greedy", bank.shape[0]), (f"slices of {args.max_patches}", args.max_patches)):
        start = time.perf_counter()
        chosen = partitioned_coreset(bank, base.coreset_ratio, max_rows, projection_dim=base.projection_dim)
        seconds = time.perf_counter() - start
        method.memory_bank, method.n_train_images = bank[chosen].clone(), len(train)
        scores, maps = method.score([s.image for s in test])
        results[name] = {
            "patches": bank.shape[0],
            "kept": int(chosen.numel()),
            "coreset_s": round(seconds, 2),
            "image_auroc": round(image_auroc(labels, scores), 3),
            "pixel_auroc": round(pixel_auroc(masks, maps), 3),
            "aupro": round(aupro(masks, maps), 3),
        }
        print(name, results[name], flush=True)
    full, part = results.values()
    print(f"coreset speed-up: {full['coreset_s'] / max(part['coreset_s'], 1e-9):.1f}x")

    grid = method.grid()
    budget = memory_budget(base, args.scale, grid)
    rows = budget["patches"]
    tiled = bank.repeat(math.ceil(rows / bank.shape[0]), 1)[:rows]
    tiled = tiled + 0.01 * torch.randn_like(tiled)  # no exact duplicates
    start = time.perf_counter()
    chosen = partitioned_coreset(tiled, base.coreset_ratio, args.scale_max_patches, projection_dim=base.projection_dim)
    scale_s = time.perf_counter() - start
    scale = {
        "images": args.scale,
        "patches": rows,
        "slice": args.scale_max_patches,
        "coreset_s": round(scale_s, 1),
        "kept": int(chosen.numel()),
        **{k: f"{v / 2**20:.0f} MiB" for k, v in budget.items() if k != "patches"},
    }
    print("scale", scale)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quality": results, "scale": scale, "threads": args.threads}, f, indent=2)


if __name__ == "__main__":
    main()
