"""Adaptation strategies behind one interface: given a model, freeze/wrap it and return param groups.

Every strategy works on a **block map**: the ordered list of "layers" a user can choose from (stem, each
block, neck, head), derived from the model's structure by ``block_map(model)`` and overridable by the user.

| strategy           | trains                                   | optimizer            |
|--------------------|------------------------------------------|----------------------|
| `linear`           | the head                                 | AdamW (overridable)  |
| `full-adamw`       | everything                               | AdamW                |
| `full-sgd`         | everything                               | SGD + momentum       |
| `sgd-freeze-embed` | everything but the first entry (stem)    | SGD (momentum opt.)  |
| `subtuning`        | the chosen blocks + head                 | AdamW (overridable)  |
| `siamese-subtuning`| the chosen blocks of one copy + a head on both copies' features (models/siamese.py) | AdamW |
| `layer-decay`      | everything, lr × decay^(depth from head) | AdamW (overridable)  |
| `lora`             | low-rank adapters on Linear / 1×1 conv + head | AdamW (overridable) |
| `visual-prompt`    | AutoVP input prompt + resize + label mapping (tune/visual_prompt.py) | AdamW (overridable) |

Example:
    plan = get_strategy("subtuning", blocks=["blocks.5.0"]).prepare(model, lr=1e-3)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import BlockMap, block_map, check_blocks, entry_of

__all__ = [
    "BN_POLICIES",
    "STRATEGIES",
    "BlockMap",
    "Plan",
    "Strategy",
    "apply_bn_policy",
    "block_map",
    "check_blocks",
    "get_strategy",
    "recalibrate_bn",
]

BN_POLICIES = ("eval", "train", "recalibrate")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


# ----------------------------------------------------------------------------------------------------------------
# block map


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm policy


def _trainable_modules(model: nn.Module) -> set[nn.Module]:
    return {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}


def apply_bn_policy(model: nn.Module, policy: str) -> None:
    """Call after ``model.train()``: frozen modules with parameters run in eval mode; BN per ``policy``.

    ``eval``/``recalibrate``: every BN uses its running stats while training. ``train``: BN layers whose affine
    parameters are trained use batch stats (and update running stats); frozen BN layers stay in eval mode.
    """
    if policy not in BN_POLICIES:
        raise PotpourriError(f"unknown BN policy '{policy}'; choose one of {', '.join(BN_POLICIES)}")
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()  # a wholly frozen part runs as at inference (dropout, drop-path off), as in SubTuning
    trainable = _trainable_modules(model)
    for module in model.modules():
        if isinstance(module, _BN_TYPES):
            module.train(policy == "train" and module in trainable)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Any, *, max_batches: int = 50) -> int:
    """Re-estimate running stats of trainable BN layers from ``batches`` of inputs; returns images used."""
    layers = [m for m in _trainable_modules(model) if isinstance(m, _BN_TYPES)]
    if not layers:
        return 0
    was_training = model.training
    model.eval()
    saved = {}
    for layer in layers:
        saved[layer] = layer.momentum
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches
        layer.train()
    seen = 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        images = batch[0] if isinstance(batch, list | tuple) else batch
        model(images.to(next(model.parameters()).device))
        seen += images.shape[0]
    for layer in layers:
        layer.momentum = saved[layer]
        layer.eval()
    model.train(was_training)
    return seen


# ----------------------------------------------------------------------------------------------------------------
# strategies


@dataclass
class Plan:
    """What a strategy did to a model: param groups for the optimizer and who trains."""

    strategy: str
    param_groups: list[dict[str, Any]]
    trainable_entries: list[str]
    trainable_names: list[str]
    num_trainable: int
    num_total: int
    optimizer: str
    momentum: float
    block_map: OrderedDict[str, list[str]] = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """The facts a run's summary records."""
        return {
            "strategy": self.strategy,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "trainable_entries": self.trainable_entries,
            "trainable_params": self.num_trainable,
            "total_params": self.num_total,
            "trainable_pct": round(100.0 * self.num_trainable / max(self.num_total, 1), 4),
        }


