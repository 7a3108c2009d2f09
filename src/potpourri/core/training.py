"""What every training loop shares: the lr schedule, seeded epoch batches, EMA, device choice, RNG state and atomic,
resumable checkpoints (``last.json`` written last).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.core.io import atomic_write_bytes, save_state_dict_atomic


def lr_at(step: int, *, base: float, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool) -> list:
    """Index batches of one epoch; a function of (seed, epoch) only, so a resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)) if shuffle else None
    order = order.tolist() if order is not None else list(range(n))
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def iter_batches(data: Dataset, batches: list, num_workers: int) -> Iterator:
    if isinstance(data, TensorDataset):  # cached features: index tensors directly, no per-item collation
        for idx in batches:
            index = torch.as_tensor(idx)
            yield tuple(t[index] for t in data.tensors)
        return
    yield from DataLoader(data, batch_sampler=batches, num_workers=num_workers)


class EMA:
    """Exponential moving average of the trainable parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange live and EMA weights (call twice to swap back)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            live = params[name].detach().clone()
            params[name].copy_(shadow)
            shadow.copy_(live)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, state: dict[str, Any]
) -> Path:
    """Write one checkpoint atomically; ``last.json`` is written last, so a kill never leaves a torn checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"step{state['step']:08d}"
    weights = dict(model.state_dict())
    if ema is not None:
        weights.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    save_state_dict_atomic(weights, folder / f"{tag}.safetensors", metadata={"step": str(state["step"])})

    optim = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in optim["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    rng_tensors, rng_plain = rng_state()
    save_state_dict_atomic({**tensors, **rng_tensors}, folder / f"{tag}.optim.safetensors")

    record = {**state, "tag": tag, "param_groups": optim["param_groups"], "optim_scalars": scalars, "rng": rng_plain}
    atomic_write_bytes(folder / "last.json", json.dumps(record).encode())
    for old in folder.glob("step*.safetensors"):  # older checkpoints are superseded once last.json moved on
        if not old.name.startswith(tag + "."):
            old.unlink(missing_ok=True)
    return folder / f"{tag}.safetensors"


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema: EMA | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer, EMA, RNG when given) from ``folder/last.json``; returns the saved state."""
    from safetensors.torch import load_file

    last = folder / "last.json"
    if not last.is_file():
        raise PotpourriError(f"no checkpoint to resume in '{folder}'; run without --resume first")
    record = json.loads(last.read_text())
    weights = load_file(str(folder / f"{record['tag']}.safetensors"))
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("ema.")})
    if ema is not None:
        ema.shadow = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
    if optimizer is not None:
        extra = load_file(str(folder / f"{record['tag']}.optim.safetensors"))
        slots: dict[int, dict[str, Any]] = {}
        for key, value in extra.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                slots.setdefault(int(index), {})[name] = value
        for key, value in record["optim_scalars"].items():
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": record["param_groups"]})
        set_rng_state(extra, record["rng"])
    return record


def choose_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
