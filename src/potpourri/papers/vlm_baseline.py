"""The non-LLM baseline for the VLM evaluation: boxes from a segmenter's masks, answers from a defect classifier.

Two ordinary inspection models answer the same DS-Synth instructions as the VLM, as text, so that
``vlm.train.score`` grades both with exactly the same rules:

* a **segmenter** (``potpourri.segment.segmenter``: frozen EfficientNet-Lite0 + UNet decoder) trained on the training
  images' masks gives a class map; its connected components (smaller ones dropped) give the boxes (``refer``,
  ``grounding``, ``detection``), the box centre gives the location words (``where``), and the majority class inside
  a box names it (``identify``);
* a **defect classifier**, one logistic regression per defect class on the frozen Lite0 feature map (average- and
  max-pooled), says which classes are present (``yesno``, ``list``, ``caption``). ``answers="segmenter"`` takes these
  from the class map instead (a class is present when it has a kept component).

``answer_texts`` is the pure part (predicted masks and class probabilities -> answer strings), so it can be checked
on ground truth: fed the true masks and one-hot presences it must score 1.0.

Example:
    baseline = InspectionBaseline(BaselineConfig(seg_steps=200)).fit(train_samples)
    predictions = baseline.predict(test_samples, test_instructions)
    metrics = score(test_instructions, predictions)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.core.textgeo import box_to_text, mask_to_box, phrase_to_text
from potpourri.core.training import TrainOptions, autocast, resolve_device
from potpourri.data.instructions import Instruction
from potpourri.data.synth import CLASSES, DEFECTS, SynthSample, location_phrase

__all__ = ["BaselineConfig", "InspectionBaseline", "answer_texts", "component_boxes"]

ANSWER_SOURCES = ("classifier", "segmenter")


@dataclass
class BaselineConfig:
    """Segmenter and classifier settings of the baseline."""

    encoder: str = "efficientnet_lite0"  # frozen backbone of both models
    pretrained: bool = True
    seg_size: int = 128  # the segmenter's working resolution (masks come back at the images' size)
    seg_steps: int = 200
    seg_batch_size: int = 8
    min_pixels: int = 4  # connected components smaller than this (at image size) are noise
    classifier_c: float = 1.0  # inverse L2 strength of the logistic regressions
    threshold: float = 0.5  # a class is present when its probability reaches this
    answers: str = "classifier"  # classifier | segmenter: where yes/no and list answers come from
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# masks -> boxes -> answers (pure functions)


def component_boxes(mask: np.ndarray, min_pixels: int = 4) -> dict[str, tuple[tuple[float, ...], int]]:
    """Per defect class in a class-id map: (box of its kept components, kept pixel count); specks are dropped."""
    out: dict[str, tuple[tuple[float, ...], int]] = {}
    for class_id, name in enumerate(CLASSES):
        if class_id == 0:
            continue
        labels, count = ndimage.label(mask == class_id)
        if not count:
            continue
        sizes = np.bincount(labels.ravel())[1:]  # pixels per component
        keep = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
        if keep.any():
            out[name] = (tuple(mask_to_box(keep)), int(keep.sum()))
    return out


def _location_of(box: Sequence[float], size: tuple[int, int]) -> str:
    center = ((box[1] + box[3]) / 2, (box[0] + box[2]) / 2)  # (row, column), as the generator's centres
    return location_phrase(center, size[1])


def answer_texts(
    instructions: Sequence[Instruction],
    samples: Sequence[SynthSample],
    masks: np.ndarray,
    presence: np.ndarray,
    *,
    min_pixels: int = 4,
    threshold: float = 0.5,
) -> list[str]:
    """Answer strings from predicted class maps ``(N, H, W)`` and class presences ``(N, 6)`` (probabilities)."""
    if len(masks) != len(samples) or len(presence) != len(samples):
        raise PotpourriError(f"{len(masks)} masks and {len(presence)} presences for {len(samples)} samples")
    regions = [component_boxes(m, min_pixels) for m in masks]
    out = []
    for item in instructions:
        i = item.image_index
        sample, found = samples[i], regions[i]
        size = (sample.image.shape[1], sample.image.shape[0])
        present = [name for k, name in enumerate(DEFECTS) if presence[i, k] >= threshold]
        biggest = max(found, key=lambda name: found[name][1]) if found else None
        if item.kind in ("refer", "where"):
            name = item.target["class"]
            box = found[name][0] if name in found else (found[biggest][0] if biggest else None)
            if box is None:
                out.append("")  # nothing segmented: no box, no location (scored as a miss)
            else:
                out.append(box_to_text(box, size) if item.kind == "refer" else _location_of(box, size))
        elif item.kind == "yesno":
            out.append("yes" if item.target["class"] in present else "no")
        elif item.kind == "list":
            out.append(", ".join(present) or "none")
        elif item.kind == "caption":
            out.append(f"a {sample.category} surface with " + " and ".join(f"a {n}" for n in present)
                       if present else f"a clean {sample.category} surface")  # fmt: skip
        elif item.kind == "identify":
            x1, y1, x2, y2 = (round(float(v)) for v in item.target["box"])
            inside = masks[i][y1:y2, x1:x2]
            counts = np.bincount(inside.ravel(), minlength=len(CLASSES))[1:]
            name = DEFECTS[int(counts.argmax())] if counts.any() else DEFECTS[int(np.argmax(presence[i]))]
            out.append(f"a {name}")
        elif item.kind in ("grounding", "detection"):
            names = [n for n in present if n in found] or ([biggest] if biggest and present else [])
            parts = [phrase_to_text(n, [found[n][0]], size) for n in names]
            if item.kind == "detection":
                out.append("<delim>".join(parts) or "none")
            else:
                out.append(f"a {sample.category} surface with " + " and ".join(parts) if parts
                           else f"a clean {sample.category} surface")  # fmt: skip
        else:
            raise PotpourriError(f"the baseline cannot answer instruction kind '{item.kind}'")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the two models


def _images(samples: Sequence[SynthSample]) -> np.ndarray:
    return np.stack([s.image for s in samples])


def _presence_targets(samples: Sequence[SynthSample]) -> np.ndarray:
    """``(N, 6)`` 0/1: defect class visible in the mask (what the instruction generator calls present)."""
    return np.stack([[float((s.mask == CLASSES.index(n)).any()) for n in DEFECTS] for s in samples])


class InspectionBaseline:
    """Segmenter (boxes) + per-class logistic regressions on frozen features (presence), answering as text."""

    def __init__(
        self,
        config: BaselineConfig | None = None,
        *,
        backbone: torch.nn.Module | None = None,
        options: TrainOptions | None = None,
    ) -> None:
        """``options``: the device (and precision) of the frozen features and of the segmenter's training."""
        from potpourri.core.registry import create_model

        self.config = config or BaselineConfig()
        if self.config.answers not in ANSWER_SOURCES:
            raise PotpourriError(f"unknown answer source '{self.config.answers}'; choose {', '.join(ANSWER_SOURCES)}")
        self.options = options or TrainOptions()
        self.device = resolve_device(self.options.device)
        self.encoder = (backbone or create_model(self.config.encoder, pretrained=self.config.pretrained)).eval()
        self._backbone_given = backbone is not None
        self.segmenter = None
        self.classifiers: list = []
        self.seconds: dict[str, float] = {}

    @torch.no_grad()
    def features(self, samples: Sequence[SynthSample], *, batch_size: int = 16) -> np.ndarray:
        """Average- and max-pooled frozen feature maps ``(N, 2C)`` of the images (the encoder's normalisation)."""
        from potpourri.models.vlm import encoder_transform_stats

        mean, std = (torch.tensor(v).view(1, 3, 1, 1).to(self.device) for v in encoder_transform_stats(self.encoder))
        self.encoder.to(self.device)
        chunks = []
        for start in range(0, len(samples), batch_size):
            images = torch.from_numpy(_images(samples[start : start + batch_size])).permute(0, 3, 1, 2).float()
            with autocast(self.device, self.options.precision):
                fmap = self.encoder.forward_features((images.to(self.device) / 255.0 - mean) / std)  # (B, C, h, w)
            fmap = fmap.float()
            chunks.append(torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], dim=1).cpu())
        return torch.cat(chunks).numpy()

    def fit(self, samples: Sequence[SynthSample], *, progress: bool = True) -> InspectionBaseline:
        """Train the segmenter on the samples' masks and one logistic regression per defect class."""
        import copy

        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from potpourri.segment.segmenter import Segmenter, SegmenterConfig

        if not samples:
            raise PotpourriError("no training samples; make some with potpourri.data.synth.make_samples")
        cfg = self.config
        started = time.perf_counter()
        seg_cfg = SegmenterConfig(
            backbone=cfg.encoder, pretrained=cfg.pretrained, image_size=cfg.seg_size, steps=cfg.seg_steps,
            batch_size=cfg.seg_batch_size, encoder="frozen", seed=cfg.seed,
        )  # fmt: skip
        backbone = copy.deepcopy(self.encoder) if self._backbone_given else None
        segmenter = Segmenter(seg_cfg, backbone=backbone)
        self.segmenter = segmenter.fit(
            _images(samples), np.stack([s.mask for s in samples]), progress=progress,
            options=self.options,
        )  # fmt: skip
        self.seconds["segmenter_fit"] = time.perf_counter() - started
        started = time.perf_counter()
        x, y = self.features(samples), _presence_targets(samples)
        self.classifiers = []
        for k in range(len(DEFECTS)):
            if y[:, k].min() == y[:, k].max():  # a class always (or never) present: a constant answer
                self.classifiers.append(float(y[0, k]))
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.classifier_c, max_iter=2000))
            self.classifiers.append(model.fit(x, y[:, k]))
        self.seconds["classifier_fit"] = time.perf_counter() - started
        return self

    def presence(self, samples: Sequence[SynthSample]) -> np.ndarray:
        """Per-image probability ``(N, 6)`` that each defect class is present (the classifier)."""
        if not self.classifiers:
            raise PotpourriError("the baseline is not fitted; call fit(train_samples) first")
        x = self.features(samples)
        columns = [np.full(len(x), c) if isinstance(c, float) else c.predict_proba(x)[:, 1] for c in self.classifiers]
        return np.stack(columns, axis=1)

    def predict(
        self, samples: Sequence[SynthSample], instructions: Sequence[Instruction], *, answers: str | None = None
    ) -> list[str]:
        """Answer strings for instructions about ``samples`` (``item.image_index`` indexes them); ``answers``
        overrides the config's presence source (classifier | segmenter)."""
        if self.segmenter is None:
            raise PotpourriError("the baseline is not fitted; call fit(train_samples) first")
        answers = answers or self.config.answers
        if answers not in ANSWER_SOURCES:
            raise PotpourriError(f"unknown answer source '{answers}'; choose {', '.join(ANSWER_SOURCES)}")
        masks = self.segmenter.predict(_images(samples))
        if answers == "segmenter":
            regions = [component_boxes(m, self.config.min_pixels) for m in masks]
            presence = np.array([[float(n in r) for n in DEFECTS] for r in regions])
        else:
            presence = self.presence(samples)
        return answer_texts(
            instructions, samples, masks, presence, min_pixels=self.config.min_pixels, threshold=self.config.threshold
        )


