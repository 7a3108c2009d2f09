"""Multi-task inference: one shared EfficientNet-Lite0 backbone + per-task tuned blocks vs N separate models.

Each task SubTunes one block + its own 7-class head (stand-in weights: the tuned entries are perturbed copies, so
timings and counts are those of real tuned models). Scenario ``late``: task i tunes the i-th of blocks 6.0, 5.3,
5.2, 5.1, 5.0 (different branch points, as a greedy search would pick); ``sweep``: 3 tasks all branching at the
same block k. MACs from ``registry.count_macs``; parameters and their bytes (with buffers); CPU latency at batch 1
from interleaved rounds (``deploy.latency.interleaved_timings``), median. Outputs are checked equal first.

    .venv/bin/python benchmarks/multitask.py --threads 1 --size 224 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
import torch.nn as nn

import potpourri
from potpourri.core.registry import count_macs
from potpourri.core.timing import interleaved_timings
from potpourri.models.blocks import block_map, entry_of
from potpourri.tune.multitask import MultiTaskModel

LATE_BLOCKS = ["blocks.6.0", "blocks.5.3", "blocks.5.2", "blocks.5.1", "blocks.5.0"]
SWEEP_BLOCKS = ["blocks.1.0", "blocks.3.0", "blocks.4.0", "blocks.5.0", "blocks.6.0", "neck", "head"]


def task_model(backbone: nn.Module, entries: list[str], seed: int) -> nn.Module:
    """A copy of ``backbone`` whose ``entries`` got new weights (what fine-tuning them would leave)."""
    model = copy.deepcopy(backbone)
    bmap = block_map(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if entry_of(name, bmap) in entries:
                param.add_(0.01 * torch.randn(param.shape, generator=gen))
    return model.eval()


def memory(modules: list[nn.Module]) -> tuple[int, int]:
    """Distinct parameters and bytes of parameters + buffers over ``modules`` (shared tensors counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[id(tensor)] = tensor
    params = {id(p) for m in modules for p in m.parameters()}
    return sum(seen[i].numel() for i in params), sum(t.numel() * t.element_size() for t in seen.values())


def compare(backbone: nn.Module, tasks: dict[str, list[str]], x: torch.Tensor, rounds: int) -> dict[str, float]:
    models = {name: task_model(backbone, entries, seed) for seed, (name, entries) in enumerate(tasks.items())}
    shared = MultiTaskModel(backbone, {name: (models[name], entries) for name, entries in tasks.items()})
    with torch.inference_mode():
        outputs = shared(x)
        for name, model in models.items():
            if not torch.equal(outputs[name], model(x)):
                raise SystemExit(f"task {name}: shared output differs from its own model")
    shape = tuple(x.shape)
    macs_shared = count_macs(shared, shape)
    macs_separate = sum(count_macs(m, shape) for m in models.values())
    params_shared, bytes_shared = memory([shared])
    params_separate, bytes_separate = memory(list(models.values()))

    def run_shared() -> None:
        with torch.inference_mode():
            shared(x)

    def run_separate() -> None:
        with torch.inference_mode():
            for model in models.values():
                model(x)

    timings = interleaved_timings({"shared": run_shared, "separate": run_separate}, rounds=rounds)
    return {
        "macs_shared": macs_shared / 1e9,
        "macs_separate": macs_separate / 1e9,
        "params_shared": params_shared / 1e6,
        "params_separate": params_separate / 1e6,
        "mb_shared": bytes_shared / 2**20,
        "mb_separate": bytes_separate / 2**20,
        "ms_shared": statistics.median(timings["shared"]) * 1e3,
        "ms_separate": statistics.median(timings["separate"]) * 1e3,
    }


def row(label: str, n: int, branch: str, r: dict[str, float]) -> str:
    return (
        f"| {label} | {n} | {branch} | {r['macs_shared']:.3f} / {r['macs_separate']:.3f} "
        f"({r['macs_separate'] / r['macs_shared']:.2f}x) | {r['params_shared']:.2f} / {r['params_separate']:.2f} M "
        f"({r['params_separate'] / r['params_shared']:.2f}x) | {r['mb_shared']:.1f} / {r['mb_separate']:.1f} MB | "
        f"{r['ms_shared']:.1f} / {r['ms_separate']:.1f} ms ({r['ms_separate'] / r['ms_shared']:.2f}x) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--sweep-tasks", type=int, default=3, help="tasks in the branch-point sweep (0: skip it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = potpourri.create_model("efficientnet_lite0", pretrained=True, num_classes=7).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()
    print(f"efficientnet_lite0, batch 1, {args.size} px, {args.threads} thread(s), {args.rounds} interleaved rounds")
    print(
        "| scenario | tasks | branch points | GMACs shared / separate | params shared / separate | "
        "params+buffers | latency shared / separate |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.tasks:
        tasks = {f"task{i}": [LATE_BLOCKS[i % len(LATE_BLOCKS)], "head"] for i in range(n)}
        result = compare(backbone, tasks, x, args.rounds)
        print(row("late blocks", n, ", ".join(LATE_BLOCKS[i % len(LATE_BLOCKS)] for i in range(n)), result), flush=True)
    for block in SWEEP_BLOCKS if args.sweep_tasks else []:
        tasks = {f"task{i}": list(dict.fromkeys([block, "head"])) for i in range(args.sweep_tasks)}
        print(row("same branch", args.sweep_tasks, block, compare(backbone, tasks, x, args.rounds)), flush=True)
    print(f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
