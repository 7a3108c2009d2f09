"""``potpourri reproduce subtuning``: linear probe, full fine-tuning, greedy SubTuning (Kaplun et al.) and LoRA
against the training-set size.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.data.transforms import normalized_dataset
from potpourri.papers.registry import compute_options

SUBTUNING_ARMS: dict[str, tuple[str, float]] = {  # arm -> (strategy, lr)
    "linear": ("linear", 1e-2),
    "full-adamw": ("full-adamw", 5e-5),
    "subtuning (greedy)": ("subtuning", 3e-4),
    "lora": ("lora", 1e-3),
}


@dataclass
class SubTuningConfig:
    """Training-set sizes (images per class and category), arms, seeds; the defaults run in about 15 minutes."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    sizes: tuple[int, ...] = (2, 5, 15)
    test_per_class: int = 5
    image_size: int = 96
    epochs: int = 5
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    candidates: tuple[str, ...] = ("blocks.4.2", "blocks.5.0", "blocks.5.1", "blocks.5.2", "blocks.5.3", "blocks.6.0")
    max_blocks: int = 2
    select_epochs: int = 3


def reproduce_subtuning(
    cfg: SubTuningConfig | None = None, *, out: str | os.PathLike | None = None, options: TrainOptions | None = None
) -> Run:
    """Linear probe, full fine-tuning, greedy SubTuning and LoRA against the training-set size (Kaplun et al.).
    ``options``: the device and precision of every fit (the greedy selection runs with its defaults).

    The SubTuning blocks are chosen once per size by the greedy search (2-fold CV on that size's training set,
    seed 0) and reused for every seed. Example: ``reproduce_subtuning(SubTuningConfig(sizes=(5,)))``.
    """
    from potpourri.core.registry import create_model, get_pretrained_cfg
    from potpourri.data.synth import make_samples
    from potpourri.report.html import Report
    from potpourri.tune.layer_select import greedy_select
    from potpourri.tune.trainer import TuneConfig, evaluate, fit

    cfg = cfg or SubTuningConfig()
    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-subtuning", out, config=asdict(cfg), seed=cfg.seeds[0])
    pcfg = get_pretrained_cfg("efficientnet_lite0")
    mean, std = pcfg.mean, pcfg.std

    def split(name: str, per_class: int) -> TensorDataset:
        samples = [
            s for cat in cfg.categories for s in make_samples(cat, name, per_class * 7, seed=0, size=cfg.image_size)
        ]
        images = np.stack([s.image for s in samples])
        return normalized_dataset(images, np.array([s.label for s in samples], dtype=np.int64), mean, std)

    test = split("test", cfg.test_per_class)
    num_classes = int(test.tensors[1].max()) + 1
    results = []
    for size in tqdm(cfg.sizes, desc="training-set sizes", unit="size"):
        train = split("train", size)
        seed_everything(0)
        probe_model = create_model("efficientnet_lite0", pretrained=True, num_classes=num_classes)
        selection = greedy_select(
            probe_model,
            train,
            candidates=list(cfg.candidates),
            folds=2,
            max_blocks=cfg.max_blocks,
            epochs=cfg.select_epochs,
            batch_size=cfg.batch_size,
            lr=SUBTUNING_ARMS["subtuning (greedy)"][1],
            seed=0,
        )
        blocks = selection.chosen or [cfg.candidates[-1]]  # no gain over the probe: tune the last block
        for arm, (strategy, lr) in SUBTUNING_ARMS.items():
            for seed in cfg.seeds:
                seed_everything(seed)
                model = create_model("efficientnet_lite0", pretrained=True, num_classes=num_classes)
                extra = {"blocks": blocks} if strategy == "subtuning" else {}
                result = fit(
                    model,
                    train,
                    None,
                    strategy,
                    epochs=cfg.epochs,
                    lr=lr,
                    batch_size=cfg.batch_size,
                    seed=seed,
                    progress=False,
                    **extra,
                    **compute_options(TuneConfig, options),
                )
                row = {
                    "images_per_class": size * len(cfg.categories),
                    "arm": arm,
                    "seed": seed,
                    "lr": lr,
                    "blocks": "+".join(blocks) if strategy == "subtuning" else "",
                    "trainable_params": result.plan["trainable_params"],
                    "train_s": result.seconds,
                    "test_acc": evaluate(result.model, test, device=device)["acc"],
                }
                run.log_metrics(row)
                results.append(row)
    table = []
    for size in cfg.sizes:
        for arm in SUBTUNING_ARMS:
            rows = [r for r in results if r["arm"] == arm and r["images_per_class"] == size * len(cfg.categories)]
            accs = [r["test_acc"] for r in rows]
            table.append(
                {
                    "images_per_class": rows[0]["images_per_class"],
                    "arm": arm,
                    "blocks": rows[0]["blocks"],
                    "acc_mean": statistics.fmean(accs),
                    "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "trainable_params": rows[0]["trainable_params"],
                    "train_s_mean": statistics.fmean(r["train_s"] for r in rows),
                }
            )
    lines = [
        "| images/class | arm | blocks | test acc (mean ± std) | trainable params | train s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['images_per_class']} | {r['arm']} | {r['blocks'] or '–'} | {r['acc_mean']:.3f} ± "
        f"{r['acc_std']:.3f} | {r['trainable_params']:,} | {r['train_s_mean']:.1f} |"
        for r in table
    ]
    markdown = "\n".join(lines)
    (run.path / "results.md").write_text(markdown + "\n")
    seconds = time.perf_counter() - started
    run.write_summary({"table": table, "runs": results, "seconds": seconds})
    report = Report("potpourri reproduce subtuning")
    report.section(
        "Accuracy against training-set size",
        f"EfficientNet-Lite0 (ImageNet), DS-Synth defect types on "
        f"{', '.join(cfg.categories)} at {cfg.image_size} px, {len(test)} test images, {cfg.epochs} "
        f"epochs, seeds {list(cfg.seeds)}. Total {seconds:.0f} s.",
    )
    report.table(table)
    report.code(markdown)
    report.write(run.path / "report.html")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce subtuning``: accuracy against training-set size (or its smoke run)."""

    cfg = SubTuningConfig()
    if quick:
        cfg = SubTuningConfig(
            categories=("brick",),
            sizes=(2, 3),
            test_per_class=1,
            image_size=48,
            epochs=1,
            seeds=(0, 1),
            candidates=("blocks.5.3", "blocks.6.0"),
            max_blocks=1,
            select_epochs=1,
        )
    return reproduce_subtuning(cfg, out=out, options=options)
