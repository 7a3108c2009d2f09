"""Run an exported potpourri inspection bundle without torch: NumPy + Pillow + ONNX Runtime or OpenVINO.

This file is copied into every bundle written by ``potpourri export --run <inspect fit run>`` (next to
``patchcore.onnx`` and ``metadata.json``) and imports nothing from potpourri::

    from inspect_runtime import Inspector
    inspector = Inspector("bundle/", backend="openvino")      # or "onnxruntime" (the default)
    result = inspector.predict(["part.png"])[0]               # score, label, anomaly map, mask

The graph holds the whole method, nearest-neighbour search included (the memory bank is one of its initializers);
this file only resizes and normalises the images as the run was fitted (Pillow bicubic, mean/std) and applies the
thresholds of ``metadata.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["Inspector"]


class Inspector:
    """A loaded bundle: ``score(images)`` -> (scores (N,), maps (N, S, S)); ``predict(images)`` -> per-image dicts."""

    def __init__(
        self, folder: str | Path, *, backend: str = "onnxruntime", threads: int | None = None, precision: str = "f32"
    ) -> None:
        folder = Path(folder)
        self.meta = json.loads((folder / "metadata.json").read_text())
        graph = folder / self.meta["graph"]
        if backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run(None, {"image": x})
        elif backend == "openvino":
            import openvino as ov

            # OpenVINO picks bf16 on CPUs with bf16 units unless told otherwise; f32 is what parity is tested in
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(str(graph), "CPU", config)
            self._run = lambda x: [compiled(x)[output] for output in compiled.outputs]
        else:
            raise ValueError(f"backend must be 'onnxruntime' or 'openvino', not {backend!r}")
        self.backend = backend
        self.size = int(self.meta["image_size"])
        self.mean = np.asarray(self.meta["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(self.meta["std"], np.float32).reshape(3, 1, 1)

    def preprocess(self, image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
        """One image (path, PIL or HxWx3 uint8) -> (3, S, S) float32, resized and normalised as at fit time."""
        if isinstance(image, str | Path):
            with Image.open(image) as img:
                rgb = img.convert("RGB")
        else:
            rgb = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
        if rgb.size != (self.size, self.size):
            rgb = rgb.resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def score(self, images: list, *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and anomaly maps (N, S, S) at the model's input size."""
        scores, maps = [], []
        for first in range(0, len(images), batch_size):
            x = np.stack([self.preprocess(i) for i in images[first : first + batch_size]])
            score, anomaly_map = self._run(np.ascontiguousarray(x))
            scores.append(np.asarray(score, np.float32))
            maps.append(np.asarray(anomaly_map, np.float32))
        return np.concatenate(scores), np.concatenate(maps)

    def predict(self, images: list) -> list[dict[str, Any]]:
        """Per image: ``score``, ``normalised`` (0-1, 0.5 at the threshold; None when uncalibrated), ``label``
        (True = defect, None when uncalibrated), ``anomaly_map`` (S, S) and ``mask`` (S, S) bool or None."""
        thresholds = self.meta["thresholds"]
        image_t, pixel_t = thresholds.get("image"), thresholds.get("pixel")
        low, high = thresholds.get("image_min"), thresholds.get("image_max")
        scores, maps = self.score(images)
        out = []
        for score, anomaly_map in zip(scores, maps, strict=True):
            out.append({
                "score": float(score),
                "normalised": None if None in (image_t, low, high) else normalise(float(score), image_t, low, high),
                "label": None if image_t is None else bool(score >= image_t),
                "anomaly_map": anomaly_map,
                "mask": None if pixel_t is None else anomaly_map >= pixel_t,
            })  # fmt: skip
        return out


def normalise(score: float, threshold: float, low: float, high: float) -> float:
    """anomalib's min-max convention, as ``Thresholds.normalise``: (score - threshold) / (high - low) + 0.5, clipped
    to [0, 1]."""
    return float(np.clip((score - threshold) / max(high - low, 1e-12) + 0.5, 0.0, 1.0))
