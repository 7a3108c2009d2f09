"""PatchCore throughput on 2 CPU cores: fit and predict images/s at 224 px, coreset selection time, bank size.

Data: crops of the scikit-image textures (brick, grass, gravel) with a planted bright/dark square as the defect;
train crops from rows 0-319 of each 512² photo, test crops from rows 320-511. Threads are pinned.
Run: ``.venv/bin/python benchmarks/patchcore_speed.py --train 32 --test 16 --threads 2``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import torch
from skimage import data

from potpourri import create_model
from potpourri.core.metrics import image_auroc
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig, greedy_coreset


def crops(texture: str, rows: tuple[int, int], n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    gray = getattr(data, texture)()
    out = []
    for _ in range(n):
        top = int(rng.integers(rows[0], rows[1] - min(size, rows[1] - rows[0]) + 1))
        left = int(rng.integers(0, gray.shape[1] - size + 1))
        patch = gray[top : top + size, left : left + size]
        if patch.shape[0] < size:  # the test band is narrower than 224 px: pad by reflection
            patch = np.pad(patch, ((0, size - patch.shape[0]), (0, 0)), mode="reflect")
        out.append(np.repeat(patch[..., None], 3, axis=2).copy())
    return out


def planted_set(texture: str, n_train: int, n_test: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    train = crops(texture, (0, 320), n_train, size, rng)
    test = crops(texture, (320, 512), n_test, size, rng)
    labels = np.arange(n_test) % 2
    square = size // 8
    for image, label in zip(test, labels, strict=True):
        if label:
            top, left = (int(v) for v in rng.integers(8, size - square - 8, 2))
            image[top : top + square, left : left + square] = (250, 250, 40) if rng.random() < 0.5 else (10, 10, 60)
    return train, test, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=32, help="normal training images per texture")
    parser.add_argument("--test", type=int, default=16, help="test images per texture (half with a defect)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--textures", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--nn-backend", choices=("torch", "faiss"), default="torch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]

    rows = []
    backbone = create_model("efficientnet_lite0", pretrained=True).eval()
    for texture in args.textures:
        train, test, labels = planted_set(texture, args.train, args.test, args.image_size, args.seed)
        config = PatchCoreConfig(
            image_size=args.image_size, coreset_ratio=args.coreset_ratio, nn_backend=args.nn_backend, seed=args.seed
        )
        model = PatchCore(config, backbone=backbone)  # one loaded backbone: model building is not what we time
        model.embed(train[:2])  # warm-up
        start = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores, _ = model.score(test)
        predict_s = time.perf_counter() - start
        patches = args.train * np.prod(model.grid())
        rows.append(
            {
                "texture": texture,
                "train_images": args.train,
                "patches": int(patches),
                "coreset_rows": int(model.memory_bank.shape[0]),
                "fit_images_per_s": round(args.train / fit_s, 2),
                "embed_images_per_s": round(args.train / model.timings["embed_s"], 2),
                "coreset_s": round(model.timings["coreset_s"], 3),
                "coreset_us_per_step": round(1e6 * model.timings["coreset_s"] / model.memory_bank.shape[0], 1),
                "predict_images_per_s": round(args.test / predict_s, 2),
                "image_auroc": round(image_auroc(labels, scores), 4),
                "memory_bank_MiB": round(model.memory_bank.nelement() * 4 / 2**20, 2),
            }
        )
        print(json.dumps(rows[-1]))

    # coreset selection alone on a bank the size of 1,000 training images would be too slow to time here;
    # time 2,000 steps on a 100-image-sized bank, single- vs multi-threaded loop
    bank = torch.randn(100 * 28 * 28, 128, generator=torch.Generator().manual_seed(0))
    for threads in sorted({1, args.threads}):
        start = time.perf_counter()
        greedy_coreset(bank, 2000, projection_dim=64, threads=threads)
        seconds = time.perf_counter() - start
        timing = {"seconds": round(seconds, 2), "us_per_step": round(1e6 * seconds / 2000, 1)}
        print(json.dumps({"coreset_bank_rows": bank.shape[0], "steps": 2000, "loop_threads": threads, **timing}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = [round(v, 2) for v in os.getloadavg()]  # other processes on the shared cores skew every number above
    summary = {"threads": args.threads, "nn_backend": args.nn_backend, "image_size": args.image_size}
    print(json.dumps({**summary, "peak_rss_MiB": round(peak, 1), "load_start": load_start, "load_end": load}))


if __name__ == "__main__":
    main()
