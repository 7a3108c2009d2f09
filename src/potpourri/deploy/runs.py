"""``load_run(path)``: any run folder that holds a trained or fitted model, back as a ready predictor.

One contract per task kind — ``predictor.kind`` and ``predictor.predict(images)``:

========== ============================== ===============================================================
kind       written by                     ``predict(images)`` returns, one entry per image
========== ============================== ===============================================================
classifier ``potpourri tune``             ``{"label", "prob", "top": [{"index", "label", "prob"}, …]}``
inspection ``potpourri inspect fit``      ``InspectionResult`` (score, label, anomaly map, mask)
segmenter  ``inspect segment-train``      ``(H, W)`` class-id array at the image's own size
detector   ``potpourri detect train``     ``{"boxes" (K, 4) xyxy px, "scores" (K,), "labels" (K,), "names"}``
========== ============================== ===============================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput, as_rgb

__all__ = ["KINDS", "load_run", "run_kind"]

KINDS = ("classifier", "inspection", "segmenter", "detector")


def run_kind(folder: str | os.PathLike) -> str:
    """Which kind of model a run folder holds (from its files); one clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PotpourriError(f"run '{folder}' does not exist")
    meta = folder / "metadata.json"
    if meta.is_file():
        record = json.loads(meta.read_text())
        fmt = record.get("format")
        if fmt == "potpourri.classifier":
            return "classifier"
        if fmt == "potpourri.inspect":
            return "inspection"
        if fmt == "potpourri.run" and record.get("kind") in KINDS:
            return record["kind"]
    if (folder / "detector.json").is_file():
        return "detector"
    from potpourri.segment.segmenter import CONFIG_FILE

    if (folder / CONFIG_FILE).is_file():
        return "segmenter"
    raise PotpourriError(
        f"'{folder}' holds no model potpourri can load (a tune, inspect fit, segment-train or detect train run)"
    )


@dataclass
class _Segmenter:
    model: Any
    kind: str = "segmenter"

    def predict(self, images: list[ImageInput]) -> list[np.ndarray]:
        return [self.model.predict(np.asarray(as_rgb(img))[None])[0] for img in images]


@dataclass
class _Detector:
    model: Any
    meta: dict[str, Any]
    conf: float = 0.25
    iou: float = 0.6
    kind: str = "detector"

    def predict(self, images: list[ImageInput]) -> list[dict[str, Any]]:
        from potpourri.detect.train import detect_images

        arrays = [np.asarray(as_rgb(img)) for img in images]
        found = detect_images(self.model, arrays, image_size=self.meta["image_size"], conf=self.conf, iou=self.iou)
        return [{**f, "names": [self.meta["class_names"][int(c)] for c in f["labels"]]} for f in found]


@dataclass
class _Inspection:
    model: Any
    kind: str = "inspection"

    def predict(self, images: list[ImageInput]) -> list[Any]:
        return self.model.predict(images)


def load_run(path: str | os.PathLike, *, device: str = "cpu") -> Any:
    """The model of a run folder as a predictor with ``kind`` and ``predict(images)`` (see the module table).

    Example:
        clf = load_run("runs/tune/v0"); print(clf.predict(["part.png"])[0]["label"])
    """
    kind = run_kind(path)
    if kind == "classifier":
        from potpourri.tune.predict import load_classifier

        return load_classifier(path, device=device)
    if device not in ("cpu", "auto"):
        raise PotpourriError(f"load_run: {kind} runs predict on the CPU here; pass device='cpu'")
    if kind == "inspection":
        from potpourri.inspect.base import load_method

        return _Inspection(load_method(path))
    if kind == "segmenter":
        from potpourri.segment.segmenter import Segmenter

        return _Segmenter(Segmenter.load(path))
    from potpourri.detect.train import load_detector

    model, meta = load_detector(path)
    return _Detector(model, meta)
