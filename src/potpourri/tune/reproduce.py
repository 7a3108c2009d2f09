"""``potpourri reproduce freeze-embed``: "How to fine-tune vision models with SGD" (Kumar et al.) at CPU scale.

Four arms on the pretrained EfficientNet-Lite0 and DS-Synth defect-type classification: SGD, AdamW, SGD with the
stem frozen ("freeze-embed"), and freeze-embed without momentum. Each arm picks its learning rate from a small
sweep on a validation split held out of the training images (seed 0), then trains with 3 seeds; ID accuracy is
measured on the disjoint test region, OOD accuracy on the same images under the corruption suite (severity 3,
averaged over corruptions). The table reports deltas against SGD, as the paper does.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.data.transforms import normalized_dataset
from potpourri.runs import Run, new_run, seed_everything

__all__ = [
    "ARMS",
    "SUBTUNING_ARMS",
    "FreezeEmbedConfig",
    "SubTuningConfig",
    "reproduce_freeze_embed",
    "reproduce_subtuning",
    "summarise",
]

# arm -> (strategy, strategy kwargs)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("full-sgd", {"momentum": 0.9}),
    "adamw": ("full-adamw", {}),
    "sgd-freeze-embed": ("sgd-freeze-embed", {"momentum": 0.9}),
    "sgd-freeze-embed-no-momentum": ("sgd-freeze-embed", {"momentum": 0.0}),
}


@dataclass
class FreezeEmbedConfig:
    """The experiment's settings; the defaults run in about 10-15 minutes on 2 CPU cores."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    n_per_class: int = 10
    image_size: int = 128
    epochs: int = 5
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "sgd": (3e-3, 1e-2),
            "adamw": (5e-5, 2e-4),
            "sgd-freeze-embed": (3e-3, 1e-2),
            "sgd-freeze-embed-no-momentum": (3e-2, 1e-1),  # without momentum the effective step is ~10x smaller
        }
    )
    corruptions: tuple[str, ...] | None = None  # None: all of potpourri.data.corruptions
    severity: int = 3
    val_fraction: float = 0.2


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = max(1, round(fraction * len(members)))
        val.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(train), np.sort(val)


