"""The inspection assistant behind ``potpourri chat`` and ``potpourri serve``: a trained VLM run answers a question
about an image; boxes and masks written as text in the answer are parsed (``potpourri.core.textgeo``) and drawn; an
optional inspection run (PatchCore / any ``inspect fit`` method, or the defect segmenter) adds its verdict.

Example:
    assistant = Assistant("runs/vlm/v0", inspect="runs/inspect/v0")
    reply = assistant.ask("part.png", "[refer] where is the scratch?")
    reply.answer, reply.regions, reply.annotated          # text, [(phrase, pixel box)], (H, W, 3) uint8
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potpourri.core.errors import PotpourriError

__all__ = [
    "Assistant",
    "InspectionView",
    "Reply",
    "answer_mask",
    "answer_regions",
    "draw_answer",
    "load_inspector",
    "load_vlm_run",
]

Box = tuple[float, float, float, float]
_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255))  # per region
MASK_COLOUR = (255, 0, 255)
_VLM_FILES = ("config.yaml", "trainable.safetensors")
_PHRASE_RE = re.compile(r"<p>.*?</p>", re.DOTALL)  # where textgeo.parse_phrases starts its first group


# ----------------------------------------------------------------------------------------------------------------
# loading runs


def load_vlm_run(run_dir: str | os.PathLike, *, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild a ``potpourri vlm train`` run's VLM (same seed, encoder, LM, merge) and load its trained parts, on
    ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``).

    Returns ``(vlm, config)``; a missing folder or a folder of another verb is a one-line ``PotpourriError``.
    """
    import yaml

    from potpourri.models.vlm import vlm_from_config

    folder = Path(run_dir)
    if not folder.is_dir():
        raise PotpourriError(f"VLM run '{folder}' does not exist; train one with `potpourri vlm train --out DIR`")
    missing = [name for name in _VLM_FILES if not (folder / name).is_file()]
    if missing:
        raise PotpourriError(
            f"'{folder}' is not a `potpourri vlm train` run (no {' or '.join(missing)}); pass the folder that "
            "`potpourri vlm train` printed"
        )
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        raise PotpourriError(f"'{folder / 'config.yaml'}' is not valid YAML ({exc.__class__.__name__})") from None
    needed = ("encoder", "lm", "pretrained", "merge", "image_size", "seed")
    if not isinstance(cfg, dict) or any(key not in cfg for key in needed):
        raise PotpourriError(f"'{folder / 'config.yaml'}' is not a VLM config (needs {', '.join(needed)})")
    from potpourri.core.training import resolve_device

    where = resolve_device(device)  # a missing GPU fails before the model is built
    vlm = vlm_from_config(cfg)
    vlm.load_trainable(folder / "trainable.safetensors")
    return vlm.to(where).eval(), cfg


@dataclass
class InspectionView:
    """What an inspection run says about one image: a one-line verdict and an overlay at the image's size."""

    method: str  # e.g. "patchcore", "segmenter"
    summary: str  # one line, e.g. "patchcore: score 3.21 (threshold 2.80) -> defect"
    overlay: np.ndarray  # (H, W, 3) uint8: anomaly heat map or segmentation colours over the image
    score: float


class _Inspector:
    """A loaded inspection run with one call: ``view(image) -> InspectionView``."""

    def __init__(self, model: Any, method: str) -> None:
        self.model, self.method = model, method

    def view(self, image: np.ndarray) -> InspectionView:
        from PIL import Image

        height, width = image.shape[:2]
        if self.method == "segmenter":
            from potpourri.segment.segmenter import colour_mask

            classes = self.model.predict(image[None])[0]  # (H, W) class ids at the image's own size
            names = self.model.config.class_names
            counts = np.bincount(classes.ravel(), minlength=len(names))
            found = ", ".join(
                f"{names[k]} {counts[k]} px ({counts[k] / classes.size:.1%})" for k in range(1, len(names)) if counts[k]
            )
            defect = classes > 0
            overlay = image.copy()
            overlay[defect] = (0.5 * image[defect] + 0.5 * colour_mask(classes)[defect]).astype(np.uint8)
            score = float(defect.mean())
            return InspectionView("segmenter", f"segmenter: {found or 'no defect pixels'}", overlay, score)
        from potpourri.report.inspect_plots import heatmap_overlay

        result = self.model.predict([image])[0]
        full_map = np.asarray(Image.fromarray(result.anomaly_map).resize((width, height), Image.Resampling.BILINEAR))
        overlay = heatmap_overlay(image, full_map, vmin=float(full_map.min()), vmax=float(full_map.max()))
        threshold = self.model.thresholds.image
        verdict = "" if result.label is None else (" -> defect" if result.label else " -> good")
        limit = "" if threshold is None else f" (threshold {threshold:.3g})"
        return InspectionView(self.method, f"{self.method}: score {result.score:.3g}{limit}{verdict}", overlay,
                              float(result.score))  # fmt: skip


