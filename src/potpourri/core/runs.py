"""Run folders: every verb that computes writes ``runs/<verb>/v<N>/`` (or ``--out``) with the same files.

``config.yaml`` (what was asked), ``env.json`` (versions, git SHA, threads, seed), ``metrics.csv`` (one row per
step/epoch), ``summary.json`` (final numbers), ``images/`` and ``report.html``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from potpourri.core.io import atomic_write_bytes

__all__ = ["Run", "environment", "new_run", "seed_everything", "write_run_metadata"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(seed: int | None = None) -> dict[str, Any]:
    """Versions, git SHA, thread count, seed and device: what ``env.json`` records."""
    import timm
    import torchvision

    from potpourri.core.version import __version__

    return {
        "potpourri": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "git_sha": _git_sha(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "seed": seed,
    }


def _to_plain(value: Any) -> Any:
    """Make config values YAML/JSON friendly (paths, tuples, numpy scalars)."""
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Run:
    """One run folder and the writers for its standard files."""

    path: Path
    _metric_fields: list[str] = field(default_factory=list)

    @property
    def images(self) -> Path:
        folder = self.path / "images"
        folder.mkdir(exist_ok=True)
        return folder

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / "config.yaml", yaml.safe_dump(_to_plain(config), sort_keys=True).encode())

    def write_env(self, seed: int | None = None) -> None:
        atomic_write_bytes(self.path / "env.json", json.dumps(environment(seed), indent=2).encode())

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.csv`` (the header is the first row's keys)."""
        metrics = self.path / "metrics.csv"
        if not self._metric_fields:
            self._metric_fields = list(row)
            with open(metrics, "w", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self._metric_fields).writeheader()
        with open(metrics, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._metric_fields, extrasaction="ignore").writerow(_to_plain(row))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / "summary.json", json.dumps(_to_plain(summary), indent=2).encode())

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())


def new_run(
    verb: str,
    out: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike = "runs",
    config: dict[str, Any] | None = None,
    seed: int | None = None,
) -> Run:
    """Create ``out`` or the next free ``<root>/<verb>/v<N>`` folder and return its ``Run``; with ``config`` also
    write ``config.yaml`` and ``env.json`` (recording ``seed``).

    Example:
        run = new_run("demo", config=vars(args), seed=0)
    """
    if out is not None:
        path = Path(out)
    else:
        parent = Path(root) / verb
        parent.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]
        path = parent / f"v{max(taken, default=-1) + 1}"
    path.mkdir(parents=True, exist_ok=True)
    run = Run(path)
    if config is not None:
        run.write_config(config)
        run.write_env(seed=seed)
    return run


def write_run_metadata(path: str | os.PathLike, *, kind: str, files: dict[str, str], **fields: Any) -> Path:
    """``metadata.json`` of a run whose model lives in its own files (``files``: role -> file name): the run's
    ``kind`` (what ``potpourri.load_run`` dispatches on), the library versions and any ``fields``."""
    record = {"format": "potpourri.run", "kind": kind, "files": files, **_to_plain(fields), "versions": environment()}
    target = Path(path) / "metadata.json"
    atomic_write_bytes(target, json.dumps(record, indent=2).encode())
    return target
