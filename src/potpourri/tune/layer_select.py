"""Which blocks to fine-tune: the SubTuning greedy search (k-fold CV) and cheap one-pass proxies.

Greedy (Kaplun et al., ``greedy_subset_selection.py`` with ``greedy_start=non``): start from the linear probe; each
round, SubTune the chosen set plus each remaining candidate, score it by k-fold cross-validated accuracy, keep
the best candidate; stop when the best gain is below ``epsilon`` or a budget (blocks, parameters, seconds) is hit.

Proxies rank every block from a few backward passes of the model with its new head:
``grad_ratio`` = ‖g‖/‖θ‖ per block (Auto-RGN, Lee et al. 2023) and ``fisher`` = mean g² per parameter;
``feature_change`` trains the whole model for a few AdamW steps and measures, per block, how much its output
changed for the same input (‖B'(h) − B(h)‖/‖B(h)‖ on one batch).

Example:
    selection = greedy_select(model, train_set, folds=5, max_blocks=3, epochs=10, lr=1e-3)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.core.training import epoch_batches, iter_batches
from potpourri.models.blocks import block_map, check_blocks, entry_of
from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, evaluate, labels_of, train

__all__ = [
    "PROXIES",
    "Selection",
    "SelectionRound",
    "cv_accuracy",
    "finetuning_profile",
    "greedy_select",
    "proxy_scores",
    "rank_correlation",
]

PROXIES = ("grad_ratio", "fisher", "feature_change")


@dataclass
class SelectionRound:
    """One greedy round: the set it started from and each candidate's CV accuracy."""

    base: list[str]
    scores: dict[str, float]


@dataclass
class Selection:
    """The chosen blocks, their CV accuracy against the linear probe's, and how the search went."""

    chosen: list[str]
    score: float
    linear_probe: float
    rounds: list[SelectionRound] = field(default_factory=list)
    stop_reason: str = ""
    trainings: int = 0
    seconds: float = 0.0


def _subset(data: Dataset, index: torch.Tensor) -> Dataset:
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index] for t in data.tensors))
    return Subset(data, index.tolist())


def _folds(labels: torch.Tensor, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise PotpourriError(f"folds={folds}; cross-validation needs at least 2")
    counts = torch.bincount(labels)
    if counts[counts > 0].min() < folds:
        raise PotpourriError(f"a class has {int(counts[counts > 0].min())} images, fewer than folds={folds}; lower it")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in splitter.split(labels.numpy(), labels.numpy())]


def cv_accuracy(
    model: nn.Module, data: Dataset, blocks: list[str], cfg: TuneConfig, *, folds: int = 5, seed: int = 42
) -> float:
    """Mean k-fold CV accuracy of SubTuning ``blocks`` + head (no blocks: the linear probe) on copies of ``model``."""
    labels = labels_of(data)
    if labels is None:
        raise PotpourriError("cross-validation needs labels: pass a TensorDataset or a data set with .targets")
    accs = []
    for train_index, val_index in _folds(labels, folds, seed):
        fold_model = copy.deepcopy(model)
        plan = get_strategy("subtuning", blocks=blocks).prepare(
            fold_model, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer
        )
        train(fold_model, _subset(data, train_index), None, plan, cfg)
        accs.append(evaluate(fold_model, _subset(data, val_index), batch_size=max(cfg.batch_size, 64))["acc"])
    return sum(accs) / len(accs)


def greedy_select(
    model: nn.Module,
    data: Dataset,
    *,
    candidates: list[str] | None = None,
    folds: int = 5,
    epsilon: float = 0.01,
    max_blocks: int = 3,
    max_params: int | None = None,
    time_budget_s: float | None = None,
    seed: int = 42,
    **config: Any,
) -> Selection:
    """Greedy SubTuning block selection by k-fold CV accuracy; ``config`` fills the TuneConfig of every training.

    Example:
        greedy_select(model, train_set, candidates=["blocks.4.0", "blocks.5.0"], epochs=5).chosen
    """
    cfg = TuneConfig(**{"progress": False, **config})
    bmap = block_map(model)
    candidates = list(candidates) if candidates is not None else [e for e in bmap if e != "head"]
    check_blocks(candidates, bmap)
    sizes = {e: 0 for e in bmap}
    for name, param in model.named_parameters():
        sizes[entry_of(name, bmap)] += param.numel()

    started = time.perf_counter()
    linear_probe = cv_accuracy(model, data, [], cfg, folds=folds, seed=seed)
    selection = Selection(chosen=[], score=linear_probe, linear_probe=linear_probe, trainings=folds)
    while True:
        if len(selection.chosen) >= max_blocks:
            selection.stop_reason = f"reached max_blocks={max_blocks}"
            break
        scores: dict[str, float] = {}
        for candidate in candidates:
            if candidate in selection.chosen:
                continue
            if max_params is not None and sum(sizes[b] for b in [*selection.chosen, candidate]) > max_params:
                continue
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                break
            scores[candidate] = cv_accuracy(model, data, [*selection.chosen, candidate], cfg, folds=folds, seed=seed)
            selection.trainings += folds
        if not scores:
            selection.stop_reason = "no candidate fits the parameter or time budget"
            break
        selection.rounds.append(SelectionRound(base=list(selection.chosen), scores=scores))
        best = max(scores, key=scores.get)  # ties go to the earlier block
        if scores[best] - selection.score < epsilon:
            selection.stop_reason = f"best gain {scores[best] - selection.score:+.4f} < epsilon={epsilon}"
            break
        selection.chosen.append(best)
        selection.score = scores[best]
    selection.seconds = time.perf_counter() - started
    return selection


