"""Tuning strategies on the DS-Synth v2 classification benchmark (issue 20): linear probe, SubTuning and full
fine-tuning of the pretrained EfficientNet-Lite0 through ``potpourri.tune.fit``, one seed per call.

Run: ``.venv/bin/python benchmarks/ds_synth_v2_tuning.py [--size 128] [--severity 0.75] [--n 20] [--epochs 5]
[--arms linear subtuning full full-fast siamese] [--seed 0] [--augment]``. Prints one row per arm: validation accuracy
(the held-out test rows of brick, grass, gravel; 7 classes, chance 0.143), trainable parameters and seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

# arm -> (strategy, learning rate, extra fit arguments); the first three are the demo's arms
ARMS = {
    "linear": ("linear", 1e-2, {}),
    "subtuning": ("subtuning", 3e-4, {"blocks": ["blocks.5.3", "blocks.6.0"]}),
    "full": ("full-adamw", 5e-5, {}),
    "full-fast": ("full-adamw", 2e-4, {}),
    "siamese": ("siamese-subtuning", 3e-4, {"blocks": ["blocks.5.3", "blocks.6.0"]}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--severity", type=float, default=0.75)
    parser.add_argument("--n", type=int, default=20, help="images per class per surface")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS)[:4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--augment", action="store_true", help="random flips and quarter turns in training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from potpourri import create_model
    from potpourri.core.registry import get_pretrained_cfg
    from potpourri.data.synth import make_task
    from potpourri.data.transforms import normalized_dataset
    from potpourri.tune import fit

    task = make_task(
        "classification", n_per_class=args.n, size=args.size, severity=args.severity, seed=args.seed, version="2"
    )
    cfg = get_pretrained_cfg("efficientnet_lite0")
    train = normalized_dataset(task.train_images, task.train_labels, cfg.mean, cfg.std)
    val = normalized_dataset(task.test_images, task.test_labels, cfg.mean, cfg.std)
    print(f"DS-Synth v2, {args.size} px, severity {args.severity}, {args.n}/class/surface, {args.epochs} epochs, "
          f"seed {args.seed}, augment {args.augment}")  # fmt: skip
    print("| arm | lr | val accuracy | trainable params | s |")
    print("|---|---|---|---|---|")
    for arm in args.arms:
        strategy, lr, extra = ARMS[arm]
        torch.manual_seed(args.seed)
        model = create_model("efficientnet_lite0", pretrained=True, num_classes=len(task.class_names))
        if strategy == "siamese-subtuning":
            from potpourri.models.siamese import SiameseSubTuned

            model = SiameseSubTuned(model, len(task.class_names))
        start = time.perf_counter()
        result = fit(model, train, val, strategy, epochs=args.epochs, lr=lr, batch_size=16, seed=args.seed,
                     augment=args.augment, progress=False, **extra)  # fmt: skip
        seconds = time.perf_counter() - start
        print(f"| {arm} | {lr:g} | {result.val_acc:.3f} | {result.plan['trainable_params']} | {seconds:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
