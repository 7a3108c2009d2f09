"""Linear probe with cached backbone features vs the naive probe that runs the backbone every epoch.

Both arms train the same head with the same loop on the same images; the naive arm re-runs the frozen backbone
each epoch, the cached arm runs it once. Reps are interleaved (naive, cached, naive, …) and the median is reported.

    .venv/bin/python benchmarks/linear_probe_cache.py --threads 2 --images 256 --size 64 --epochs 10 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.data import TensorDataset

import potpourri
from potpourri.tune.trainer import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = potpourri.create_model(args.model, pretrained=args.pretrained, num_classes=args.classes)
    images = torch.randn(args.images, 3, args.size, args.size)
    labels = torch.arange(args.images) % args.classes
    data = TensorDataset(images, labels)
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-2, "progress": False}

    times: dict[str, list[float]] = {"naive": [], "cached": []}
    heads = {}
    for _ in range(args.reps):
        for arm in ("naive", "cached"):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            result = fit(model, data, None, "linear", cache_features=arm == "cached", **cfg)
            times[arm].append(time.perf_counter() - start)
            heads[arm] = result.model.get_classifier().weight.detach()

    naive, cached = statistics.median(times["naive"]), statistics.median(times["cached"])
    print(
        f"model={args.model} images={args.images} size={args.size}px epochs={args.epochs} "
        f"batch={args.batch_size} threads={args.threads} reps={args.reps}"
    )
    print(f"naive  (backbone every epoch): median {naive:.2f} s  {[round(t, 2) for t in times['naive']]}")
    print(f"cached (backbone once)       : median {cached:.2f} s  {[round(t, 2) for t in times['cached']]}")
    print(f"speed-up: {naive / cached:.1f}x")
    print(f"max |head weight difference| cached vs naive: {(heads['naive'] - heads['cached']).abs().max():.2e}")


if __name__ == "__main__":
    main()
