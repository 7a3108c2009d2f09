"""Atomic writes and tensor files: safetensors state dicts and tensor + JSON bundles, written so that a kill never
leaves a torn file, read with ``weights_only`` semantics only.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from potpourri.core.errors import PotpourriError

StateDict = dict[str, torch.Tensor]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict_atomic(state_dict: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Save tensors as safetensors atomically (temp file + fsync + rename)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_state_dict_file(path: str | os.PathLike, *, fix: str = "pass --weights PATH to a valid file") -> StateDict:
    """Load a state dict from safetensors or a weights-only torch file; a bad file raises one clear line."""
    path = Path(path)
    if not path.is_file():
        raise PotpourriError(f"weight file '{path}' does not exist; {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PotpourriError(f"weight file '{path}' is corrupt or unreadable ({type(exc).__name__}); {fix}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PotpourriError(f"weight file '{path}' holds no state dict of tensors; {fix}")
    return state


def save_bundle(
    tensors_path: str | os.PathLike,
    tensors: StateDict,
    meta_path: str | os.PathLike,
    meta: dict[str, Any],
    *,
    tensor_metadata: dict[str, str] | None = None,
) -> None:
    """Write a model bundle: tensors as safetensors, then its JSON metadata, each atomically."""
    save_state_dict_atomic(tensors, tensors_path, metadata=tensor_metadata)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2, default=float).encode())


def read_json_meta(
    path: str | os.PathLike,
    *,
    missing: str,
    fix: str,
    format: str | None = None,
    format_version: int | None = None,
) -> dict[str, Any]:
    """Read a bundle's JSON metadata; a missing (message ``missing``), invalid or foreign file raises one line."""
    path = Path(path)
    if not path.is_file():
        raise PotpourriError(missing)
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PotpourriError(f"'{path}' is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(meta, dict):
        raise PotpourriError(f"'{path}' holds no metadata object; {fix}")
    if format is not None and meta.get("format") != format:
        raise PotpourriError(f"'{path}' holds format {meta.get('format')!r}, not {format!r}; {fix}")
    if format_version is not None and meta.get("format_version") != format_version:
        raise PotpourriError(
            f"'{path}' was written in {format} format {meta.get('format_version')}; this potpourri reads "
            f"{format_version}: {fix}"
        )
    return meta


def load_bundle(
    tensors_path: str | os.PathLike,
    meta_path: str | os.PathLike,
    *,
    missing: str,
    fix: str,
    format: str | None = None,
    format_version: int | None = None,
) -> tuple[dict[str, Any], StateDict]:
    """Read a bundle written by ``save_bundle``: its checked metadata and its tensors."""
    meta = read_json_meta(meta_path, missing=missing, fix=fix, format=format, format_version=format_version)
    return meta, load_state_dict_file(tensors_path, fix=fix)


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> Path:
    """Write dict rows as CSV atomically (header = ``fieldnames`` or the first row's keys); returns the path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or (list(rows[0]) if rows else []))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return Path(path)


def kill_point(step: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process (no cleanup, no ``finally``) when ``step`` equals
    ``$POTPOURRI_KILL_AT_STEP``; a no-op otherwise."""
    if step and str(step) == os.environ.get("POTPOURRI_KILL_AT_STEP"):
        os.kill(os.getpid(), signal.SIGKILL)
