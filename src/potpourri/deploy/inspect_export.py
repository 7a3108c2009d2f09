"""Export a fitted PatchCore run as a bundle that runs without torch: ``patchcore.onnx`` (backbone, patch
aggregation, nearest-neighbour search against the memory bank, image score and smoothed map, all in the graph),
``metadata.json`` (input size, mean/std, resize filter, thresholds, parity) and ``inspect_runtime.py`` (NumPy +
Pillow + ONNX Runtime or OpenVINO). Parity with eager PyTorch is measured at export time on the given images.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.io import atomic_write_bytes
from potpourri.deploy.export import OPSET, require_onnxruntime

__all__ = ["export_patchcore", "relative_difference"]

RUNTIME = Path(__file__).with_name("inspect_runtime.py")


def relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """max |a - b| / max |a|: one number for how far a runtime is from eager."""
    return float(np.abs(reference - other).max() / max(float(np.abs(reference).max()), 1e-12))


def export_patchcore(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, check_images: list) -> dict[str, Any]:
    """Write the bundle of ``run_dir`` (an ``inspect fit`` PatchCore run) into ``out_dir`` and check ONNX Runtime
    and, when installed, OpenVINO (f32) against eager on ``check_images``; returns the metadata written."""
    from potpourri.inspect.base import load_method
    from potpourri.inspect.patchcore_graph import PatchCoreGraph

    require_onnxruntime()
    method = load_method(run_dir)
    if method.name != "patchcore":
        raise PotpourriError(f"export of '{method.name}' runs is not supported; PatchCore runs export to ONNX")
    if method.config.tile:
        raise PotpourriError("export of a tiled PatchCore run is not supported yet (the runtime does not tile)")
    graph = PatchCoreGraph(method).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "patchcore.onnx"
    size = method.config.image_size
    tmp = onnx_path.with_suffix(".onnx.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (torch.zeros(1, 3, size, size),), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=["image"], output_names=["score", "anomaly_map"],
                dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}, "anomaly_map": {0: "batch"}},
            )  # fmt: skip
        os.replace(tmp, onnx_path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise PotpourriError(f"PatchCore cannot be exported to ONNX: {str(exc).splitlines()[0][:200]}") from exc
    mean, std = method.normalisation
    thresholds = method.thresholds
    metadata: dict[str, Any] = {
        "format": "potpourri.inspect-bundle",
        "method": "patchcore",
        "graph": onnx_path.name,
        "runtime": RUNTIME.name,
        "inputs": {"image": ["batch", 3, size, size]},
        "outputs": {"score": ["batch"], "anomaly_map": ["batch", size, size]},
        "image_size": size,
        "mean": list(mean),
        "std": list(std),
        "resize": "PIL bicubic to image_size x image_size",
        "nearest_neighbour_search": "in the graph (memory bank as an initializer)",
        "memory_bank_rows": int(method.memory_bank.shape[0]),
        "thresholds": {k: getattr(thresholds, k) for k in ("image", "pixel", "source", "image_min", "image_max")},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(method.config).items()},
        "source_run": str(run_dir),
    }
    atomic_write_bytes(out_dir / "metadata.json", json.dumps(metadata, indent=2).encode())
    shutil.copyfile(RUNTIME, out_dir / RUNTIME.name)
    metadata["parity"] = bundle_parity(method, out_dir, check_images)
    atomic_write_bytes(out_dir / "metadata.json", json.dumps(metadata, indent=2).encode())
    return metadata


def bundle_parity(method: Any, out_dir: Path, images: list) -> dict[str, Any]:
    """Relative score and map differences of each available runtime against eager, and whether verdicts agree."""
    import importlib.util
    import sys

    sys.path.insert(0, str(out_dir))
    try:
        spec = importlib.util.spec_from_file_location("inspect_runtime_bundle", out_dir / RUNTIME.name)
        runtime = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
    finally:
        sys.path.remove(str(out_dir))
    scores, maps = method.score(images)
    threshold = method.thresholds.image
    report: dict[str, Any] = {"images": len(images)}
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for backend in backends:
        other_scores, other_maps = runtime.Inspector(out_dir, backend=backend).score(images)
        same = None if threshold is None else bool(((scores >= threshold) == (other_scores >= threshold)).all())
        report[backend] = {
            "score_rel_diff": relative_difference(scores, other_scores),
            "map_rel_diff": relative_difference(maps, other_maps),
            "same_verdicts": same,
        }
    return report