def run_baseline(cfg: dict[str, Any], out: str | None = None, *, options: TrainOptions | None = None):
    """Fit the non-LLM baseline on the training images, answer the test instructions; returns the ``Run``
    (``options``: device and precision of its features and segmenter)."""
    from potpourri.core.io import atomic_write_bytes
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.papers.vlm_baseline import BaselineConfig, InspectionBaseline
    from potpourri.vlm.train import instruction_data, score, trivial_predictions

    started = time.perf_counter()
    seed_everything(cfg["seed"])
    run = new_run("vlm", out, config=cfg, seed=cfg["seed"])
    samples, instructions = instruction_data(cfg, "train", cfg["n_train"])
    test_samples, test_instructions = instruction_data(cfg, "test", cfg["n_test"], offset_seed=1)
    baseline = InspectionBaseline(BaselineConfig(
        encoder=cfg["encoder"], pretrained=cfg["pretrained"], seg_size=cfg["seg_size"], seg_steps=cfg["seg_steps"],
        min_pixels=cfg["min_pixels"], seed=cfg["seed"],
    ), options=options).fit(samples)  # fmt: skip
    predictions = {source: baseline.predict(test_samples, test_instructions, answers=source)
                   for source in ("classifier", "segmenter")}  # fmt: skip
    lines = [
        json.dumps({"kind": i.kind, "prompt": i.prompt, "answer": i.answer, "classifier": a, "segmenter": b}) + "\n"
        for i, a, b in zip(test_instructions, predictions["classifier"], predictions["segmenter"], strict=True)
    ]
    atomic_write_bytes(run.path / "predictions.jsonl", "".join(lines).encode())
    summary = {
        "model": score(test_instructions, predictions["classifier"]),
        "segmenter_answers": score(test_instructions, predictions["segmenter"]),
        "question_only_baseline": score(test_instructions, trivial_predictions(instructions, test_instructions)),
        "fit_seconds": baseline.seconds,
        "seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return run
