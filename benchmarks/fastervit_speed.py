"""FasterViT-0 throughput, ours vs the official ``fastervit`` package, same weights, CPU, in one process.

Threads pinned, parity asserted first, warm-up, interleaved A/B rounds (each the mean of ``--iters`` calls),
median and spread of images/s and of the per-round ratio ours/theirs (> 1: ours is faster), by wall clock and
by thread CPU time (with one intra-op thread, CPU time is not inflated when other processes hold the cores).
Run: `.venv/bin/python benchmarks/fastervit_speed.py [--batch 1 8] [--threads 1] [--rounds 9] [--deploy]`
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn as nn


def _seconds_per_call(model: nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """Wall-clock and this thread's CPU seconds per call (CPU time ignores waiting for a busy host's cores)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - wall) / iters, (time.thread_time() - cpu) / iters


def _package_deploy(model: nn.Module, x: torch.Tensor) -> None:
    """The package's deploy switch lives on each position-embedding module and replays the biases of the last
    forward: without one first, its cached biases are the initial zeros (outputs silently change)."""
    with torch.inference_mode():
        model(x)
    for module in model.modules():
        if hasattr(module, "switch_to_deploy") and module is not model:
            module.switch_to_deploy()


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f}  [{min(values):.2f}–{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--deploy", action="store_true", help="cache position biases in both models first")
    args = parser.parse_args()

    import fastervit  # noqa: F401  (registers faster_vit_*_224 into timm)
    import timm

    from potpourri.models.fastervit import faster_vit_0

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    theirs = timm.create_model("faster_vit_0_224").eval()
    ours = faster_vit_0().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if args.deploy:
        ours.reparameterize()
        _package_deploy(theirs, torch.randn(1, 3, args.size, args.size))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"load avg {os.getloadavg()[0]:.2f}, {'deploy' if args.deploy else 'eval'} mode, {args.size}px"
    )
    with torch.inference_mode():
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            diff = (ours(x) - theirs(x)).abs().max().item()
            assert diff <= 1e-5, f"outputs differ by {diff}"
            for model in (ours, theirs):  # warm-up
                _seconds_per_call(model, x, 2)
            rates: dict[str, list[float]] = {"ours": [], "theirs": []}
            ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
            for r in range(args.rounds):  # interleaved, alternating who goes first, so drift hits both alike
                order = [("ours", ours), ("theirs", theirs)][:: 1 if r % 2 == 0 else -1]
                seconds = {name: _seconds_per_call(model, x, args.iters) for name, model in order}
                for name in rates:
                    rates[name].append(batch / seconds[name][0])
                ratios["wall"].append(seconds["theirs"][0] / seconds["ours"][0])
                ratios["cpu"].append(seconds["theirs"][1] / seconds["ours"][1])
            print(f"batch {batch}: max |Δ| {diff:.1e}")
            for name, values in rates.items():
                print(f"  {name:>6}: img/s (wall) {_spread(values)}")
            for clock, values in ratios.items():
                print(f"  ratio ours/theirs, throughput by {clock:>4} time: {_spread(values)}")
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
