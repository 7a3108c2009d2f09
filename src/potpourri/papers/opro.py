"""``potpourri reproduce opro``: OPRO (Yang et al., ICLR 2024) with SmolLM2-135M vs random search at the same budget,
tuning a cached linear probe's lr, weight decay and epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from potpourri.core.training import TrainOptions, resolve_device
from potpourri.papers.registry import compute_options
from potpourri.tune.opro import LMProposer, Param, RandomProposer, SearchSpace, opro_search


@dataclass
class OproConfig:
    """``potpourri reproduce opro``: SmolLM2-135M vs random search tuning a cached linear probe (lr, wd, epochs)."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    n_per_class: int = 10
    image_size: int = 96
    val_fraction: float = 0.3
    budget: int = 26
    per_step: int = 8
    num_initial: int = 2
    max_pairs: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 32
    max_new_tokens: int = 40
    prefill: str = "<sol>lr="  # the LM's answer starts here: format only, every value is the LM's
    lm: str = "smollm2_135m"


def probe_space(max_epochs: int = 60) -> SearchSpace:
    """lr and weight decay of AdamW (log scale) and the number of epochs of a linear probe."""
    return SearchSpace(
        [
            Param("lr", 1e-5, 1.0, log=True, aliases=("learning rate", "learning_rate")),
            Param("wd", 1e-6, 1.0, log=True, aliases=("weight decay", "weight_decay")),
            Param("epochs", 1, max_epochs, integer=True, aliases=("epoch", "num_epochs")),
        ]
    )


def probe_objective(
    train: Any, val: Any, *, batch_size: int = 32, seed: int = 0, options: TrainOptions | None = None
) -> Callable[[dict], float]:
    """Validation accuracy of a linear head trained on cached features with the given lr / wd / epochs (on
    ``options``' device and precision)."""
    from collections import OrderedDict

    import torch.nn as nn

    from potpourri.tune.strategies import get_strategy
    from potpourri.tune.trainer import TuneConfig
    from potpourri.tune.trainer import train as train_loop

    dim, classes = train.tensors[0].shape[1], int(train.tensors[1].max()) + 1

    def build(solution: dict[str, float]) -> tuple[nn.Module, Any]:
        torch.manual_seed(seed)
        head = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))
        plan = get_strategy("linear").prepare(head, lr=solution["lr"], weight_decay=solution["wd"])
        cfg = TuneConfig(
            epochs=int(solution["epochs"]),
            batch_size=batch_size,
            lr=solution["lr"],
            weight_decay=solution["wd"],
            seed=seed,
            progress=False,
            **compute_options(TuneConfig, options),
        )
        return head, train_loop(head, train, val, plan, cfg)

    def objective(solution: dict[str, float]) -> float:
        return float(build(solution)[1].val_acc)

    objective.build = build  # the final pick is retrained and scored on test
    return objective


