"""ONNX export with an ONNX Runtime parity check and a ``metadata.json`` beside the graph.

Normalisation and thresholds stay out of the graph: the graph maps normalised pixels to logits, and
``metadata.json`` says how to normalise (input size, mean/std, class names). Extra: ``pip install potpourri[onnx]``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.io import atomic_write_bytes
from potpourri.core.weights import PretrainedCfg
from potpourri.models.reparam import reparameterize

__all__ = ["ExportResult", "export_onnx", "onnx_parity", "require_onnxruntime"]

OPSET = 17


@dataclass
class ExportResult:
    """Where the graph went and how closely ONNX Runtime reproduces PyTorch."""

    onnx_path: Path
    metadata_path: Path
    max_abs_diff: float
    input_size: tuple[int, int, int]


def require_onnxruntime() -> Any:
    """Import onnxruntime or say which extra installs it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise PotpourriError("ONNX export needs onnx and onnxruntime: pip install 'potpourri[onnx]'") from exc
    return onnxruntime


def ort_session(path: Path | bytes, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session on an ONNX file (or serialised model bytes), at ``threads`` intra-op threads."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_parity(model: nn.Module, onnx_path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max absolute difference between the eval-mode model and ONNX Runtime on ``x``."""
    session = ort_session(Path(onnx_path))
    (ort_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return float((torch.from_numpy(ort_out) - model.eval()(x)).abs().max())


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    cfg: PretrainedCfg | None = None,
    class_names: list[str] | None = None,
    reparam: bool = False,
    name: str = "model",
    parity_batch: int = 2,
) -> ExportResult:
    """Export ``model`` (optionally re-parameterised first) to ``out_dir/<name>.onnx`` with a dynamic batch axis.

    Example:
        result = export_onnx(create_model("efficientmod_xxs"), "export/", reparam=True); print(result.max_abs_diff)
    """
    require_onnxruntime()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = reparameterize(model) if reparam else model.eval()
    onnx_path = out_dir / f"{name}.onnx"
    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    tmp_path = onnx_path.with_suffix(".onnx.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                model,
                (example,),
                str(tmp_path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        os.replace(tmp_path, onnx_path)
    except Exception as exc:
        tmp_path.unlink(missing_ok=True)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PotpourriError(f"{type(model).__name__} cannot be exported to ONNX: {first_line[:200]}") from exc

    check = torch.randn(parity_batch, *input_size, generator=torch.Generator().manual_seed(1))
    diff = onnx_parity(model, onnx_path, check)
    metadata = {
        "format": "onnx",
        "opset": OPSET,
        "input_name": "input",
        "input_size": list(input_size),
        "dynamic_batch": True,
        "reparameterized": reparam,
        "normalisation": {"mean": list(cfg.mean), "std": list(cfg.std)} if cfg else None,
        "interpolation": cfg.interpolation if cfg else None,
        "crop_pct": cfg.crop_pct if cfg else None,
        "class_names": class_names,
        "parity_max_abs_diff": diff,
    }
    metadata_path = out_dir / "metadata.json"
    atomic_write_bytes(metadata_path, json.dumps(metadata, indent=2).encode())
    return ExportResult(onnx_path, metadata_path, diff, tuple(input_size))


def result_dict(result: ExportResult) -> dict[str, Any]:
    """The export result as plain JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
