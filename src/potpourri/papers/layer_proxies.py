"""``potpourri reproduce layer-proxies``: how well do cheap proxies predict which single block is best to tune?

The oracle is the **finetuning profile**: test accuracy of SubTuning each single block (+ head), averaged over
seeds, on the pretrained EfficientNet-Lite0 and DS-Synth defect-type classification. Each proxy of
``layer_select`` (and two free baselines: depth and block size) ranks the same blocks from a few passes; the
greedy search's first round ranks them by k-fold CV accuracy on the training images alone. We report Spearman and
Kendall correlation with the oracle, top-1 / top-3 agreement, the oracle accuracy of each method's pick, and the
wall-clock cost of each.

Every SubTuning run starts from the same linear probe's head (LP-then-FT; a fresh head at a block's learning rate
stays near chance in a few epochs) and trains on **cached frozen-prefix activations**: with BN in eval mode the
input of block k never changes, so it is computed once and only the suffix from block k runs in training. This
gives the same updates as training the whole model (checked in the tests) at a fraction of the cost.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.models.blocks import block_map, entry_of
from potpourri.papers.registry import compute_options
from potpourri.report.tables import markdown_table
from potpourri.tune.features import SuffixModel, cached_inputs
from potpourri.tune.multitask import BlockProgram
from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, evaluate, train

__all__ = ["ProxyStudyConfig", "agreement", "proxy_study", "run", "tune_single_block"]


@dataclass
class ProxyStudyConfig:
    """Data, recipe and methods; docs/results.md records how long the defaults took."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    version: str = "2"  # DS-Synth version; "1" at severity 0.8 and 96 px is the earlier study
    train_per_class: int = 8  # images per defect class and category
    test_per_class: int = 15
    severity: float = 0.75
    image_size: int = 128
    epochs: int = 8
    lr: float = 1e-3  # 4 epochs at 3e-4 left every block within test noise of the linear probe (a flat profile)
    batch_size: int = 16
    probe_epochs: int = 30
    probe_lr: float = 1e-2
    seeds: tuple[int, ...] = (0, 1)
    candidates: tuple[str, ...] | None = None  # None: every block-map entry but the head
    folds: int = 2  # the greedy search's CV (first round = single blocks)
    proxy_batches: int = 4
    proxy_batch_size: int = 16
    proxies: tuple[str, ...] = ("grad_ratio", "fisher", "feature_change")


# ---------------------------------------------------------------------------------------------------------------
# training on cached frozen-prefix activations


def tune_single_block(
    base: nn.Module,
    program: BlockProgram,
    block: str | None,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TuneConfig,
    *,
    head_state: dict[str, torch.Tensor] | None = None,
) -> SuffixModel:
    """SubTune ``block`` + head (``None``: the head alone) of a copy of ``base`` on cached inputs of its cut."""
    model = copy.deepcopy(base)
    bmap = program.block_map
    if head_state is not None:
        model.get_submodule(bmap["head"][0]).load_state_dict(head_state)
    plan = get_strategy("subtuning", blocks=[block] if block else []).prepare(model, lr=cfg.lr)
    suffix = SuffixModel(model, program, program.branch_point([block] if block else ["head"]))
    train(suffix, TensorDataset(inputs, labels), None, plan, cfg)
    return suffix


# ---------------------------------------------------------------------------------------------------------------
# agreement between a scoring and the oracle profile


def agreement(scores: dict[str, float], oracle: dict[str, float]) -> dict[str, Any]:
    """Spearman, Kendall, top-1 hit, top-3 overlap and the oracle accuracy of ``scores``' top pick (and regret)."""
    from potpourri.tune.layer_select import rank_correlation

    blocks = list(oracle)
    # ties keep block order, as greedy_select does
    rank = sorted(blocks, key=lambda b: (-scores[b], blocks.index(b)))
    truth = sorted(blocks, key=lambda b: (-oracle[b], blocks.index(b)))
    with warnings.catch_warnings():  # a constant scoring (a flat profile) has no rank correlation: NaN, said once
        warnings.simplefilter("ignore")
        spearman = rank_correlation(scores, oracle)
        kendall = rank_correlation(scores, oracle, method="kendall")
    return {
        "spearman": spearman,
        "kendall": kendall,
        "top1_hit": rank[0] == truth[0],
        "top3_overlap": len(set(rank[:3]) & set(truth[:3])) / 3,
        "pick": rank[0],
        "pick_acc": oracle[rank[0]],
        "regret": oracle[truth[0]] - oracle[rank[0]],
    }