def frozen_by_design(model: nn.Module) -> set[str]:
    """Parameters inside modules marked ``keep_frozen = True`` (e.g. a frozen LM layer): no strategy trains them."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if getattr(module, "keep_frozen", False)
        for name, _ in module.named_parameters()
    }


class Strategy:
    """Freeze/wrap a model and return a ``Plan``; subclasses choose the trained entries and lr scales."""

    name = "base"
    optimizer = "adamw"
    fixed_optimizer = False  # full-adamw / full-sgd / sgd-freeze-embed name their optimizer

    def __init__(self, *, momentum: float = 0.9, block_map: dict[str, list[str]] | None = None) -> None:
        self.momentum = momentum
        self.block_map_override = block_map

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        raise NotImplementedError

    def lr_scale(self, entry: str, bmap: BlockMap) -> float:
        return 1.0

    def wrap(self, model: nn.Module, bmap: BlockMap) -> nn.Module:
        """Add modules (adapters) to ``model`` in place; most strategies add none."""
        return model

    def extra_trainable(self, name: str) -> bool:
        """Parameters trained whatever entry they sit in (LoRA factors)."""
        return False

    def prepare(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0, optimizer: str | None = None) -> Plan:
        """Freeze ``model`` in place and return its param groups (one per trained block-map entry)."""
        bmap = block_map(model, self.block_map_override)
        entries = self.trained_entries(bmap)
        check_blocks(entries, bmap)
        self.wrap(model, bmap)
        chosen = self._resolve_optimizer(optimizer)
        groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
        names = []
        pinned = frozen_by_design(model)
        for name, param in model.named_parameters():
            entry = entry_of(name, bmap) or "adapters"
            train = (entry in entries or self.extra_trainable(name)) and name not in pinned
            param.requires_grad_(train)
            if not train:
                continue
            names.append(name)
            scale = self.lr_scale(entry, bmap)
            no_decay = param.ndim <= 1 or entry == "tokens"  # biases, norms, cls/pos tokens: no weight decay
            key = f"{entry}|{int(no_decay)}"
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": key,
                }
            groups[key]["params"].append(param)
        num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if num_trainable == 0:
            raise PotpourriError(f"strategy '{self.name}' leaves no trainable parameter in this model")
        return Plan(
            strategy=self.name,
            param_groups=list(groups.values()),
            trainable_entries=[e for e in bmap if e in entries],
            trainable_names=names,
            num_trainable=num_trainable,
            num_total=sum(p.numel() for p in model.parameters()),
            optimizer=chosen,
            momentum=self.momentum,
            block_map=bmap,
        )

    def _resolve_optimizer(self, optimizer: str | None) -> str:
        if optimizer is None:
            return self.optimizer
        if optimizer not in ("adamw", "sgd"):
            raise PotpourriError(f"unknown optimizer '{optimizer}'; choose adamw or sgd")
        if self.fixed_optimizer and optimizer != self.optimizer:
            raise PotpourriError(
                f"strategy '{self.name}' uses {self.optimizer}, not '{optimizer}'; drop --optimizer or pick another"
            )
        return optimizer


class Linear(Strategy):
    """Linear probe: only the head trains."""

    name = "linear"

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        return ["head"] if "head" in bmap else [list(bmap)[-1]]


class FullAdamW(Strategy):
    """Full fine-tuning with AdamW."""

    name = "full-adamw"
    fixed_optimizer = True

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        return list(bmap)


class FullSGD(FullAdamW):
    """Full fine-tuning with SGD (+ momentum)."""

    name = "full-sgd"
    optimizer = "sgd"


class SGDFreezeEmbed(FullSGD):
    """SGD with the embedding (the first block-map entry: stem conv+BN / patch embedding) frozen (Kumar et al.)."""

    name = "sgd-freeze-embed"

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        return list(bmap)[1:]


class SubTuning(Strategy):
    """Fine-tune only the chosen blocks and the head (Kaplun et al.)."""

    name = "subtuning"

    def __init__(self, blocks: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocks = list(blocks or [])

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        head = ["head"] if "head" in bmap else [list(bmap)[-1]]
        check_blocks(self.blocks, bmap)
        return list(dict.fromkeys([*self.blocks, *head]))


class SiameseSubTuning(SubTuning):
    """SubTuning on a ``SiameseSubTuned`` model: the head reads the tuned and a frozen copy's features (low data)."""

    name = "siamese-subtuning"

    def prepare(self, model: nn.Module, **kwargs: Any) -> Plan:
        from potpourri.models.siamese import SiameseSubTuned

        if not isinstance(model, SiameseSubTuned):
            raise PotpourriError(
                "strategy 'siamese-subtuning' needs a SiameseSubTuned model; wrap yours with "
                "potpourri.models.siamese.SiameseSubTuned(model, num_classes) or run `potpourri tune --strategy "
                "siamese-subtuning`"
            )
        self.block_map_override = self.block_map_override or model.block_map()
        return super().prepare(model, **kwargs)


