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
Tune + ASHA). Only the prompt, the scale and the mapping train (strategy ``visual-prompt``); the source model is
bit-identical after training.

Example:
    model = build_visual_prompt(create_model("efficientnet_lite0", pretrained=True), 7, VPConfig("fully"))
    history = train_visual_prompt(model, train_set, val_set, epochs=3)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from potpourri.errors import PotpourriError

__all__ = [
    "MAPPINGS",
    "AutoVPConfig",
    "FullyMap",
    "HalvingResult",
    "IndexMap",
    "PaddingPrompt",
    "VPConfig",
    "VisualPromptModel",
    "accuracy",
    "autovp_search",
    "build_visual_prompt",
    "cooccurrence",
    "frequency_mapping",
    "imagenet_class_names",
    "reproduce_autovp",
    "search_space",
    "semantic_mapping",
    "successive_halving",
    "train_visual_prompt",
]

MAPPINGS = ("freq", "iter", "semantic", "fully")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# input transform: trainable resize + padding prompt


class PaddingPrompt(nn.Module):
    """Resize to ``canvas - 2*width``, pad to ``canvas``, zoom by ``scale``, add ``sigmoid(delta)`` on the border."""

    def __init__(
        self,
        canvas: int,
        width: int,
        *,
        scale: float = 1.0,
        learn_scale: bool = True,
        prompt: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not 0 <= 2 * width < canvas:
            raise PotpourriError(
                f"prompt width {width} leaves no image in a {canvas}px canvas; use width < {canvas // 2}"
            )
        self.canvas_size, self.width, self.use_prompt = canvas, width, prompt
        self.image_size = canvas - 2 * width
        self.delta = nn.Parameter(torch.zeros(3, canvas, canvas))  # sigmoid(0) = 0.5: a grey border at the start
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def visible_side(self) -> int:
        """Side in pixels of the zoomed image inside the canvas (the prompt covers everything outside it)."""
        return min(self.canvas_size, max(1, round(self.image_size * float(self.scale.detach()))))

    def mask(self) -> torch.Tensor:
        """(1, C, C) 1 on the border the prompt may change, 0 on the image."""
        mask = torch.ones(1, self.canvas_size, self.canvas_size, device=self.delta.device)
        side = self.visible_side()
        lo = (self.canvas_size - side) // 2
        mask[:, lo : lo + side, lo : lo + side] = 0
        return mask

    def place(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, C, C): resized, centred on black, zoomed by ``scale``."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        lo = self.width
        x = F.pad(x, (lo, self.canvas_size - self.image_size - lo, lo, self.canvas_size - self.image_size - lo))
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / self.scale  # output (u, v) samples input (u/s, v/s): a zoom by s
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, C, C, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def canvas(self, images: torch.Tensor) -> torch.Tensor:
        """The prompted canvas in pixel space, before normalisation (B, 3, C, C)."""
        x = self.place(images)
        if self.use_prompt:
            x = x + torch.sigmoid(self.delta) * self.mask()
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> (B, 3, C, C), normalised
        return (self.canvas(images) - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------------------
# output label mappings


class IndexMap(nn.Module):
    """Target logit k = mean of the source logits ``index[k]`` (FreqMap, IterMap, SemanticMap); no parameters."""

    def __init__(self, num_source: int, num_target: int, num_map: int = 1) -> None:
        super().__init__()
        if num_target * num_map > num_source:
            raise PotpourriError(f"{num_target} classes × num_map {num_map} exceed the {num_source} source classes")
        self.num_source = num_source
        self.register_buffer("index", torch.arange(num_target * num_map).view(num_target, num_map))  # (K, m)

    def set_index(self, index: torch.Tensor) -> None:
        self.index.copy_(torch.as_tensor(index, dtype=torch.long).view_as(self.index))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, K)
        return logits[:, self.index].mean(-1)  # (B, K, m) -> (B, K)


class FullyMap(nn.Module):
    """FullyMap: a linear layer from the source logits to the task's classes."""

    def __init__(self, num_source: int, num_target: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_source, num_target)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, K)
        return self.fc(logits)


def cooccurrence(source_pred: torch.Tensor, labels: torch.Tensor, num_source: int, num_target: int) -> torch.Tensor:
    """(S, K) counts of (source argmax, target label) pairs."""
    flat = source_pred.long() * num_target + labels.long()
    return torch.bincount(flat, minlength=num_source * num_target).view(num_source, num_target)


