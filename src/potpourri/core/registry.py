"""Explicit, timm-style model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``.

Our models are registered here by decorator, and also into timm's registry (where the name is free) so that
``timm.create_model`` finds them once ``potpourri`` is imported. Any timm model name works in ``create_model``
too, with a ``timm/`` prefix or as a fallback.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.weights import PretrainedCfg

__all__ = ["ModelEntry", "create_model", "list_models", "model_info", "register_model", "suggest"]


@dataclass
class ModelEntry:
    """One registered model: its builder and what it takes as input."""

    name: str
    fn: Callable[..., nn.Module]
    module: str
    pretrained_cfg: PretrainedCfg | None = None
    modality: str = "image"  # "image" (B, 3, H, W) or "text" (token ids)
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained_cfg is not None and self.pretrained_cfg.has_source


REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    name: str | None = None,
    pretrained_cfg: PretrainedCfg | None = None,
    modality: str = "image",
    tags: tuple[str, ...] = (),
    timm_visible: bool = True,
) -> Any:
    """Register a model builder ``fn(pretrained=False, **kw) -> nn.Module`` under ``name`` (default: its name).

    Example:
        @register_model(pretrained_cfg=PretrainedCfg(...))
        def my_net(pretrained: bool = False, **kwargs) -> nn.Module: ...
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or builder.__name__
        if model_name in REGISTRY and REGISTRY[model_name].fn is not builder:
            raise PotpourriError(f"model name '{model_name}' is already registered by {REGISTRY[model_name].module}")
        REGISTRY[model_name] = ModelEntry(
            name=model_name,
            fn=builder,
            module=builder.__module__,
            pretrained_cfg=pretrained_cfg,
            modality=modality,
            tags=tuple(tags),
        )
        if timm_visible and modality == "image":
            _register_with_timm(model_name, builder)
        return builder

    return wrap(fn) if fn is not None else wrap


def _register_with_timm(model_name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``timm.create_model(model_name)`` build our model, unless timm already owns the name."""
    from timm.models import _registry as timm_registry

    if model_name in timm_registry._model_entrypoints:
        return  # never shadow a timm model; ours stays reachable through potpourri.create_model

    def timm_entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return create_model(model_name, pretrained=pretrained, **kwargs)

    timm_entrypoint.__name__ = model_name
    timm_entrypoint.__module__ = builder.__module__
    module = sys.modules[builder.__module__]
    timm_registry._model_entrypoints[model_name] = timm_entrypoint
    short_module = builder.__module__.split(".")[-1]
    timm_registry._model_to_module[model_name] = short_module
    timm_registry._module_to_models[short_module].add(model_name)
    if not hasattr(module, "__all__"):
        module.__all__ = []


def suggest(name: str, choices: list[str]) -> str:
    """Return `` did you mean 'x'?`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def get_entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise PotpourriError(f"unknown model '{name}'{suggest(name, list(REGISTRY))} (see `potpourri list`)")
    return REGISTRY[name]


def list_models(pattern: str = "", *, pretrained: bool = False) -> list[str]:
    """Sorted names of our registered models matching an fnmatch ``pattern`` (``*`` wildcards)."""
    pattern = pattern or "*"
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    names = [n for n, e in REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (e.has_pretrained or not pretrained)]
    return sorted(names)


def model_info(name: str) -> dict[str, Any]:
    """Facts about a registered model: parameter count, input, weights source, license, paper."""
    entry = get_entry(name)
    model = entry.fn(pretrained=False)
    info: dict[str, Any] = {
        "name": name,
        "module": entry.module,
        "modality": entry.modality,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "pretrained": entry.has_pretrained,
        "tags": list(entry.tags),
    }
    if entry.pretrained_cfg is not None:
        info.update(entry.pretrained_cfg.describe())
    if entry.modality == "image":
        size = entry.pretrained_cfg.input_size[-1] if entry.pretrained_cfg else 224
        info["input"] = f"1x3x{size}x{size}"
        info["gmacs"] = round(count_macs(model, (1, 3, size, size)) / 1e9, 4)
    return info


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of fused attention from shapes: 2·B·H·Lq·Lk·D for Q·Kᵀ plus 2·B·H·Lq·Lk·Dv for softmax·V."""
    batch, heads, queries, depth = query
    keys, value_depth = key[-2], value[-1]
    return 2 * batch * heads * queries * keys * (depth + value_depth)


def flop_counter(*, fused_attention: bool = True) -> Any:
    """A silent ``torch.utils.flop_counter.FlopCounterMode``; ``fused_attention`` also counts CPU fused attention
    (SDPA, which timm's ViTs call), missing from torch's own table."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa_flops} if fused_attention else None)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval forward pass (``torch.utils.flop_counter`` FLOPs / 2).

    CPU fused attention is left out, as the pinned reference counts were made (``flop_counter()`` counts it).
    """
    import torch

    counter = flop_counter(fused_attention=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(input_shape))
    return counter.get_total_flops() // 2


def get_pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The pretrained config of a registered model, or of a timm model (``timm/`` prefix optional)."""
    if name in REGISTRY:
        return REGISTRY[name].pretrained_cfg
    return None


def create_model(name: str, pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, or any timm model (``timm/resnet18`` or plain ``resnet18``).

    ``weights`` is an explicit weight file (safetensors or a weights-only torch file) that takes precedence.

    Example:
        model = create_model("efficientnet_lite0", pretrained=True).eval()
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    timm_name = name[len("timm/") :] if name.startswith("timm/") else None
    if timm_name is None and name in REGISTRY:
        entry = REGISTRY[name]
        if entry.pretrained_cfg is None:
            if pretrained:
                raise PotpourriError(
                    f"model '{name}' has no pretrained weights offline; build it with pretrained=False "
                    f"or pass --weights PATH (a state dict with this model's parameter names)"
                )
            model = entry.fn(pretrained=False, **kwargs)
            return _load_exact(model, weights) if weights is not None else model
        if weights is not None:
            kwargs["weights"] = weights
        return entry.fn(pretrained=pretrained, **kwargs)
    return _create_timm_model(timm_name or name, pretrained=pretrained, weights=weights, **kwargs)


def _load_exact(model: nn.Module, weights: str) -> nn.Module:
    """Load a state dict whose keys and shapes must match the model exactly; one line on any mismatch."""
    from potpourri.core.io import load_state_dict_file

    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise PotpourriError(f"weights '{weights}' do not fit {type(model).__name__}: {detail[:200]}") from exc
    return model


def check_model_name(name: str) -> str:
    """``name`` unchanged if it is a registered or timm model (``timm/`` prefix optional); else one clear error."""
    import timm

    if name in REGISTRY:
        return name
    timm_name = name[len("timm/") :] if name.startswith("timm/") else name
    if not timm.is_model(timm_name):
        hint = suggest(timm_name, list(REGISTRY)) or suggest(timm_name, timm.list_models())  # our names first
        raise PotpourriError(f"unknown model '{timm_name}'{hint} (see `potpourri list`)")
    return name


def _create_timm_model(name: str, *, pretrained: bool, weights: str | None, **kwargs: Any) -> nn.Module:
    import timm

    check_model_name(f"timm/{name}")
    if weights is not None:
        from potpourri.core.io import load_state_dict_file

        model = timm.create_model(name, pretrained=False, **kwargs)
        state_dict = load_state_dict_file(weights)
        model.load_state_dict(state_dict)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # the hub is unreachable offline; say how to get the weights instead
        raise PotpourriError(
            f"could not load pretrained weights for timm model '{name}' ({type(exc).__name__}); "
            f"download them where you are online, or pass --weights PATH"
        ) from exc
