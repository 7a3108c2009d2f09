"""``potpourri reproduce autovp``: AutoVP (Tsao et al., ICLR 2024) on frozen Lite0, successive-halving search over
prompts and label mappings vs linear probing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from potpourri.core.training import TrainOptions, resolve_device
from potpourri.models.visual_prompt import MAPPINGS
from potpourri.papers.registry import compute_options
from potpourri.tune.visual_prompt import (
    VPConfig,
    accuracy,
    autovp_search,
    build_visual_prompt,
    search_space,
    source_normalisation,
)


@dataclass
class AutoVPConfig:
    """``potpourri reproduce autovp``: DS-Synth defect types, AutoVP search vs linear probing at the same canvas."""

    categories: tuple[str, ...] = ("brick",)
    n_per_class: int = 40  # 30 train + 10 val per class; at 12 the 21-image validation set makes halving noise
    image_size: int = 64  # DS-Synth render size; the source sees a ``canvas`` px input either way
    canvas: int = 96
    val_fraction: float = 0.25
    mappings: tuple[str, ...] = MAPPINGS
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    widths: tuple[int, ...] = (8, 16)
    min_epochs: int = 1
    eta: int = 3
    lr: float = 0.1  # at 1e-2 every prompt arm underfits (train acc <= 0.43 after 9 epochs)
    batch_size: int = 16
    probe_lrs: tuple[float, ...] = (1e-3, 1e-2)
    probe_epochs: int = 30
    seed: int = 0


def _pixels(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1]
    return TensorDataset(x, torch.from_numpy(labels))


def _probe(
    source: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    test: TensorDataset,
    cfg: AutoVPConfig,
    options: TrainOptions,
):
    """Linear probe on the source's pooled features, image resized to the full canvas; lr picked on val."""
    from collections import OrderedDict

    from potpourri.tune.features import extract_features
    from potpourri.tune.strategies import get_strategy
    from potpourri.tune.trainer import TuneConfig, evaluate
    from potpourri.tune.trainer import train as train_loop

    def normalised(data: TensorDataset) -> TensorDataset:
        x = F.interpolate(data.tensors[0], size=(cfg.canvas, cfg.canvas), mode="bilinear", align_corners=False)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source_normalisation(source))
        return TensorDataset((x - mean) / std, data.tensors[1])

    device = resolve_device(options.device)
    head = source.get_classifier()
    feats = {
        k: extract_features(source, normalised(d), head, device=device)
        for k, d in (("train", train), ("val", val), ("test", test))
    }
    num_classes = int(train.tensors[1].max()) + 1
    best = None
    for lr in cfg.probe_lrs:
        torch.manual_seed(cfg.seed)
        probe = nn.Sequential(OrderedDict(head=nn.Linear(feats["train"].tensors[0].shape[1], num_classes)))
        plan = get_strategy("linear").prepare(probe, lr=lr)
        tcfg = TuneConfig(
            epochs=cfg.probe_epochs, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, progress=False,
            **compute_options(TuneConfig, options),
        )  # fmt: skip
        result = train_loop(probe, feats["train"], feats["val"], plan, tcfg)
        if best is None or result.val_acc > best[1]:
            test_acc = evaluate(probe, feats["test"], device=device)["acc"]
            best = (lr, result.val_acc, test_acc, evaluate(probe, feats["train"], device=device)["acc"])
    return {
        "lr": best[0],
        "val_acc": best[1],
        "test_acc": best[2],
        "train_acc": best[3],
        "trainable_params": (head.in_features + 1) * num_classes,
    }