def load_inspector(run_dir: str | os.PathLike) -> _Inspector:
    """Load an inspection run: an ``inspect fit`` folder (``metadata.json``) or an ``inspect segment-train`` folder."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PotpourriError(f"inspection run '{folder}' does not exist; make one with `potpourri inspect fit`")
    from potpourri.deploy.runs import run_kind

    kind = run_kind(folder)
    if kind == "inspection":
        from potpourri.inspect.base import load_method

        method = load_method(folder)
        return _Inspector(method, method.name)
    from potpourri.segment.segmenter import Segmenter

    if kind != "segmenter":
        raise PotpourriError(
            f"'{folder}' is neither an inspection run (`potpourri inspect fit`) nor a segmenter run "
            f"(`potpourri inspect segment-train`) but a {kind} run"
        )
    return _Inspector(Segmenter.load(folder), "segmenter")  # its own errors name a broken segmenter run


# ----------------------------------------------------------------------------------------------------------------
# geometry in answers


def answer_regions(answer: str, size: tuple[int, int]) -> list[tuple[str, Box]]:
    """Every box in a MiniGPT-v2 answer as ``(phrase, pixel box)`` on an image of ``size`` (width, height);
    boxes before the first ``<p>phrase</p>`` get the phrase ``""``. Never raises."""
    from potpourri.core.textgeo import dequantize_box, parse_boxes, parse_phrases

    if not isinstance(answer, str):
        return []
    first = _PHRASE_RE.search(answer)
    regions = [("", dequantize_box(b, size)) for b in parse_boxes(answer[: first.start() if first else None])]
    for phrase, boxes in parse_phrases(answer):
        regions += [(phrase, dequantize_box(b, size)) for b in boxes]
    return regions


def answer_mask(answer: str, size: tuple[int, int]) -> np.ndarray | None:
    """The union of the masks written as ``<poly>`` / ``<rle>`` text in an answer, ``(H, W)`` bool; None if none."""
    from potpourri.core.textgeo import polygon_text_to_mask, rle_text_to_mask

    if not isinstance(answer, str) or ("<poly>" not in answer and "<rle>" not in answer):
        return None
    return polygon_text_to_mask(answer, size) | rle_text_to_mask(answer, size)


def draw_answer(image: np.ndarray, regions: list[tuple[str, Box]], mask: np.ndarray | None = None) -> np.ndarray:
    """The image with a mask tinted in and each box outlined (2 px, inside its pixel span) and labelled above it.

    A box ``(x1, y1, x2, y2)`` covers pixels ``x1 .. x2 - 1`` (textgeo's convention), so its outline runs along them.
    """
    from PIL import Image, ImageDraw

    canvas = np.ascontiguousarray(image[..., :3]).copy()
    if mask is not None and mask.any():
        tint = np.asarray(MASK_COLOUR, np.float64)
        canvas[mask] = (0.5 * canvas[mask] + 0.5 * tint).round().astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    height, width = canvas.shape[:2]
    for i, (phrase, box) in enumerate(regions):
        x1, y1 = round(box[0]), round(box[1])
        x2, y2 = max(x1, round(box[2]) - 1), max(y1, round(box[3]) - 1)
        x1, x2 = min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)
        y1, y2 = min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)
        colour = _COLOURS[i % len(_COLOURS)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        if phrase:
            draw.text((x1, max(0, y1 - 11)), phrase, fill=colour)  # above the box, so the outline stays visible
    return np.asarray(picture)


# ----------------------------------------------------------------------------------------------------------------
# the assistant


@dataclass
class Reply:
    """One answer: the text, the boxes and mask it contains, the image with them drawn, the inspection verdict."""

    question: str
    answer: str
    regions: list[tuple[str, Box]]
    mask: np.ndarray | None
    annotated: np.ndarray  # (H, W, 3) uint8
    inspection: InspectionView | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Pixels:
    image: np.ndarray  # what vlm.train.encode_samples reads from a sample


class Assistant:
    """A trained VLM run (and optionally an inspection run) answering questions about images.

    Example:
        Assistant("runs/vlm/v0").ask(read_rgb("part.png"), "[vqa] is there a crack?").answer
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        inspect: str | os.PathLike | None = None,
        max_new_tokens: int = 64,
        device: str = "auto",
        precision: str = "fp32",
    ) -> None:
        from potpourri.core.training import check_precision, resolve_device

        self.device = resolve_device(device)  # the VLM answers here; an inspection run keeps its own (CPU) path
        check_precision(precision, self.device)
        self.precision = precision
        self.vlm, self.config = load_vlm_run(run_dir, device=str(self.device))
        self.run_dir = Path(run_dir)
        self.inspector = load_inspector(inspect) if inspect else None
        self.max_new_tokens = max_new_tokens
        self.image_size = int(self.config["image_size"])

    def features(self, image: np.ndarray) -> torch.Tensor:
        """The frozen encoder's feature map ``(1, C, h, w)`` of an RGB image resized to the run's training size."""
        from PIL import Image

        from potpourri.vlm.train import encode_samples

        size = (self.image_size, self.image_size)
        resized = np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        # the training path's normalisation, exactly
        return encode_samples(self.vlm, [_Pixels(resized)], device=self.device, precision=self.precision)

    def ask(self, image: Any, question: str) -> Reply:
        """Answer ``question`` about ``image`` (path, PIL image or (H, W, 3) uint8 array); draw what the answer
        locates on the image at its own size."""
        from potpourri.core.imaging import as_rgb

        question = (question or "").strip()
        if not question:
            raise PotpourriError("empty question; ask e.g. '[refer] where is the scratch?'")
        if image is None:
            raise PotpourriError("no image; upload or pass one")
        pixels = np.asarray(as_rgb(image))
        from potpourri.core.training import autocast

        features = self.features(pixels)
        with torch.no_grad(), autocast(self.device, self.precision):
            answer = self.vlm.generate(features, [question], max_new_tokens=self.max_new_tokens)[0]
        size = (pixels.shape[1], pixels.shape[0])
        regions, mask = answer_regions(answer, size), answer_mask(answer, size)
        notes = []
        if self.config.get("task_identifiers", True) and not question.startswith("["):
            notes.append("this model was trained with task identifiers; try e.g. '[refer] ...' or '[vqa] ...'")
        inspection = self.inspector.view(pixels) if self.inspector else None
        return Reply(question, answer, regions, mask, draw_answer(pixels, regions, mask), inspection, notes)
