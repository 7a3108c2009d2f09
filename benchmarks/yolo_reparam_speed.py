"""YOLOv6-style detector re-parameterisation: multi-branch vs fused CPU latency and raw-output parity, one process.

Threads pinned, warm-up, interleaved rounds (``potpourri.deploy.latency.interleaved_timings``), median and quartiles.
``--run`` times a trained detector (``potpourri detect train`` folder) instead of a randomly initialised one.
Run: `.venv/bin/python benchmarks/yolo_reparam_speed.py [--models yolo_rep_n yolo_rep_s] [--size 256] [--threads 1]`
"""

from __future__ import annotations

import argparse
import statistics

import torch

from potpourri import create_model, reparameterize
from potpourri.core.timing import interleaved_timings
from potpourri.models import yolo  # noqa: F401  (registers the detectors)


def _call(model: torch.nn.Module, x: torch.Tensor):
    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["yolo_rep_n", "yolo_rep_s"])
    parser.add_argument("--run", help="a `potpourri detect train` folder: time its trained detector instead")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {}
    if args.run:
        from potpourri.detect.train import load_detector

        model, meta = load_detector(args.run)
        models[f"{meta['model']} (trained)"] = model
    else:
        models = {name: create_model(name, num_classes=6).eval() for name in args.models}
        for model in models.values():  # the output convs start at zero: give them weights so parity means something
            for conv in [*model.head.reg_preds, *model.head.cls_preds]:
                torch.nn.init.normal_(conv.weight, std=0.05)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    candidates = {}
    for name, model in models.items():
        fused = reparameterize(model)
        with torch.inference_mode():
            before, after = model(x), fused(x)
        diff = float((after - before).abs().max())
        params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in fused.parameters()))
        print(f"{name}: params {params[0] / 1e6:.2f} M -> {params[1] / 1e6:.2f} M, raw-output max |diff| {diff:.2e}")
        candidates[f"{name} multi-branch"] = _call(model, x)
        candidates[f"{name} fused"] = _call(fused, x)
    timings = interleaved_timings(candidates, warmup=2, rounds=args.rounds, min_time_s=0.2)
    for label, values in timings.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(f"{label:>32}: median {statistics.median(values) * 1e3:8.2f} ms  (IQR {q1 * 1e3:.2f}–{q3 * 1e3:.2f})")
    for name in models:
        ratio = statistics.median(timings[f"{name} multi-branch"]) / statistics.median(timings[f"{name} fused"])
        print(f"speed-up {name} fused vs multi-branch, batch {args.batch}, {args.size} px, {args.threads} thread(s): "
              f"{ratio:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