# ---------------------------------------------------------------------------------------------------------------
# the study


def _data(cfg: ProxyStudyConfig, split: str, per_class: int) -> TensorDataset:
    from potpourri.core.registry import get_pretrained_cfg
    from potpourri.data.synth import make_samples
    from potpourri.data.transforms import normalized_dataset

    pcfg = get_pretrained_cfg("efficientnet_lite0")
    samples = [
        s
        for cat in cfg.categories
        for s in make_samples(
            cat, split, per_class * 7, seed=0, size=cfg.image_size, severity=cfg.severity, version=cfg.version
        )
    ]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return normalized_dataset(np.stack([s.image for s in samples]), labels, pcfg.mean, pcfg.std)


def _folds(labels: torch.Tensor, folds: int, seed: int = 42) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(labels.numpy(), labels.numpy()))


def proxy_study(
    cfg: ProxyStudyConfig | None = None, *, out: str | os.PathLike | None = None, options: TrainOptions | None = None
) -> Run:
    """Profile, proxies and greedy round 1 on Lite0 + DS-Synth; writes results.md, summary.json, profile.png.

    Example:
        run = proxy_study(ProxyStudyConfig(seeds=(0,))); print((run.path / "results.md").read_text())
    """
    from potpourri.core.registry import create_model
    from potpourri.tune.layer_select import proxy_scores

    cfg = cfg or ProxyStudyConfig()
    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-layer-proxies", out, config=asdict(cfg), seed=cfg.seeds[0])
    train_set, test_set = _data(cfg, "train", cfg.train_per_class), _data(cfg, "test", cfg.test_per_class)
    num_classes = int(train_set.tensors[1].max()) + 1
    seed_everything(0)
    base = create_model("efficientnet_lite0", pretrained=True, num_classes=num_classes).eval()
    bmap = block_map(base)
    candidates = list(cfg.candidates or [e for e in bmap if e != "head"])
    program = BlockProgram(base, bmap)
    starts = {b: program.branch_point([b]) for b in [*candidates, "head"]}
    sizes = dict.fromkeys(bmap, 0)
    for name, param in base.named_parameters():
        sizes[entry_of(name, bmap)] += param.numel()

    tick = time.perf_counter()
    cut_points = sorted(set(starts.values()))
    train_inputs = cached_inputs(base, program, train_set.tensors[0], cut_points, device=device)
    test_inputs = cached_inputs(base, program, test_set.tensors[0], cut_points, device=device)
    base.cpu()  # fitted copies move to the device in the loop; the proxies below run where their inputs are (CPU)
    cache_s = time.perf_counter() - tick
    y_train, y_test = train_set.tensors[1], test_set.tensors[1]

    def recipe(seed: int, epochs: int, lr: float) -> TuneConfig:
        return TuneConfig(
            epochs=epochs, lr=lr, batch_size=cfg.batch_size, seed=seed, progress=False,
            **compute_options(TuneConfig, options),
        )  # fmt: skip

    def probe_head(seed: int, index: np.ndarray | None = None) -> tuple[dict[str, torch.Tensor], SuffixModel]:
        seed_everything(seed)  # the head's initialisation
        start = starts["head"]
        inputs, labels = train_inputs[start], y_train
        if index is not None:
            inputs, labels = inputs[index], labels[index]
        fresh = copy.deepcopy(base)
        fresh.reset_classifier(num_classes)
        probe = tune_single_block(fresh, program, None, inputs, labels, recipe(seed, cfg.probe_epochs, cfg.probe_lr))
        return copy.deepcopy(probe.model.get_submodule(bmap["head"][0]).state_dict()), probe

    # 1. the oracle: the finetuning profile on the test images, per seed
    profile: dict[int, dict[str, float]] = {}
    probe_acc: dict[int, float] = {}
    tick = time.perf_counter()
    for seed in tqdm(cfg.seeds, desc="finetuning profile (seeds)", unit="seed"):
        head, probe = probe_head(seed)
        probe_acc[seed] = evaluate(probe, TensorDataset(test_inputs[starts["head"]], y_test), device=device)["acc"]
        profile[seed] = {}
        for block in tqdm(candidates, desc=f"seed {seed}", unit="block", leave=False):
            start = starts[block]
            tuned = tune_single_block(
                base, program, block, train_inputs[start], y_train, recipe(seed, cfg.epochs, cfg.lr), head_state=head
            )
            profile[seed][block] = evaluate(tuned, TensorDataset(test_inputs[start], y_test), device=device)["acc"]
            run.log_metrics({"method": "profile", "seed": seed, "block": block, "score": profile[seed][block]})
    profile_s = time.perf_counter() - tick
    oracle = {b: statistics.fmean(profile[s][b] for s in cfg.seeds) for b in candidates}

    # 2. greedy round 1: k-fold CV accuracy of each single block on the training images only (seed 0)
    tick = time.perf_counter()
    greedy = dict.fromkeys(candidates, 0.0)
    for train_index, val_index in tqdm(_folds(y_train, cfg.folds), desc="greedy round 1 (folds)", unit="fold"):
        head, _ = probe_head(cfg.seeds[0], train_index)
        for block in tqdm(candidates, desc="blocks", unit="block", leave=False):
            start = starts[block]
            tuned = tune_single_block(
                base,
                program,
                block,
                train_inputs[start][train_index],
                y_train[train_index],
                recipe(cfg.seeds[0], cfg.epochs, cfg.lr),
                head_state=head,
            )
            val = TensorDataset(train_inputs[start][val_index], y_train[val_index])
            greedy[block] += evaluate(tuned, val, device=device)["acc"] / cfg.folds
    greedy_s = time.perf_counter() - tick

    # 3. the cheap proxies, on the model with the linear probe's head (seed 0), and two free baselines
    head, _ = probe_head(cfg.seeds[0])
    probed = copy.deepcopy(base)
    probed.get_submodule(bmap["head"][0]).load_state_dict(head)
    scorings: dict[str, dict[str, float]] = {}
    costs: dict[str, float] = {}
    for method in cfg.proxies:
        tick = time.perf_counter()
        scores = proxy_scores(
            probed, train_set, method=method, batches=cfg.proxy_batches, batch_size=cfg.proxy_batch_size, lr=cfg.lr
        )
        costs[method] = time.perf_counter() - tick
        scorings[method] = {b: scores[b] for b in candidates}
    scorings["depth (later is better)"] = {b: float(i) for i, b in enumerate(candidates)}
    scorings["block size (more params)"] = {b: float(sizes[b]) for b in candidates}
    costs["depth (later is better)"] = costs["block size (more params)"] = 0.0
    scorings[f"greedy round 1 ({cfg.folds}-fold CV)"] = greedy
    costs[f"greedy round 1 ({cfg.folds}-fold CV)"] = greedy_s

    rows = []
    for method, scores in scorings.items():
        row = {"method": method, **agreement(scores, oracle), "seconds": costs[method]}
        rows.append(row)
        for block, score in scores.items():
            run.log_metrics({"method": method, "seed": "", "block": block, "score": score})
    noise_ceiling = None
    if len(cfg.seeds) >= 2:  # how well one seed's profile predicts another's: the best any proxy can expect
        pairs = [(a, b) for i, a in enumerate(cfg.seeds) for b in cfg.seeds[i + 1 :]]
        noise_ceiling = {
            "spearman": statistics.fmean(agreement(profile[a], profile[b])["spearman"] for a, b in pairs),
            "kendall": statistics.fmean(agreement(profile[a], profile[b])["kendall"] for a, b in pairs),
        }
    seconds = time.perf_counter() - started
    markdown = _markdown(rows, oracle, profile, probe_acc, noise_ceiling, profile_s, cache_s, cfg, candidates)
    (run.path / "results.md").write_text(markdown + "\n")
    _plot(run.path / "profile.png", oracle, profile, probe_acc, scorings, cfg)
    run.write_summary(
        {
            "oracle": oracle,
            "profile_per_seed": profile,
            "linear_probe_acc": probe_acc,
            "methods": rows,
            "scores": scorings,
            "noise_ceiling": noise_ceiling,
            "seconds": {"total": seconds, "profile": profile_s, "prefix_cache": cache_s, **costs},
            "candidates": candidates,
            "test_images": len(test_set),
            "train_images": len(train_set),
        }
    )
    _report(run, markdown)
    return run