def frequency_mapping(counts: torch.Tensor, num_map: int = 1) -> torch.Tensor:
    """(K, num_map) source indices: greedy over cells by count, each source used once (AutoVP's FreqMap).

    Targets left short (too few non-zero cells) take the lowest unused source indices, as AutoVP does.
    """
    num_source, num_target = counts.shape
    chosen: list[list[int]] = [[] for _ in range(num_target)]
    used = torch.zeros(num_source, dtype=torch.bool)
    flat = counts.flatten().double()
    order = torch.argsort(-flat, stable=True)  # ties: lower source index first
    for cell in order.tolist():
        if flat[cell] <= 0 or all(len(c) == num_map for c in chosen):
            break
        source, target = divmod(cell, num_target)
        if len(chosen[target]) < num_map and not used[source]:
            chosen[target].append(source)
            used[source] = True
    free = iter(torch.nonzero(~used).flatten().tolist())
    for target in range(num_target):
        while len(chosen[target]) < num_map:
            chosen[target].append(next(free))
    return torch.tensor(chosen, dtype=torch.long)


def semantic_mapping(source_emb: torch.Tensor, target_emb: torch.Tensor, num_map: int = 1) -> torch.Tensor:
    """(K, num_map): round robin over targets, each takes its most cosine-similar unused source class."""
    sim = F.normalize(target_emb.float(), dim=-1) @ F.normalize(source_emb.float(), dim=-1).T  # (K, S)
    order = torch.argsort(-sim, dim=1, stable=True)
    used = torch.zeros(source_emb.shape[0], dtype=torch.bool)
    chosen: list[list[int]] = [[] for _ in range(target_emb.shape[0])]
    for _ in range(num_map):
        for target in range(target_emb.shape[0]):
            source = next(s for s in order[target].tolist() if not used[s])
            chosen[target].append(source)
            used[source] = True
    return torch.tensor(chosen, dtype=torch.long)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in logit order ("tench, Tinca tinca", …), shipped with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


# ----------------------------------------------------------------------------------------------------------------
# the model


class VisualPromptModel(nn.Module):
    """prompt (input transform) -> frozen source classifier -> label mapping."""

    def __init__(self, prompt: PaddingPrompt, source: nn.Module, mapping: nn.Module) -> None:
        super().__init__()
        self.prompt, self.source, self.mapping = prompt, source, mapping
        self.source.requires_grad_(False)
        self.source.keep_frozen = True  # strategies never train it (see strategies.frozen_by_design)

    def block_map(self) -> dict[str, list[str]]:
        """The block map the ``visual-prompt`` strategy trains: prompt and mapping, never the source."""
        return {"prompt": ["prompt"], "source": ["source"], "mapping": ["mapping"]}

    def source_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.source(self.prompt(images))  # (B, 3, h, w) -> (B, S)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> (B, K)
        return self.mapping(self.source_logits(images))

    @torch.no_grad()
    def remap_frequency(self, data: TensorDataset, *, batch_size: int = 64) -> torch.Tensor:
        """FreqMap with the current prompt: set the mapping from the source argmax / label counts on ``data``."""
        if not isinstance(self.mapping, IndexMap):
            raise PotpourriError("frequency mapping needs an IndexMap; this model uses a FullyMap")
        was_training = self.training
        self.eval()
        images, labels = data.tensors[0], data.tensors[1]
        preds = torch.cat(
            [self.source_logits(images[i : i + batch_size]).argmax(1) for i in range(0, len(data), batch_size)]
        )
        self.train(was_training)
        index = frequency_mapping(
            cooccurrence(preds, labels, self.mapping.num_source, len(self.mapping.index)), self.mapping.index.shape[1]
        )
        self.mapping.set_index(index)
        return index


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
    model = VisualPromptModel(pad, source, mapping)
    if cfg.mapping in ("freq", "iter"):
        if train_data is None:
            raise PotpourriError(f"label mapping '{cfg.mapping}' needs train_data to count source predictions")
        model.remap_frequency(train_data)
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
        return source(torch.zeros(1, 3, canvas, canvas)).shape[-1]