class LayerDecay(FullAdamW):
    """Everything trains; entry i of n gets lr × decay^(n-1-i), so the head keeps the full lr."""

    name = "layer-decay"
    fixed_optimizer = False

    def __init__(self, decay: float = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decay = decay

    def lr_scale(self, entry: str, bmap: BlockMap) -> float:
        order = list(bmap)
        return self.decay ** (len(order) - 1 - order.index(entry))


class LoRA(Strategy):
    """Low-rank adapters (peft) on every Linear and ungrouped 1×1 Conv2d between stem and head; head trains in full.

    Depthwise and k×k convs are left alone: timm's TF-"same" convs pad dynamically, which peft's conv LoRA does not.
    """

    name = "lora"

    def __init__(self, rank: int = 4, alpha: float = 8.0, targets: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank, self.alpha, self.targets = rank, alpha, targets

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        return ["head"] if "head" in bmap else [list(bmap)[-1]]

    def extra_trainable(self, name: str) -> bool:
        return ".lora_" in name

    def default_targets(self, model: nn.Module, bmap: BlockMap) -> list[str]:
        """Module names LoRA wraps: Linear and ungrouped 1×1 convs outside the stem and head."""
        skip = {"head", next(iter(bmap))}  # the embedding and the classifier are not adapted
        targets = []
        for name, module in model.named_modules():
            if entry_of(name, bmap) in skip | {None}:
                continue
            pointwise = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            if isinstance(module, nn.Linear) or pointwise:
                targets.append(name)
        return targets

    def wrap(self, model: nn.Module, bmap: BlockMap) -> nn.Module:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise PotpourriError("strategy 'lora' needs peft; run `pip install potpourri[lora]`") from exc
        targets = self.targets or self.default_targets(model, bmap)
        if not targets:
            raise PotpourriError("strategy 'lora' found no Linear or 1x1 Conv2d to adapt; pass targets=[...]")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0)
        inject_adapter_in_model(config, model)
        return model


class VisualPrompt(Strategy):
    """AutoVP: only the input prompt (+ resize scale) and the label mapping of a ``VisualPromptModel`` train."""

    name = "visual-prompt"

    def prepare(self, model: nn.Module, **kwargs: Any) -> Plan:
        from potpourri.models.visual_prompt import VisualPromptModel

        if not isinstance(model, VisualPromptModel):
            raise PotpourriError(
                "strategy 'visual-prompt' needs a VisualPromptModel around an ImageNet classifier; build one with "
                "potpourri.tune.visual_prompt.build_visual_prompt(...) or run `potpourri reproduce autovp`"
            )
        self.block_map_override = self.block_map_override or model.block_map()
        return super().prepare(model, **kwargs)

    def trained_entries(self, bmap: BlockMap) -> list[str]:
        return ["prompt", "mapping"]


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (Linear, FullAdamW, FullSGD, SGDFreezeEmbed, SubTuning, SiameseSubTuning, LayerDecay, LoRA, VisualPrompt)
}


def get_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name; unknown names raise one line listing the valid ones.

    Example:
        get_strategy("sgd-freeze-embed", momentum=0.0)
    """
    if name not in STRATEGIES:
        raise PotpourriError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)