def _markdown(
    rows: list[dict[str, Any]],
    oracle: dict[str, float],
    profile: dict[int, dict[str, float]],
    probe_acc: dict[int, float],
    noise_ceiling: dict[str, float] | None,
    profile_s: float,
    cache_s: float,
    cfg: ProxyStudyConfig,
    candidates: list[str],
) -> str:
    header = ["method", "Spearman", "Kendall", "top-1 hit", "top-3 overlap", "pick", "oracle acc of pick", "regret",
              "cost"]  # fmt: skip
    cells = [
        [r["method"], f"{r['spearman']:+.2f}", f"{r['kendall']:+.2f}", "yes" if r["top1_hit"] else "no",
         f"{r['top3_overlap']:.2f}", r["pick"], f"{r['pick_acc']:.3f}", f"{r['regret']:.3f}", f"{r['seconds']:.1f} s"]
        for r in rows
    ]  # fmt: skip
    lines = [markdown_table(header, cells)]
    best = max(oracle, key=oracle.get)
    lines += [
        "",
        f"Oracle: the finetuning profile (test accuracy of SubTuning one block + head, mean of seeds "
        f"{list(cfg.seeds)}) over {len(candidates)} blocks took {profile_s / 60:.1f} min (+ {cache_s:.0f} s prefix "
        f"caching); best block {best} ({oracle[best]:.3f}); linear probe "
        f"{statistics.fmean(probe_acc.values()):.3f}.",
    ]
    if noise_ceiling is not None:
        lines.append(
            f"Seed-to-seed agreement of the profile itself (noise ceiling): Spearman {noise_ceiling['spearman']:+.2f}, "
            f"Kendall {noise_ceiling['kendall']:+.2f}."
        )
    per_block = [
        [block, *(f"{profile[s][block]:.3f}" for s in cfg.seeds), f"{oracle[block]:.3f}"] for block in candidates
    ]
    lines += ["", markdown_table(["block", *(f"seed {s}" for s in cfg.seeds), "mean"], per_block)]
    return "\n".join(lines)


