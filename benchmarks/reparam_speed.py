"""RepConv re-parameterisation speed-up: ``repconvnet_s`` multi-branch vs fused, batch 1, CPU, in one process.

Threads pinned, warm-up, interleaved A/B repetitions, median and spread.
Run: `.venv/bin/python benchmarks/reparam_speed.py [--threads 1] [--size 224] [--rounds 15]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from potpourri import create_model, reparameterize


def _time_once(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unfused = create_model("repconvnet_s").eval()
    fused = reparameterize(unfused)
    x = torch.randn(1, 3, args.size, args.size)
    timings: dict[str, list[float]] = {"multi-branch": [], "fused": []}
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-4)
        for model in (unfused, fused):  # warm-up
            _time_once(model, x, 3)
        for _ in range(args.rounds):  # interleaved so drift hits both alike
            timings["multi-branch"].append(_time_once(unfused, x, args.iters))
            timings["fused"].append(_time_once(fused, x, args.iters))
    for name, values in timings.items():
        q = statistics.quantiles(values, n=4)
        print(f"{name:>12}: median {statistics.median(values) * 1e3:7.2f} ms  (IQR {q[0] * 1e3:.2f}–{q[2] * 1e3:.2f})")
    ratio = statistics.median(timings["multi-branch"]) / statistics.median(timings["fused"])
    print(f"speed-up fused / multi-branch at batch 1, {args.size}px, {args.threads} thread(s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
