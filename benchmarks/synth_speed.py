"""How fast DS-Synth is generated: in memory (images/s per process) and written to disk in both layouts.

Run: ``.venv/bin/python benchmarks/synth_speed.py --per-class 20 --workers 2`` (5 categories x 200 = 1,000 images).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from potpourri.data.synth import CATEGORIES, make_samples, write_ds_synth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=20, help="200 images per category at 20")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-memory", type=int, default=70, help="images for the single-process in-memory timing")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    make_samples("brick", "test", args.in_memory, size=args.size)
    in_memory = args.in_memory / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = write_ds_synth(out, size=args.size, per_class=args.per_class, workers=args.workers)
        seconds = time.perf_counter() - start
    images = sum(n for counts in manifest["counts"].values() for n in counts.values())
    result = {
        "size": args.size,
        "categories": len(CATEGORIES),
        "images": images,
        "files": len(manifest["files"]),
        "workers": args.workers,
        "write_seconds": round(seconds, 2),
        "write_images_per_s": round(images / seconds, 1),
        "in_memory_images_per_s_1_process": round(in_memory, 1),
    }
    print(f"in memory, 1 process: {in_memory:.1f} images/s at {args.size} px")
    print(f"written (both layouts + masks + captions + manifest), {args.workers} workers: {images} images "
          f"in {seconds:.1f} s = {images / seconds:.1f} images/s")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