def _plot(
    path: os.PathLike,
    oracle: dict[str, float],
    profile: dict[int, dict[str, float]],
    probe_acc: dict[int, float],
    scorings: dict[str, dict[str, float]],
    cfg: ProxyStudyConfig,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(oracle)
    x = np.arange(len(blocks))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(blocks) + 2), 6.5), sharex=True, dpi=100)
    for seed, scores in profile.items():
        top.plot(x, [scores[b] for b in blocks], "o", alpha=0.4, label=f"seed {seed}")
    top.plot(x, [oracle[b] for b in blocks], "k-", lw=2, label="mean (oracle)")
    top.axhline(statistics.fmean(probe_acc.values()), color="gray", ls="--", label="linear probe")
    top.set_ylabel("test accuracy")
    top.set_title("finetuning profile: SubTune one block + head")
    top.legend(fontsize=8)
    for method, scores in scorings.items():
        values = np.array([scores[b] for b in blocks], dtype=float)
        ranks = values.argsort().argsort() / max(len(values) - 1, 1)  # 0 = ranked last, 1 = ranked first
        bottom.plot(x, ranks, marker=".", label=method)
    bottom.set_ylabel("rank (1 = top)")
    bottom.set_xticks(x, blocks, rotation=60, ha="right", fontsize=8)
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(run: Run, markdown: str) -> None:
    from potpourri.report.html import Report

    report = Report("potpourri reproduce layer-proxies")
    report.section("Cheap proxies vs the finetuning profile", "Which single block should be fine-tuned?")
    report.image(run.path / "profile.png", "finetuning profile (top) and each method's ranking (bottom)")
    report.code(markdown)
    report.write(run.path / "report.html")


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce layer-proxies``: the full study, or a seconds-long smoke run of the same code path."""
    cfg = ProxyStudyConfig()
    if quick:  # same code path, numbers not meaningful
        cfg = ProxyStudyConfig(
            categories=("brick",),
            train_per_class=2,
            test_per_class=1,
            image_size=32,
            epochs=1,
            probe_epochs=2,
            seeds=(0, 1),
            candidates=("blocks.5.3", "blocks.6.0", "neck"),
            proxy_batches=1,
            proxy_batch_size=4,
        )
    return proxy_study(cfg, out=out, options=options)
