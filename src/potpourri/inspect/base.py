"""The common contract of inspection methods: ``fit`` on normal images, ``predict`` typed results, saved thresholds.

A fitted method is a folder: ``metadata.json`` (method name, config, calibrated thresholds, notes) next to
``model.safetensors`` (tensors only, e.g. PatchCore's memory bank). Thresholds are data in ``metadata.json``,
never baked into a model, so they can be re-calibrated without refitting.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput
from potpourri.core.io import atomic_write_bytes, load_state_dict_file, save_state_dict_atomic
from potpourri.core.metrics import f1_max
from potpourri.core.results import InspectionResult

__all__ = [
    "FORMAT_VERSION",
    "METHOD_MODULES",
    "InspectionMethod",
    "Thresholds",
    "calibrate_on_normal",
    "load_method",
    "method_module",
]

FORMAT_VERSION = 1
METADATA = "metadata.json"
TENSORS = "model.safetensors"
# method name -> module that defines it; imported lazily so `load_method` does not import every method
METHOD_MODULES = {
    "patchcore": "potpourri.inspect.patchcore",
    "anomalyclip": "potpourri.inspect.anomalyclip",
    "winclip": "potpourri.inspect.winclip",
}


@dataclass
class Thresholds:
    """Decision thresholds for image scores and map pixels, and where they came from."""

    image: float | None = None
    pixel: float | None = None
    source: str = "none"
    notes: list[str] = field(default_factory=list)
    # score range on the calibration images: the normalised score is (s - image) / (max - min) + 0.5 in [0, 1]
    image_min: float | None = None
    image_max: float | None = None
    false_alarm_rate: float | None = None  # the rate asked for when calibrated on normal images only

    @property
    def calibrated(self) -> bool:
        return self.image is not None

    def normalise(self, score: float) -> float | None:
        """anomalib's min-max convention: 0.5 at the image threshold, clipped to [0, 1]; None when uncalibrated."""
        if self.image is None or self.image_min is None or self.image_max is None:
            return None
        spread = max(self.image_max - self.image_min, 1e-12)
        return float(np.clip((score - self.image) / spread + 0.5, 0.0, 1.0))


def calibrate_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Thresholds:
    """F1-max thresholds on validation data, or the user's values; without defects, the top normal score.

    The pixel threshold is F1-max over mask pixels when masks hold defects, else the image threshold (noted).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    notes: list[str] = []
    if image_threshold is not None:
        image, source = float(image_threshold), "user"
    elif labels.any():
        image, source = f1_max(labels, scores)[1], "f1-max on validation"
    elif labels.size:
        image, source = float(scores.max()), "max normal score on validation"
        notes.append("validation set has no defects: image threshold = highest normal score (no F1-max possible)")
    else:
        return Thresholds(notes=["no validation images: thresholds not calibrated; pass --threshold"])
    if pixel_threshold is not None:
        pixel = float(pixel_threshold)
    elif masks is not None and maps is not None and np.asarray(masks).any():
        pixel = f1_max(np.asarray(masks).astype(np.uint8).ravel(), np.asarray(maps).ravel())[1]
    else:
        pixel = image
        notes.append("no defect masks to calibrate on: pixel threshold = image threshold")
    low, high = (float(scores.min()), float(scores.max())) if scores.size else (None, None)
    return Thresholds(image=image, pixel=pixel, source=source, notes=notes, image_min=low, image_max=high)


def calibrate_on_normal(scores: np.ndarray, maps: np.ndarray, false_alarm_rate: float) -> Thresholds:
    """Thresholds from defect-free held-out images only: the image threshold is the ``1 - false_alarm_rate``
    quantile of their scores, the pixel threshold that quantile of their per-image map maxima (so a normal image
    raises a mask pixel about as often as a false alarm); the notes say how far the rate can be trusted."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        return Thresholds(notes=["fewer than 2 held-out normal images: thresholds not calibrated; pass --threshold"])
    q = 1.0 - false_alarm_rate
    image = float(np.quantile(scores, q, method="higher"))
    pixel = float(np.quantile(np.asarray(maps).reshape(len(scores), -1).max(1), q, method="higher"))
    observed = float((scores >= image).mean())
    notes = [
        f"calibrated on {scores.size} held-out normal images only (no labelled defects): image threshold = their "
        f"{q:.3g} quantile; asked false-alarm rate {false_alarm_rate:.3g}, {observed:.3g} of them at or above it"
    ]
    if false_alarm_rate < 1.0 / scores.size:
        notes.append(f"a false-alarm rate below 1/{scores.size} cannot be checked on {scores.size} images")
    return Thresholds(image=image, pixel=pixel, source=f"{q:.3g} quantile of held-out normal scores", notes=notes,
                      image_min=float(scores.min()), image_max=float(scores.max()),
                      false_alarm_rate=false_alarm_rate)  # fmt: skip