def proxy_scores(
    model: nn.Module,
    data: Dataset,
    *,
    method: str = "grad_ratio",
    batches: int = 4,
    batch_size: int = 32,
    lr: float = 3e-4,
) -> dict[str, float]:
    """Score every block-map entry from ``batches`` backward passes (eval-mode model, weights untouched).

    ``feature_change`` takes ``batches`` AdamW steps at ``lr`` on a copy; the gradient proxies ignore ``lr``.
    Example:
        ranking = sorted(scores := proxy_scores(model, train_set), key=scores.get, reverse=True)
    """
    if method not in PROXIES:
        raise PotpourriError(f"unknown proxy '{method}'; choose one of {', '.join(PROXIES)}")
    if method == "feature_change":
        return _feature_change(model, data, steps=batches, batch_size=batch_size, lr=lr)
    probe = copy.deepcopy(model).eval()
    for param in probe.parameters():
        param.requires_grad_(True)
        param.grad = None
    order = epoch_batches(len(data), batch_size, seed=0, epoch=0, shuffle=True, drop_last=False)[:batches]
    for images, labels in iter_batches(data, order, 0):
        F.cross_entropy(probe(images), labels).backward()  # gradients accumulate over the batches
    bmap = block_map(probe)
    grad_sq = dict.fromkeys(bmap, 0.0)
    weight_sq = dict.fromkeys(bmap, 0.0)
    count = dict.fromkeys(bmap, 0)
    for name, param in probe.named_parameters():
        entry = entry_of(name, bmap)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        grad = grad / len(order)
        grad_sq[entry] += grad.pow(2).sum().item()
        weight_sq[entry] += param.detach().pow(2).sum().item()
        count[entry] += param.numel()
    if method == "fisher":
        return {e: grad_sq[e] / max(count[e], 1) for e in bmap}
    return {e: (grad_sq[e] ** 0.5) / max(weight_sq[e] ** 0.5, 1e-12) for e in bmap}


@torch.no_grad()
def _block_outputs(model: nn.Module, prefixes: list[str], images: torch.Tensor) -> dict[str, tuple[tuple, Any]]:
    """Input args and output of every module named in ``prefixes`` for one eval-mode forward pass."""
    seen: dict[str, tuple[tuple, Any]] = {}
    modules = dict(model.named_modules())

    def keep(prefix: str) -> Any:
        def hook(_module: nn.Module, args: tuple, output: Any) -> None:  # returns None: the output is unchanged
            seen.setdefault(prefix, (args, output))

        return hook

    hooks = [modules[p].register_forward_hook(keep(p)) for p in prefixes if p in modules]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _feature_change(model: nn.Module, data: Dataset, *, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    """Relative change of each block's output, same input, after ``steps`` AdamW steps of full fine-tuning."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: steps * batch_size]
    trained = copy.deepcopy(model)
    plan = get_strategy("full-adamw").prepare(trained, lr=lr)
    cfg = TuneConfig(epochs=1, batch_size=batch_size, lr=lr, progress=False, seed=0, shuffle=False)
    train(trained, _subset(data, order), None, plan, cfg)
    bmap = block_map(model)
    prefixes = [p for entry in bmap.values() for p in entry]
    images = next(iter_batches(data, [order[:batch_size].tolist()], 0))[0]
    before = _block_outputs(copy.deepcopy(model), prefixes, images)
    after_modules = dict(trained.eval().named_modules())
    params_before, params_after = dict(model.named_parameters()), dict(trained.named_parameters())
    scores = {}
    with torch.no_grad():
        for entry, entry_prefixes in bmap.items():
            change_sq, norm_sq = 0.0, 0.0
            for prefix in entry_prefixes:
                if prefix in before:  # a module: run the trained copy on the pretrained model's input
                    args, old = before[prefix]
                    new = after_modules[prefix](*args)
                elif prefix in params_before:  # a bare tensor (cls token, pos embed): its own change
                    old, new = params_before[prefix], params_after[prefix]
                else:
                    continue
                change_sq += (new - old).pow(2).sum().item()
                norm_sq += old.pow(2).sum().item()
            scores[entry] = (change_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    return scores


def finetuning_profile(
    model: nn.Module,
    data: Dataset,
    *,
    candidates: list[str] | None = None,
    folds: int = 5,
    seed: int = 42,
    **config: Any,
) -> dict[str, float]:
    """CV accuracy of SubTuning each single block (+ head): the paper's finetuning profile, also greedy round 1.

    Example:
        profile = finetuning_profile(model, train_set, folds=3, epochs=5)
    """
    cfg = TuneConfig(**{"progress": False, **config})
    bmap = block_map(model)
    candidates = list(candidates) if candidates is not None else [e for e in bmap if e != "head"]
    check_blocks(candidates, bmap)
    return {c: cv_accuracy(model, data, [c], cfg, folds=folds, seed=seed) for c in candidates}


def rank_correlation(scores: dict[str, float], reference: dict[str, float], *, method: str = "spearman") -> float:
    """Spearman (or Kendall tau-b) rank correlation of two block scorings over their shared blocks (ties averaged)."""
    from scipy.stats import kendalltau, spearmanr

    if method not in ("spearman", "kendall"):
        raise PotpourriError(f"unknown rank correlation '{method}'; choose spearman or kendall")
    shared = [k for k in reference if k in scores]
    if len(shared) < 2:
        raise PotpourriError(f"rank correlation needs 2 shared blocks, got {len(shared)}")
    correlate = spearmanr if method == "spearman" else kendalltau
    return float(correlate([scores[k] for k in shared], [reference[k] for k in shared]).statistic)
