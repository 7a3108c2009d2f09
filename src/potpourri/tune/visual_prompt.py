"""AutoVP (Tsai et al., ICLR 2024): visual prompting of a frozen ImageNet classifier, with an automated search.

A task image (pixels in [0, 1]) is resized to ``canvas - 2 * width``, centred on a ``canvas`` × ``canvas`` black
canvas and zoomed by a trainable ``scale`` (AutoVP's ``Trainable_Resize``, here ``F.affine_grid`` + ``grid_sample``
instead of kornia); a learnable prompt ``sigmoid(delta)`` is added on the border outside the (zoomed) image only
(``InputPadding``). The frozen source model's 1000 ImageNet logits are mapped to the task's classes by

| mapping    | how                                                                                      | trains |
|------------|------------------------------------------------------------------------------------------|--------|
| `freq`     | greedy one-to-one source→target assignment from (source argmax, target label) counts      | no     |
| `iter`     | `freq`, recomputed with the current prompt every ``remap_every`` epochs                   | no     |
| `semantic` | most similar unused ImageNet class name per target name (MiniLM-L6, not CLIP: a deviation) | no     |
| `fully`    | a linear layer 1000 → K                                                                  | yes    |

and ``autovp_search`` picks (mapping, scale, width) by successive halving on a validation split (AutoVP uses Ray
Tune + ASHA). The modules are in ``models/visual_prompt``, the experiment in ``papers/autovp``. Only the prompt,
the scale and the mapping train (strategy ``visual-prompt``); the source model is bit-identical after training.

Example:
    model = build_visual_prompt(create_model("efficientnet_lite0", pretrained=True), 7, VPConfig("fully"))
    history = train_visual_prompt(model, train_set, val_set, epochs=3)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions, autocast, epoch_batches, resolve_device
from potpourri.models.visual_prompt import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAPPINGS,
    FullyMap,
    IndexMap,
    PaddingPrompt,
    VisualPromptModel,
    imagenet_class_names,
    semantic_mapping,
)

__all__ = [
    "HalvingResult",
    "VPConfig",
    "accuracy",
    "autovp_search",
    "build_visual_prompt",
    "search_space",
    "successive_halving",
    "train_visual_prompt",
]


# ----------------------------------------------------------------------------------------------------------------
# input transform: trainable resize + padding prompt


# ----------------------------------------------------------------------------------------------------------------
# output label mappings


# ----------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class VPConfig:
    """One point of AutoVP's search space (plus its fixed training knobs)."""

    mapping: str = "fully"
    scale: float = 1.0  # initial zoom of the resized image inside the canvas
    width: int = 16  # prompt width: the image is first resized to canvas - 2 * width
    learn_scale: bool = True
    num_map: int = 1  # source classes averaged per target (index mappings)
    remap_every: int = 1  # IterMap: epochs between frequency re-mappings

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise PotpourriError(f"unknown label mapping '{self.mapping}'; choose one of {', '.join(MAPPINGS)}")

    def label(self) -> str:
        return f"{self.mapping} s={self.scale:g} w={self.width}"


def build_visual_prompt(
    source: nn.Module,
    num_classes: int,
    cfg: VPConfig,
    *,
    canvas: int = 96,
    train_data: TensorDataset | None = None,
    class_names: Sequence[str] | None = None,
    text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
    prompt: bool = True,
) -> VisualPromptModel:
    """A ``VisualPromptModel`` around a frozen source classifier; index mappings are initialised here.

    ``freq``/``iter`` need ``train_data`` (pixels in [0, 1]); ``semantic`` needs ``class_names`` and a
    ``text_encoder`` (texts -> embeddings, e.g. MiniLM's ``encode``) for the source's ImageNet names too.
    """
    source.eval()
    num_source = _num_outputs(source, canvas)
    mean, std = source_normalisation(source)
    pad = PaddingPrompt(
        canvas, cfg.width, scale=cfg.scale, learn_scale=cfg.learn_scale, prompt=prompt, mean=mean, std=std
    )
    mapping: nn.Module = (
        FullyMap(num_source, num_classes) if cfg.mapping == "fully" else IndexMap(num_source, num_classes, cfg.num_map)
    )
    model = VisualPromptModel(pad, source, mapping).to(_device_of(source))  # the source may already sit on a GPU
    if cfg.mapping in ("freq", "iter"):
        if train_data is None:
            raise PotpourriError(f"label mapping '{cfg.mapping}' needs train_data to count source predictions")
        model.remap_frequency(_on(train_data, _device_of(source)))
    elif cfg.mapping == "semantic":
        if class_names is None or text_encoder is None:
            raise PotpourriError("label mapping 'semantic' needs class_names and a text_encoder (e.g. MiniLM encode)")
        names = imagenet_class_names()
        if len(names) != num_source:
            raise PotpourriError(f"semantic mapping knows ImageNet's 1000 names, the source has {num_source} outputs")
        mapping.set_index(semantic_mapping(text_encoder(names), text_encoder(list(class_names)), cfg.num_map))
    return model