def summarise(results: list[dict[str, Any]], reference: str = "sgd") -> list[dict[str, Any]]:
    """Mean ± std per arm over seeds, and the deltas of the means against ``reference``."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    stats = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        ids, oods = [r["id_acc"] for r in rows], [r["ood_acc"] for r in rows]
        stats[arm] = {
            "arm": arm,
            "lr": rows[0]["lr"],
            "seeds": len(rows),
            "id_mean": statistics.fmean(ids),
            "id_std": statistics.stdev(ids) if len(ids) > 1 else 0.0,
            "ood_mean": statistics.fmean(oods),
            "ood_std": statistics.stdev(oods) if len(oods) > 1 else 0.0,
        }
    base = stats.get(reference)
    for row in stats.values():
        row["id_delta"] = row["id_mean"] - base["id_mean"] if base else float("nan")
        row["ood_delta"] = row["ood_mean"] - base["ood_mean"] if base else float("nan")
    return list(stats.values())


def _markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | lr | ID acc (mean ± std) | Δ ID vs SGD | OOD acc (mean ± std) | Δ OOD vs SGD |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {r['id_mean']:.3f} ± {r['id_std']:.3f} | {r['id_delta']:+.3f} | "
            f"{r['ood_mean']:.3f} ± {r['ood_std']:.3f} | {r['ood_delta']:+.3f} |"
        )
    return "\n".join(lines)


def reproduce_freeze_embed(cfg: FreezeEmbedConfig | None = None, *, out: str | os.PathLike | None = None) -> Run:
    """Run the sweep and the seeded arms; writes metrics.csv (one row per run), summary.json, results.md, report.

    Example:
        run = reproduce_freeze_embed(); print((run.path / "results.md").read_text())
    """
    from potpourri.data.corruptions import CORRUPTIONS, corrupt
    from potpourri.data.synth import make_task
    from potpourri.registry import create_model, get_pretrained_cfg
    from potpourri.report.html import Report
    from potpourri.tune.trainer import evaluate, fit

    cfg = cfg or FreezeEmbedConfig()
    started = time.perf_counter()
    run = new_run("reproduce-freeze-embed", out, config=asdict(cfg), seed=cfg.seeds[0])
    task = make_task(
        "classification", categories=cfg.categories, n_per_class=cfg.n_per_class, seed=0, size=cfg.image_size
    )
    pcfg = get_pretrained_cfg("efficientnet_lite0")
    mean, std = pcfg.mean, pcfg.std
    train_idx, val_idx = _split(task.train_labels, cfg.val_fraction, seed=0)
    train = normalized_dataset(task.train_images[train_idx], task.train_labels[train_idx], mean, std)
    val = normalized_dataset(task.train_images[val_idx], task.train_labels[val_idx], mean, std)
    test = normalized_dataset(task.test_images, task.test_labels, mean, std)
    names = list(cfg.corruptions or CORRUPTIONS)
    ood = {
        name: normalized_dataset(
            np.stack([corrupt(img, name, cfg.severity, seed=i) for i, img in enumerate(task.test_images)]),
            task.test_labels,
            mean,
            std,
        )
        for name in tqdm(names, desc="corrupting the test set", unit="corruption", leave=False)
    }

    def train_arm(arm: str, lr: float, seed: int, data: TensorDataset) -> torch.nn.Module:
        strategy, kwargs = ARMS[arm]
        seed_everything(seed)
        model = create_model("efficientnet_lite0", pretrained=True, num_classes=len(task.class_names))
        return fit(
            model,
            data,
            None,
            strategy,
            strategy_kwargs=kwargs,
            epochs=cfg.epochs,
            lr=lr,
            batch_size=cfg.batch_size,
            seed=seed,
            progress=False,
        ).model

    chosen: dict[str, float] = {}
    for arm in tqdm(ARMS, desc="lr sweep", unit="arm"):
        scores = {lr: evaluate(train_arm(arm, lr, 0, train), val)["acc"] for lr in cfg.lrs[arm]}
        chosen[arm] = max(scores, key=lambda lr: (scores[lr], -lr))
        for lr, acc in scores.items():
            run.log_metrics(
                {"phase": "sweep", "arm": arm, "lr": lr, "seed": 0, "val_acc": acc, "id_acc": "", "ood_acc": ""}
            )
    full_train = torch.utils.data.ConcatDataset([train, val])
    results = []
    for arm in tqdm(ARMS, desc="seeded runs", unit="arm"):
        for seed in cfg.seeds:
            model = train_arm(arm, chosen[arm], seed, full_train)
            id_acc = evaluate(model, test)["acc"]
            ood_acc = statistics.fmean(evaluate(model, data)["acc"] for data in ood.values())
            row = {
                "phase": "final",
                "arm": arm,
                "lr": chosen[arm],
                "seed": seed,
                "val_acc": "",
                "id_acc": id_acc,
                "ood_acc": ood_acc,
            }
            run.log_metrics(row)
            results.append(row)
    table = summarise(results)
    markdown = _markdown(table)
    (run.path / "results.md").write_text(markdown + "\n")
    seconds = time.perf_counter() - started
    run.write_summary({"table": table, "runs": results, "chosen_lr": chosen, "corruptions": names, "seconds": seconds})
    report = Report("potpourri reproduce freeze-embed")
    report.section(
        "SGD vs AdamW vs SGD with a frozen embedding, ID and OOD",
        f"EfficientNet-Lite0 (ImageNet), DS-Synth classification on {', '.join(cfg.categories)} at "
        f"{cfg.image_size} px, {len(train) + len(val)} training images, {cfg.epochs} epochs, seeds {list(cfg.seeds)}. "
        f"OOD: the test images under {len(names)} corruptions at severity {cfg.severity}, accuracy averaged.",
    )
    report.table(table)
    report.code(markdown)
    report.text(
        f"Learning rates chosen on a held-out validation split (seed 0): {chosen}. Total {seconds:.0f} s.", note=True
    )
    report.write(run.path / "report.html")
    return run


# --- SubTuning: accuracy against the number of training images ------------------------------------------------

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


def reproduce_subtuning(cfg: SubTuningConfig | None = None, *, out: str | os.PathLike | None = None) -> Run:
    """Linear probe, full fine-tuning, greedy SubTuning and LoRA against the training-set size (Kaplun et al.).

    The SubTuning blocks are chosen once per size by the greedy search (2-fold CV on that size's training set,
    seed 0) and reused for every seed. Example: ``reproduce_subtuning(SubTuningConfig(sizes=(5,)))``.
    """
    from potpourri.data.synth import make_samples
    from potpourri.registry import create_model, get_pretrained_cfg
    from potpourri.report.html import Report
    from potpourri.tune.layer_select import greedy_select
    from potpourri.tune.trainer import evaluate, fit

    cfg = cfg or SubTuningConfig()
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
                )
                row = {
                    "images_per_class": size * len(cfg.categories),
                    "arm": arm,
                    "seed": seed,
                    "lr": lr,
                    "blocks": "+".join(blocks) if strategy == "subtuning" else "",
                    "trainable_params": result.plan["trainable_params"],
                    "train_s": result.seconds,
                    "test_acc": evaluate(result.model, test)["acc"],
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