def reproduce_opro(cfg: OproConfig | None = None, *, out: str | None = None, options: TrainOptions | None = None):
    """OPRO with SmolLM2-135M-Instruct vs random search, same budget, over seeds; best-on-val scored on test.

    ``options``: the device and precision of feature extraction and probe training (the LM proposer stays on the CPU:
    ``LMProposer`` builds its token tensors there).
    """
    from potpourri.core.registry import create_model, get_pretrained_cfg
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.splits import stratified_split
    from potpourri.data.synth import make_task
    from potpourri.data.transforms import normalized_dataset
    from potpourri.tune.features import extract_features
    from potpourri.tune.trainer import evaluate

    cfg = cfg or OproConfig()
    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-opro", out, config=asdict(cfg), seed=cfg.seeds[0])
    seed_everything(0)
    task = make_task("classification", categories=cfg.categories, n_per_class=cfg.n_per_class, size=cfg.image_size)
    pcfg = get_pretrained_cfg("efficientnet_lite0")
    tr, va = stratified_split(task.train_labels, cfg.val_fraction, seed=0)
    backbone = create_model("efficientnet_lite0", pretrained=True).eval()
    head = backbone.get_classifier()

    def feats(images: np.ndarray, labels: np.ndarray):
        return extract_features(backbone, normalized_dataset(images, labels, pcfg.mean, pcfg.std), head, device=device)

    train, val = (
        feats(task.train_images[tr], task.train_labels[tr]),
        feats(task.train_images[va], task.train_labels[va]),
    )
    test = feats(task.test_images, task.test_labels)
    space = probe_space()
    objective = probe_objective(train, val, batch_size=cfg.batch_size, options=options)
    description = (
        f"Tune a linear classifier (AdamW, cosine schedule, batch {cfg.batch_size}) on frozen image features for "
        f"{len(task.class_names)} defect classes. The score is the validation accuracy in percent."
    )
    lm = create_model(cfg.lm, pretrained=True).eval()
    proposers = {
        "opro-smollm2": LMProposer(lm, max_new_tokens=cfg.max_new_tokens, prefill=cfg.prefill, name="smollm2"),
        "random": RandomProposer(space),
    }
    rows = []
    for seed in cfg.seeds:
        init_rng = np.random.default_rng(10_000 + seed)
        initial = [space.sample(init_rng) for _ in range(cfg.num_initial)]
        for arm, proposer in proposers.items():
            torch.manual_seed(seed)
            result = opro_search(
                objective,
                space,
                proposer,
                budget=cfg.budget,
                per_step=cfg.per_step,
                max_pairs=cfg.max_pairs,
                initial=initial,
                task=description,
                seed=seed,
                progress=True,
            )
            probe, _ = objective.build(result.best)
            test_acc = evaluate(probe, test, device=device)["acc"]
            row = {
                "arm": arm,
                "seed": seed,
                "best": space.format(result.best),
                "val_acc": result.best_score,
                "test_acc": test_acc,
                "proposals": result.proposals,
                "evaluations": result.evaluations,
                "invalid": result.invalid,
                "duplicates": result.duplicates,
                "propose_s": round(result.seconds["propose"], 1),
                "evaluate_s": round(result.seconds["evaluate"], 1),
                "best_after_10": result.best_so_far()[min(9, cfg.budget - 1)],
            }
            rows.append(row)
            run.log_metrics(row)
            with open(run.path / f"trace_{arm}_seed{seed}.txt", "w") as fh:
                for r in result.trace:
                    fh.write(f"step {r['step']} score {r['score']} dup {r['duplicate']}: {r['text']!r}\n")
    seconds = time.perf_counter() - started
    lines = [
        f"OPRO vs random search tuning a cached linear probe (lr, wd, epochs) on frozen EfficientNet-Lite0 features "
        f"of DS-Synth defect types ({', '.join(cfg.categories)}; {len(train)} train / {len(val)} val / {len(test)} "
        f"test images, {cfg.image_size}px). Budget {cfg.budget} proposals per run ({cfg.num_initial} shared random "
        f"initial points, {cfg.per_step} per step); invalid proposals count against it.",
        "",
        "| arm | seed | best (picked on val) | val acc | test acc | valid evals | invalid | dup | propose s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['arm']} | {r['seed']} | {r['best']} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
            f"{r['evaluations']} | {r['invalid']} | {r['duplicates']} | {r['propose_s']} |"
            for r in rows
        ),
        "",
        "| arm | mean val acc | mean test acc | mean invalid | mean best val after 10 proposals |",
        "|---|---|---|---|---|",
    ]
    for arm in proposers:
        sel = [r for r in rows if r["arm"] == arm]
        lines.append(
            f"| {arm} | {np.mean([r['val_acc'] for r in sel]):.3f} | {np.mean([r['test_acc'] for r in sel]):.3f} | "
            f"{np.mean([r['invalid'] for r in sel]):.1f} | {np.mean([r['best_after_10'] for r in sel]):.3f} |"
        )
    lines += ["", f"Runtime {seconds:.0f} s."]
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary({"rows": rows, "seconds": seconds})
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce opro`` (or its smoke run: a tiny budget, one seed) on ``options``' device/precision."""
    cfg = OproConfig()
    if quick:
        cfg = OproConfig(
            categories=("brick",), n_per_class=3, image_size=32, budget=6, per_step=2, seeds=(0,), max_new_tokens=12
        )
    return reproduce_opro(cfg, out=out, options=options)