def source_normalisation(source: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the source model was trained with (timm ``pretrained_cfg``; ImageNet's when it has none)."""
    cfg = getattr(source, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _num_outputs(source: nn.Module, canvas: int) -> int:
    if hasattr(source, "num_classes") and isinstance(source.num_classes, int) and source.num_classes > 0:
        return source.num_classes
    with torch.no_grad():
        return source(torch.zeros(1, 3, canvas, canvas, device=_device_of(source))).shape[-1]


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _on(data: TensorDataset, device: torch.device) -> TensorDataset:
    if all(t.device == device for t in data.tensors):
        return data
    return TensorDataset(*(t.to(device) for t in data.tensors))


# ----------------------------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: TensorDataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> float:
    """Top-1 accuracy of ``model`` on a TensorDataset, in eval mode, on ``device`` (default: where the model is)."""
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    was_training = model.training
    model.eval()
    images, labels = data.tensors[0], data.tensors[1]
    correct = 0
    for i in range(0, len(data), batch_size):
        with autocast(device, precision):
            logits = model(images[i : i + batch_size].to(device))
        correct += (logits.argmax(1) == labels[i : i + batch_size].to(device)).sum().item()
    model.train(was_training)
    return correct / max(len(data), 1)


@dataclass
class _Trial:
    """A model in training and where it stopped (successive halving resumes it)."""

    model: VisualPromptModel
    optimizer: torch.optim.Optimizer
    cfg: VPConfig
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _new_trial(model: VisualPromptModel, cfg: VPConfig, lr: float, weight_decay: float) -> _Trial:
    from potpourri.tune.strategies import get_strategy

    plan = get_strategy("visual-prompt").prepare(model, lr=lr, weight_decay=weight_decay)
    return _Trial(model, torch.optim.Adam(plan.param_groups, lr=lr), cfg)


def _train_until(
    trial: _Trial,
    train: TensorDataset,
    val: TensorDataset | None,
    epochs: int,
    *,
    batch_size: int,
    seed: int,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> float | None:
    """Train ``trial`` on from its last epoch up to ``epochs``; returns the validation accuracy (None: no val).

    One ``Trainer`` step per batch; with ``checkpoints`` and ``options.resume`` it continues from the last checkpoint.
    An epoch's row (mean loss, scale, validation accuracy at the last epoch) is written when the next step begins or
    the loop ends, so a checkpoint at an epoch boundary holds the epoch's loss sum and its row is written after resume.
    """
    from potpourri.tune.strategies import apply_bn_policy

    model = trial.model
    per_epoch = len(epoch_batches(len(train), batch_size, seed=seed, epoch=0, shuffle=True, drop_last=False))
    trainer = Trainer(
        model, trial.optimizer, total_steps=epochs * per_epoch, options=options or TrainOptions(progress=False),
        folder=checkpoints, desc=f"visual prompt {trial.cfg.label()}",
    )  # fmt: skip
    if not trainer.options.resume:
        trainer.step = trial.epochs_done * per_epoch  # successive halving trains a trial on from its last budget
        trainer.state = {"history": trial.history, "loss_sum": 0.0}
    state = trainer.state
    on_device = _on(train, trainer.device)
    images, labels = on_device.tensors[0], on_device.tensors[1]
    order: dict[int, list] = {}  # this epoch's batches (a function of seed and epoch only)

    def close_epochs() -> None:  # the rows of every finished epoch not yet recorded (weights are the epoch's end)
        while len(state["history"]) < trainer.step // per_epoch:
            epoch = len(state["history"])
            row = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / len(train)}
            row["scale"] = float(model.prompt.scale.detach())
            if val is not None and epoch + 1 == epochs:
                row["val_acc"] = accuracy(model, val, device=trainer.device, precision=trainer.options.precision)
            state["history"].append(row)

    for step in trainer.steps():
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            close_epochs()
            state["loss_sum"] = 0.0
            if trial.cfg.mapping == "iter" and epoch > 0 and epoch % trial.cfg.remap_every == 0:
                model.remap_frequency(on_device)
        model.train()
        apply_bn_policy(model, "eval")  # the frozen source runs as at inference
        if epoch not in order:
            order.clear()
            order[epoch] = epoch_batches(len(train), batch_size, seed=seed, epoch=epoch, shuffle=True, drop_last=False)
        batch = order[epoch][position]
        local, share = trainer.shard(batch)  # under torchrun: this process's slice of the batch
        index = torch.as_tensor(local, device=trainer.device)
        with trainer.autocast():
            loss = F.cross_entropy(model(images[index]).float(), labels[index]) * share  # (b, K) logits
        # before update: a checkpoint written there includes it (the global batch's mean under torchrun)
        state["loss_sum"] += trainer.mean_over_processes(loss.item()) * len(batch)
        trainer.update(loss)
    close_epochs()
    trainer.finish()
    trial.history = state["history"]
    trial.epochs_done = trainer.step // per_epoch
    return trial.history[-1].get("val_acc") if trial.history else None


def train_visual_prompt(
    model: VisualPromptModel,
    train: TensorDataset,
    val: TensorDataset | None = None,
    *,
    epochs: int = 5,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    cfg: VPConfig | None = None,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Train prompt (+ scale) and mapping with Adam; IterMap re-maps every ``cfg.remap_every`` epochs.

    ``options`` sets device, precision and resume (from ``checkpoints``, one checkpoint every
    ``options.checkpoint_every`` steps).
    """
    torch.manual_seed(seed)
    trial = _new_trial(model, cfg or VPConfig("fully"), lr, weight_decay)
    _train_until(trial, train, val, epochs, batch_size=batch_size, seed=seed, options=options, checkpoints=checkpoints)
    return trial.history


# ----------------------------------------------------------------------------------------------------------------
# search: successive halving


@dataclass
class HalvingResult:
    """Rungs of a successive-halving search: per rung the budget, every survivor's score and who was kept."""

    rungs: list[dict[str, Any]]
    best: int
    best_score: float


def successive_halving(
    num_configs: int, score: Callable[[int, int], float], *, min_budget: int = 1, eta: int = 3, max_rungs: int = 10
) -> HalvingResult:
    """Score all configs at ``min_budget``, keep the top ``n // eta`` (at least 1), multiply the budget by ``eta``.

    ``score(config_index, budget)`` trains config ``i`` up to ``budget`` (resuming) and returns a validation score;
    higher is better, ties go to the lower index. Stops when one config is left or after ``max_rungs``.
    """
    if num_configs < 1 or eta < 2:
        raise PotpourriError(f"successive halving needs >= 1 config and eta >= 2, got {num_configs} and {eta}")
    alive, budget, rungs = list(range(num_configs)), min_budget, []
    for _ in range(max_rungs):
        scores = {i: float(score(i, budget)) for i in alive}
        ranked = sorted(alive, key=lambda i: (-scores[i], i))
        kept = ranked[: max(1, len(alive) // eta)]
        rungs.append({"budget": budget, "scores": scores, "kept": kept})
        if len(alive) == 1:
            break
        alive, budget = kept, budget * eta
        if len(alive) == 1:  # the winner was decided; it already has this rung's score at the previous budget
            break
    best = rungs[-1]["kept"][0]
    return HalvingResult(rungs, best, rungs[-1]["scores"][best])


def search_space(
    mappings: Sequence[str] = MAPPINGS, scales: Sequence[float] = (0.75, 1.0, 1.25), widths: Sequence[int] = (8, 16)
) -> list[VPConfig]:
    """The grid AutoVP searches, here mapping × initial scale × prompt width."""
    return [VPConfig(mapping=m, scale=s, width=w) for m in mappings for s in scales for w in widths]


def autovp_search(
    source: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    configs: Sequence[VPConfig],
    *,
    num_classes: int,
    class_names: Sequence[str],
    text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
    canvas: int = 96,
    min_epochs: int = 1,
    eta: int = 3,
    lr: float = 1e-2,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    options: TrainOptions | None = None,
) -> tuple[HalvingResult, dict[int, _Trial]]:
    """Successive halving over ``configs`` (epochs as budget); every trial shares the one frozen ``source``.

    ``options`` sets the device and precision every trial trains and is validated on (no checkpoints, no resume).
    """
    options = replace(options or TrainOptions(), progress=False, resume=False)
    source.to(resolve_device(options.device))
    trials: dict[int, _Trial] = {}
    bar = tqdm(desc="autovp search", unit="trial-rung", disable=not progress)
    embedded: dict[tuple[str, ...], torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:  # the 1000 ImageNet names are embedded once, not per trial
        if tuple(texts) not in embedded:
            embedded[tuple(texts)] = text_encoder(texts)
        return embedded[tuple(texts)]

    def score(i: int, budget: int) -> float:
        if i not in trials:
            torch.manual_seed(seed)
            model = build_visual_prompt(
                source,
                num_classes,
                configs[i],
                canvas=canvas,
                train_data=train,
                class_names=class_names,
                text_encoder=encode if text_encoder is not None else None,
            )
            trials[i] = _new_trial(model, configs[i], lr, 0.0)
        started = time.perf_counter()
        acc = _train_until(trials[i], train, val, budget, batch_size=batch_size, seed=seed, options=options)
        trials[i].history[-1]["seconds"] = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(cfg=configs[i].label(), epochs=budget, val=f"{acc:.3f}")
        return acc if acc is not None else -math.inf

    result = successive_halving(len(configs), score, min_budget=min_epochs, eta=eta)
    bar.close()
    return result, trials


# ----------------------------------------------------------------------------------------------------------------
# reproduce autovp