class InspectionMethod(ABC):
    """Base of every inspection method: fit on normal images, score, threshold, save and load.

    Subclasses set ``name`` and ``config_class`` and implement ``fit``, ``score``, ``state_tensors`` and
    ``load_state_tensors``. Example:
        method = PatchCore(PatchCoreConfig()).fit(train_paths); results = method.predict(test_paths)
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # device types the method's feature pass can run on

    def __init__(self, config: Any) -> None:
        self.config = config
        self.thresholds = Thresholds()
        self.notes: list[str] = []
        self.device = torch.device("cpu")
        self.precision = "fp32"

    def to(self, device: str = "cpu", precision: str = "fp32") -> InspectionMethod:
        """Run the feature pass on ``device`` in ``precision`` (not saved with the run); one clear error when the
        method cannot."""
        from potpourri.core.training import check_precision, resolve_device

        resolved = resolve_device(device)
        if device == "auto" and resolved.type not in self.devices:
            resolved = torch.device("cpu")
        check_precision(precision, resolved)
        if resolved.type not in self.devices:
            raise PotpourriError(f"--device {device}: method '{self.name}' runs on {', '.join(self.devices)} only")
        if precision != "fp32" and "cuda" not in self.devices:
            raise PotpourriError(f"--precision {precision}: method '{self.name}' runs in fp32 only")
        self.device, self.precision = resolved, precision
        return self

    @abstractmethod
    def fit(self, images: Sequence[ImageInput]) -> InspectionMethod:
        """Learn what normal looks like from normal images; returns self."""

    @abstractmethod
    def score(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and anomaly maps (N, H, W), higher = more anomalous."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors to save (safetensors)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned."""

    def calibrate(
        self,
        scores: np.ndarray,
        labels: np.ndarray,
        maps: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        *,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> Thresholds:
        """Set the thresholds from validation scores/labels (and maps/masks); see ``calibrate_thresholds``."""
        self.thresholds = calibrate_thresholds(
            scores, labels, maps, masks, image_threshold=image_threshold, pixel_threshold=pixel_threshold
        )
        return self.thresholds

    def results(self, scores: np.ndarray, maps: np.ndarray) -> list[InspectionResult]:
        """Turn scores and maps into typed results with the current thresholds."""
        image_t, pixel_t = self.thresholds.image, self.thresholds.pixel
        return [
            InspectionResult(
                score=float(s),
                anomaly_map=m.astype(np.float32),
                mask=None if pixel_t is None else m >= pixel_t,
                label=None if image_t is None else bool(s >= image_t),
                normalised=self.thresholds.normalise(float(s)),
            )
            for s, m in zip(scores, maps, strict=True)
        ]

    def predict(self, images: Sequence[ImageInput]) -> list[InspectionResult]:
        """Score images and apply the calibrated thresholds (mask and label are None when uncalibrated)."""
        scores, maps = self.score(images)
        return self.results(scores, maps)

    def metadata(self) -> dict[str, Any]:
        from potpourri.core.version import __version__

        return {
            "format": "potpourri.inspect",
            "format_version": FORMAT_VERSION,
            "potpourri_version": __version__,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "thresholds": dataclasses.asdict(self.thresholds),
            "notes": self.notes,
            "tensors": TENSORS,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``metadata.json`` (thresholds live there, not in the tensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict_atomic(self.state_tensors(), folder / TENSORS, metadata={"method": self.name})
        atomic_write_bytes(folder / METADATA, json.dumps(self.metadata(), indent=2).encode())
        return folder

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], folder: Path) -> InspectionMethod:
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(metadata["config"]) - known)
        if unknown:
            raise PotpourriError(f"'{folder}' has config keys {unknown} unknown to this potpourri; refit the model")
        config = cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in metadata["config"].items()})
        method = cls(config)
        method.thresholds = Thresholds(**metadata["thresholds"])
        method.notes = list(metadata.get("notes", []))
        method.load_state_tensors(load_state_dict_file(folder / metadata.get("tensors", TENSORS)))
        return method


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check a fitted method's ``metadata.json``; a wrong folder or version raises one clear line."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise PotpourriError(
            f"'{folder}' is not an inspection run (no {METADATA}); fit one with `potpourri inspect fit ... --out DIR`"
        )
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PotpourriError(f"'{path}' is not valid JSON ({exc}); refit the model") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != "potpourri.inspect":
        raise PotpourriError(f"'{path}' is not potpourri inspection metadata; refit the model")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise PotpourriError(
            f"'{folder}' was written in inspection format {version}; this potpourri reads {FORMAT_VERSION}: "
            "refit with this version"
        )
    return metadata


def load_method(folder: str | os.PathLike, *, expect: str | None = None) -> InspectionMethod:
    """Load a fitted method from its folder; ``expect`` names the method the caller needs (e.g. 'patchcore').

    Example:
        method = load_method("runs/inspect/v0"); results = method.predict(["part.png"])
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    name = metadata.get("method")
    if expect is not None and name != expect:
        raise PotpourriError(f"'{folder}' holds a '{name}' model, not '{expect}'")
    if name not in METHOD_MODULES:
        raise PotpourriError(f"'{folder}' holds unknown method '{name}'; known: {', '.join(sorted(METHOD_MODULES))}")
    return method_module(name).METHOD.from_metadata(metadata, folder)


def method_module(name: str) -> ModuleType:
    """The module of inspection method ``name``: it defines ``METHOD`` (the class) and ``config_from_args(args)``."""
    if name not in METHOD_MODULES:
        raise PotpourriError(f"unknown inspection method '{name}'; choose from {', '.join(sorted(METHOD_MODULES))}")
    return importlib.import_module(METHOD_MODULES[name])
