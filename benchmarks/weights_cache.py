"""Loading pretrained EfficientNet-Lite0: first use (sha256 check + key mapping + safetensors write) vs cached.

Prints the median time of each over interleaved repetitions and their ratio, measured in one process.
Run: `.venv/bin/python benchmarks/weights_cache.py`
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from potpourri import create_model
from potpourri.core.weights import resolve_weights
from potpourri.models.efficientnet import LITE0_CFG


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    create_model("efficientnet_lite0")  # warm imports and timm's builder
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            resolve_weights(LITE0_CFG, cache_dir=cache)  # converts from the shipped .pth
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            resolve_weights(LITE0_CFG, cache_dir=cache)  # finds the cached safetensors
            warm.append(time.perf_counter() - start)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(f"resolve weights, first use (convert+cache): {cold_s * 1e3:8.1f} ms (median of {repeats})")
    print(f"resolve weights, cached:                    {warm_s * 1e3:8.1f} ms (median of {repeats})")
    print(f"ratio first-use / cached: {cold_s / warm_s:.1f}x")


if __name__ == "__main__":
    main()