def reproduce_autovp(cfg: AutoVPConfig | None = None, *, out: str | None = None, options: TrainOptions | None = None):
    """Search (mapping, scale, width) by successive halving; compare with a zero prompt and a linear probe.

    ``options`` sets the device and precision of every trial, the probe and the evaluations.
    """
    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.splits import stratified_split
    from potpourri.data.synth import make_task

    cfg = cfg or AutoVPConfig()
    options = options or TrainOptions(progress=False)
    device, precision = resolve_device(options.device), options.precision
    started = time.perf_counter()
    run = new_run("reproduce-autovp", out, config=asdict(cfg), seed=cfg.seed)
    seed_everything(cfg.seed)
    task = make_task(
        "classification", categories=cfg.categories, n_per_class=cfg.n_per_class, seed=cfg.seed, size=cfg.image_size
    )
    train_idx, val_idx = stratified_split(task.train_labels, cfg.val_fraction, seed=cfg.seed)
    train = _pixels(task.train_images[train_idx], task.train_labels[train_idx])
    val = _pixels(task.train_images[val_idx], task.train_labels[val_idx])
    test = _pixels(task.test_images, task.test_labels)
    k = len(task.class_names)
    source = create_model("efficientnet_lite0", pretrained=True).eval().to(device)
    before = {n: p.detach().clone() for n, p in source.state_dict().items()}
    text_encoder = None
    if "semantic" in cfg.mappings:
        minilm = create_model("minilm_l6", pretrained=True).eval()
        text_encoder = minilm.encode

    configs = search_space(cfg.mappings, cfg.scales, cfg.widths)
    result, trials = autovp_search(
        source,
        train,
        val,
        configs,
        num_classes=k,
        class_names=task.class_names,
        text_encoder=text_encoder,
        canvas=cfg.canvas,
        min_epochs=cfg.min_epochs,
        eta=cfg.eta,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        options=options,
    )
    for r, rung in enumerate(result.rungs):
        for i, s in rung["scores"].items():
            run.log_metrics(
                {
                    "rung": r,
                    "epochs": rung["budget"],
                    "config": configs[i].label(),
                    "val_acc": s,
                    "kept": i in rung["kept"],
                    "train_loss": trials[i].history[rung["budget"] - 1]["train_loss"],
                    "scale_at_end": float(trials[i].model.prompt.scale.detach()),
                }
            )
    winner = trials[result.best]
    rows = [
        {
            "method": f"AutoVP search winner ({configs[result.best].label()})",
            "epochs": winner.epochs_done,
            "train_acc": accuracy(winner.model, train, precision=precision),
            "val_acc": result.best_score,
            "test_acc": accuracy(winner.model, test, precision=precision),
            "trainable_params": sum(p.numel() for p in winner.model.parameters() if p.requires_grad),
        }
    ]
    per_mapping = {}
    for i, c in enumerate(configs):  # each mapping's best configuration at the last rung it reached
        r = max(j for j, rung in enumerate(result.rungs) if i in rung["scores"])
        key = (r, result.rungs[r]["scores"][i])
        if c.mapping not in per_mapping or key > per_mapping[c.mapping][0]:
            per_mapping[c.mapping] = (key, i)
    for mapping, ((r, val_acc), i) in per_mapping.items():
        if i == result.best:
            continue
        rows.append(
            {
                "method": f"best {mapping} ({configs[i].label()}), stopped at rung {r}",
                "epochs": trials[i].epochs_done,
                "train_acc": accuracy(trials[i].model, train, precision=precision),
                "val_acc": val_acc,
                "test_acc": accuracy(trials[i].model, test, precision=precision),
                "trainable_params": sum(p.numel() for p in trials[i].model.parameters() if p.requires_grad),
            }
        )
    best_cfg = configs[result.best]
    zero = build_visual_prompt(
        source,
        k,
        VPConfig("freq", scale=best_cfg.scale, width=best_cfg.width),
        canvas=cfg.canvas,
        train_data=train,
        prompt=False,
    )
    rows.append(
        {
            "method": "no prompt + FreqMap (no training)",
            "epochs": 0,
            "train_acc": accuracy(zero, train, precision=precision),
            "val_acc": accuracy(zero, val, precision=precision),
            "test_acc": accuracy(zero, test, precision=precision),
            "trainable_params": 0,
        }
    )
    probe = _probe(source, train, val, test, cfg, options)
    rows.append(
        {
            "method": f"linear probe, {cfg.canvas}px input (lr {probe['lr']:g})",
            "epochs": cfg.probe_epochs,
            "train_acc": probe["train_acc"],
            "val_acc": probe["val_acc"],
            "test_acc": probe["test_acc"],
            "trainable_params": probe["trainable_params"],
        }
    )
    identical = all(torch.equal(before[n], p) for n, p in source.state_dict().items())
    seconds = time.perf_counter() - started
    lines = [
        f"AutoVP on DS-Synth defect types ({', '.join(cfg.categories)}; {k} classes; {len(train)} train / "
        f"{len(val)} val / {len(test)} test images), frozen ImageNet EfficientNet-Lite0, {cfg.canvas}px canvas; "
        f"successive halving over {len(configs)} configs (eta {cfg.eta}, epochs {[r['budget'] for r in result.rungs]}, "
        f"survivors {[len(r['scores']) for r in result.rungs]}).",
        "",
        "| method | epochs | train acc | val acc | test acc | trainable params |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['method']} | {r['epochs']} | {r['train_acc']:.3f} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
            f"{r['trainable_params']:,} |"
            for r in rows
        ),
        "",
        f"Source model bit-identical after the search: {identical}. Runtime {seconds:.0f} s.",
    ]
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary(
        {
            "rows": rows,
            "best": asdict(best_cfg),
            "rungs": [
                {
                    "budget": r["budget"],
                    "scores": {configs[i].label(): s for i, s in r["scores"].items()},
                    "kept": [configs[i].label() for i in r["kept"]],
                }
                for r in result.rungs
            ],
            "source_bit_identical": identical,
            "seconds": seconds,
        }
    )
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce autovp`` (or its seconds-long smoke run) on ``options``' device and precision."""
    cfg = AutoVPConfig()
    if quick:
        cfg = AutoVPConfig(
            n_per_class=2,
            image_size=32,
            canvas=48,
            val_fraction=0.5,
            mappings=("freq", "fully"),
            scales=(1.0,),
            widths=(8,),
            probe_lrs=(1e-2,),
            probe_epochs=2,
        )
    return reproduce_autovp(cfg, out=out, options=options)