# ----------------------------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, *, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on a TensorDataset, in eval mode."""
    was_training = model.training
    model.eval()
    images, labels = data.tensors[0], data.tensors[1]
    correct = sum(
        (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(data), batch_size)
    )
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
    trial: _Trial, train: TensorDataset, val: TensorDataset | None, epochs: int, *, batch_size: int, seed: int
) -> float | None:
    """Train ``trial`` on from its last epoch up to ``epochs``; returns the validation accuracy (None: no val)."""
    from potpourri.tune.strategies import apply_bn_policy
    from potpourri.tune.trainer import epoch_batches

    model = trial.model
    images, labels = train.tensors[0], train.tensors[1]
    for epoch in range(trial.epochs_done, epochs):
        if trial.cfg.mapping == "iter" and epoch > 0 and epoch % trial.cfg.remap_every == 0:
            model.remap_frequency(train)
        model.train()
        apply_bn_policy(model, "eval")  # the frozen source runs as at inference
        loss_sum = 0.0
        for batch in epoch_batches(len(train), batch_size, seed=seed, epoch=epoch, shuffle=True, drop_last=False):
            index = torch.as_tensor(batch)
            loss = F.cross_entropy(model(images[index]), labels[index])  # (B, K) logits
            trial.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trial.optimizer.step()
            loss_sum += loss.item() * len(batch)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(train), "scale": float(model.prompt.scale.detach())}
        trial.epochs_done = epoch + 1
        if val is not None and epoch + 1 == epochs:
            row["val_acc"] = accuracy(model, val)
        trial.history.append(row)
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
) -> list[dict[str, Any]]:
    """Train prompt (+ scale) and mapping with Adam; IterMap re-maps every ``cfg.remap_every`` epochs."""
    torch.manual_seed(seed)
    trial = _new_trial(model, cfg or VPConfig("fully"), lr, weight_decay)
    _train_until(trial, train, val, epochs, batch_size=batch_size, seed=seed)
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
) -> tuple[HalvingResult, dict[int, _Trial]]:
    """Successive halving over ``configs`` (epochs as budget); every trial shares the one frozen ``source``."""
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
        acc = _train_until(trials[i], train, val, budget, batch_size=batch_size, seed=seed)
        trials[i].history[-1]["seconds"] = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(cfg=configs[i].label(), epochs=budget, val=f"{acc:.3f}")
        return acc if acc is not None else -math.inf

    result = successive_halving(len(configs), score, min_budget=min_epochs, eta=eta)
    bar.close()
    return result, trials


# ----------------------------------------------------------------------------------------------------------------
# reproduce autovp


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


def _probe(source: nn.Module, train: TensorDataset, val: TensorDataset, test: TensorDataset, cfg: AutoVPConfig):
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

    head = source.get_classifier()
    feats = {
        k: extract_features(source, normalised(d), head) for k, d in (("train", train), ("val", val), ("test", test))
    }
    num_classes = int(train.tensors[1].max()) + 1
    best = None
    for lr in cfg.probe_lrs:
        torch.manual_seed(cfg.seed)
        probe = nn.Sequential(OrderedDict(head=nn.Linear(feats["train"].tensors[0].shape[1], num_classes)))
        plan = get_strategy("linear").prepare(probe, lr=lr)
        tcfg = TuneConfig(epochs=cfg.probe_epochs, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, progress=False)
        result = train_loop(probe, feats["train"], feats["val"], plan, tcfg)
        if best is None or result.val_acc > best[1]:
            best = (lr, result.val_acc, evaluate(probe, feats["test"])["acc"], evaluate(probe, feats["train"])["acc"])
    return {
        "lr": best[0],
        "val_acc": best[1],
        "test_acc": best[2],
        "train_acc": best[3],
        "trainable_params": (head.in_features + 1) * num_classes,
    }


def reproduce_autovp(cfg: AutoVPConfig | None = None, *, out: str | None = None):
    """Search (mapping, scale, width) by successive halving; compare with a zero prompt and a linear probe."""
    from potpourri.data.synth import make_task
    from potpourri.registry import create_model
    from potpourri.runs import new_run, seed_everything
    from potpourri.tune.reproduce import _split

    cfg = cfg or AutoVPConfig()
    started = time.perf_counter()
    run = new_run("reproduce-autovp", out, config=asdict(cfg), seed=cfg.seed)
    seed_everything(cfg.seed)
    task = make_task(
        "classification", categories=cfg.categories, n_per_class=cfg.n_per_class, seed=cfg.seed, size=cfg.image_size
    )
    train_idx, val_idx = _split(task.train_labels, cfg.val_fraction, seed=cfg.seed)
    train = _pixels(task.train_images[train_idx], task.train_labels[train_idx])
    val = _pixels(task.train_images[val_idx], task.train_labels[val_idx])
    test = _pixels(task.test_images, task.test_labels)
    k = len(task.class_names)
    source = create_model("efficientnet_lite0", pretrained=True).eval()
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
            "train_acc": accuracy(winner.model, train),
            "val_acc": result.best_score,
            "test_acc": accuracy(winner.model, test),
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
                "train_acc": accuracy(trials[i].model, train),
                "val_acc": val_acc,
                "test_acc": accuracy(trials[i].model, test),
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
            "train_acc": accuracy(zero, train),
            "val_acc": accuracy(zero, val),
            "test_acc": accuracy(zero, test),
            "trainable_params": 0,
        }
    )
    probe = _probe(source, train, val, test, cfg)
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


def run(quick: bool, out: str | None):
    """``potpourri reproduce autovp`` (or its seconds-long smoke run)."""
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
    return reproduce_autovp(cfg, out=out)
