"""open_clip models from disk: an architecture name (or a JSON model config) plus a local checkpoint, never a download.

One loader for every task that reads an open_clip model: AnomalyCLIP / WinCLIP's towers (``inspect/anomalyclip``) and
SAM-CLIP's teacher B (``segment/clip_teacher``). ``open_clip`` is an optional extra, imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from potpourri.core.errors import PotpourriError

__all__ = [
    "build_clip_from_config",
    "load_open_clip",
    "open_clip_module",
    "open_clip_tokenizer",
    "open_clip_vision_layers",
]

_DOWNLOAD_HINT = "`huggingface-cli download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors`"


def open_clip_module() -> Any:
    """The ``open_clip`` package, or a one-line error naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as exc:
        raise PotpourriError("this needs open_clip (a CLIP on disk): pip install 'potpourri[clip]'") from exc
    return open_clip


def load_open_clip(model: str, weights: str | None, *, image_size: int | None = None) -> nn.Module:
    """An open_clip model built from an architecture name (or a JSON model config) with weights from a local file;
    ``image_size`` rebuilds it at that input size (open_clip resamples the positional embedding on load).

    Nothing is downloaded. Example:
        clip = load_open_clip("ViT-L-14-336", "open_clip_pytorch_model.bin")
    """
    open_clip = open_clip_module()
    if weights is None:
        raise PotpourriError(
            f"--clip {model} needs --clip-weights PATH: an open_clip checkpoint on disk (.safetensors or .bin), e.g. "
            f"{_DOWNLOAD_HINT}"
        )
    path = Path(weights)
    if not path.is_file():
        raise PotpourriError(
            f"CLIP weights '{path}' not found; download an open_clip checkpoint for '{model}' (e.g. {_DOWNLOAD_HINT}) "
            "and pass its path to --clip-weights"
        )
    config_path = Path(model)
    if config_path.suffix == ".json" and config_path.is_file():
        config = json.loads(config_path.read_text())
        if image_size:
            config = {**config, "vision_cfg": {**config.get("vision_cfg", {}), "image_size": image_size}}
        clip = build_clip_from_config(config)
    else:
        if model not in open_clip.list_models():
            raise PotpourriError(
                f"unknown open_clip model '{model}'; see open_clip.list_models() or pass a .json config"
            )
        kwargs = {"force_image_size": image_size} if image_size else {}
        clip = open_clip.create_model(model, pretrained=None, load_weights=False, **kwargs)
    try:
        open_clip.load_checkpoint(clip, str(path), weights_only=True)
    except Exception as exc:  # a TorchScript OpenAI .pt, a wrong architecture, a corrupt file
        raise PotpourriError(
            f"could not load '{path}' into open_clip '{model}' ({type(exc).__name__}: {str(exc)[:120]}); pass an "
            "open_clip state dict (.safetensors/.bin) of that architecture, not an OpenAI TorchScript .pt"
        ) from exc
    return clip.eval()


def build_clip_from_config(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` from a config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    open_clip = open_clip_module()
    try:
        return open_clip.CLIP(**config).eval()
    except TypeError as exc:
        raise PotpourriError(f"bad open_clip model config ({exc}); give embed_dim, vision_cfg and text_cfg") from exc


def open_clip_tokenizer(clip: nn.Module, model_name: str | None = None) -> Callable:
    """The tokenizer of an open_clip architecture name, or for a JSON config the bundled BPE tokenizer at the text
    tower's context length (offline either way; a tokenizer that would need a download is a one-line error)."""
    open_clip = open_clip_module()
    text = clip.text if hasattr(clip, "text") else clip  # CustomTextCLIP keeps its text tower apart
    if model_name and not str(model_name).endswith(".json"):
        try:
            return open_clip.get_tokenizer(model_name)
        except Exception as exc:  # an HF tokenizer that is not cached, with no network
            raise PotpourriError(f"no offline tokenizer for open_clip '{model_name}' ({type(exc).__name__})") from None
    return open_clip.SimpleTokenizer(context_length=int(getattr(text, "context_length", 77)))


def open_clip_vision_layers(model: str) -> int:
    """The image tower's block count of an open_clip architecture name or JSON config, without building the model (a
    one-line error for an unknown name, a missing config or a tower that is not a ViT)."""
    open_clip = open_clip_module()
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise PotpourriError(f"open_clip config '{model}' not found")
        config = json.loads(path.read_text())
    elif model in open_clip.list_models():
        config = open_clip.get_model_config(model)
    else:
        raise PotpourriError(f"unknown open_clip model '{model}'; see open_clip.list_models() or pass a .json config")
    layers = (config or {}).get("vision_cfg", {}).get("layers")
    if not isinstance(layers, int):
        raise PotpourriError(f"open_clip '{model}' has no ViT image tower (vision_cfg.layers = {layers!r})")
    return layers
