"""``potpourri reproduce ssprompt``: SSPrompt-style learned class prompts for a frozen small SAM vs the best single
click vs a supervised segmenter, on DS-Synth regions.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potpourri.core.training import TrainOptions, autocast
from potpourri.report.tables import markdown_table
from potpourri.segment.sam_prompt import (
    LearnedPrompt,
    PromptConfig,
    image_embeddings,
    learn_prompt,
    load_or_pretrain_sam,
    segment_with_prompt,
)


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class SSPromptConfig:
    """The DS-Synth experiment: a small SAM pretrained with random prompts, then one learned prompt per class."""

    category: str = "brick"  # prompts are learned and tested on this texture
    image_size: int = 96
    sam_per_category: int = 150  # SAM pretraining images per texture (brick, grass, gravel; training rows)
    sam_steps: int = 2000
    train_per_class: int = 16  # prompt / segmenter training images of one class each, plus ``train_multi``
    train_multi: int = 32
    test_per_class: int = 8  # held-out rows, plus ``test_multi`` images with 2–3 defects
    test_multi: int = 24
    prompt_steps: int = 300
    segmenter_steps: int = 400
    segmenter_encoder: str = "frozen"  # the SAM's image encoder is frozen too
    seed: int = 0


def _class_data(category: str, split: str, per_class: int, multi: int, size: int, seed: int):
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    samples = make_samples(category, split, per_class * len(DEFECTS), seed=seed, size=size, kinds=DEFECTS)
    samples += make_samples(category, split, multi, seed=seed, size=size, kinds=(MULTI,))
    return np.stack([s.image for s in samples]), np.stack([s.mask for s in samples]).astype(np.int64)


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred & target).sum() / max(1, (pred | target).sum()))


def _regions_of(masks: np.ndarray, class_id: int, min_pixels: int = 16) -> list[int]:
    return [i for i, m in enumerate(masks) if (m == class_id).sum() >= min_pixels]


def _markdown(rows: list[dict[str, Any]], arms: list[str]) -> str:
    cells = [[r["class"], r["regions"], *(f"{r[a]:.3f}" for a in arms)] for r in rows]
    return markdown_table(["class", "test regions", *arms], cells)


def run_ssprompt_experiment(
    config: SSPromptConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    progress: bool = True,
    options: TrainOptions | None = None,
):
    """Pretrain (or load) the small SAM, learn one prompt per defect class, compare with clicks and a segmenter.

    Writes summary.json, metrics.csv, results.md, prompts.safetensors and the SAM (``sam/``) into the run folder.
    ``options``: device and precision of the SAM and the prompts, checkpoints (``<run>/checkpoints/<phase>``), and
    resuming the run in ``out`` (finished phases are restored, not retrained; the segmenter retrains).
    """
    from potpourri.core.io import save_state_dict_atomic
    from potpourri.core.runs import new_run
    from potpourri.data.synth import CLASSES, DEFECTS
    from potpourri.segment.sam import centre_click, check_resumable, predict_mask
    from potpourri.segment.segmenter import SegmenterConfig, train_segmenter

    cfg = config or SSPromptConfig()
    options = options or TrainOptions(progress=progress)
    check_resumable(out, options)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = new_run(
        "ssprompt", out, config={**asdict(cfg), "sam_path": str(sam_path) if sam_path else None}, seed=cfg.seed
    )
    timings: dict[str, float] = {}

    # 1. the "pretrained" SAM: trained once with random clicks and boxes, then frozen
    checkpoints = run.path / "checkpoints"
    sam = load_or_pretrain_sam(sam_path, cfg, run.path / "sam", options=options, checkpoints=checkpoints / "sam")
    device = sam.pixel_mean.device
    frozen = {k: v.clone() for k, v in sam.state_dict().items()}
    timings["sam_s"] = time.perf_counter() - started

    # 2. the category's training and held-out images (one class each, plus multi-defect images)
    train_x, train_y = _class_data(cfg.category, "train", cfg.train_per_class, cfg.train_multi, cfg.image_size,
                                   cfg.seed)  # fmt: skip
    test_x, test_y = _class_data(cfg.category, "test", cfg.test_per_class, cfg.test_multi, cfg.image_size, cfg.seed)
    train_emb, test_emb = image_embeddings(sam, train_x), image_embeddings(sam, test_x)
    test_features = sam.backbone_features(test_x)

    # 3. the supervised segmenter on the same training images
    t0 = time.perf_counter()
    segmenter = train_segmenter(train_x, train_y, SegmenterConfig(image_size=cfg.image_size, steps=cfg.segmenter_steps,
                                encoder=cfg.segmenter_encoder, seed=cfg.seed), progress=options.progress)  # fmt: skip
    seg_pred = segmenter.predict(test_x)
    timings["segmenter_s"] = time.perf_counter() - t0

    # 4. one learned prompt per class, in embedding space (SSPrompt) and in coordinate space (the 2-D baseline)
    learned = [("SSPrompt, dense map (0 clicks)", "embedding", True),
               ("SSPrompt, dense vector (0 clicks)", "embedding", False),
               ("learned click coords (0 clicks)", "coordinates", True)]  # fmt: skip
    arms = [a for a, _, _ in learned] + ["untrained prompt (centre of image)", "oracle centre click (1 click)",
                                         "supervised segmenter"]  # fmt: skip
    rows, per_region, prompts, curves, train_iou = [], {a: [] for a in arms}, {}, {}, {}
    t0 = time.perf_counter()
    for class_id, name in enumerate(CLASSES):
        if name not in DEFECTS:
            continue
        train_idx, test_idx = _regions_of(train_y, class_id), _regions_of(test_y, class_id)
        if not train_idx or not test_idx:
            continue
        targets = train_y[train_idx] == class_id
        scores: dict[str, list[float]] = {a: [] for a in arms}
        truth = test_y[test_idx] == class_id
        centre = LearnedPrompt(sam.prompt_encoder)  # built outside autocast: its parameters stay fp32
        with autocast(device, options.precision):
            untrained = segment_with_prompt(sam, centre, test_emb[test_idx])
        for arm, mode, dense_map in learned:
            key = f"{name}.{mode}" + ("" if dense_map else "-vector")
            prompt, losses = learn_prompt(sam, train_emb[train_idx], targets, PromptConfig(mode=mode,
                                          dense_map=dense_map, steps=cfg.prompt_steps, seed=cfg.seed),
                                          options=options, checkpoints=checkpoints / f"prompt-{key}")  # fmt: skip
            with autocast(device, options.precision):
                pred = segment_with_prompt(sam, prompt, test_emb[test_idx])
                fit = segment_with_prompt(sam, prompt, train_emb[train_idx])  # training-image IoU: over/underfit?
            scores[arm] = [_iou(p, t) for p, t in zip(pred, truth, strict=True)]
            train_iou[key] = float(np.mean([_iou(p, t) for p, t in zip(fit, targets, strict=True)]))
            curves[key] = (float(np.mean(losses[:20])), float(np.mean(losses[-20:])))
            prompts.update({f"{key}.{k}": v.cpu() for k, v in prompt.state_dict().items()})
        scores["untrained prompt (centre of image)"] = [_iou(p, t) for p, t in zip(untrained, truth, strict=True)]
        for j, region in zip(test_idx, truth, strict=True):
            click = {"points": centre_click(region)[None], "labels": np.array([1])}
            with autocast(device, options.precision):
                pred = predict_mask(sam, test_features[j : j + 1], click)  # best-predicted of SAM's 3 masks
            scores["oracle centre click (1 click)"].append(_iou(pred, region))
            scores["supervised segmenter"].append(_iou(seg_pred[j] == class_id, region))
        row = {"class": name, "regions": len(test_idx), "train_images": len(train_idx)}
        row |= {a: float(np.mean(v)) for a, v in scores.items()}
        rows.append(row)
        for a in arms:
            per_region[a] += scores[a]
        run.log_metrics(row)
    timings["prompts_s"] = time.perf_counter() - t0
    unchanged = all(torch.equal(frozen[k], v) for k, v in sam.state_dict().items())
    rows.append({"class": "mean over classes", "regions": sum(r["regions"] for r in rows),
                 **{a: float(np.mean([r[a] for r in rows])) for a in arms}})  # fmt: skip
    rows.append({"class": "mean over regions", "regions": len(per_region[arms[0]]),
                 **{a: float(np.mean(v)) for a, v in per_region.items()}})  # fmt: skip
    save_state_dict_atomic(prompts, run.path / "prompts.safetensors", metadata={"format": "potpourri-ssprompt-v1"})
    timings["total_s"] = time.perf_counter() - started
    summary = {"rows": rows, "sam_unchanged": unchanged, "loss_first_last": curves, "train_iou": train_iou,
               "timings": {k: round(v, 1) for k, v in timings.items()}}  # fmt: skip
    run.write_summary(summary)
    table = _markdown(rows, arms)
    header = (
        f"SSPrompt on DS-Synth {cfg.category} at {cfg.image_size} px: IoU per held-out region of each defect class "
        f"(frozen small SAM; SAM unchanged after prompt learning: {unchanged}); {timings['total_s']:.0f} s."
    )
    Path(run.path / "results.md").write_text(header + "\n\n" + table + "\n")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce ssprompt``: the full experiment, or a seconds-long smoke run of the same code path;
    ``options`` (a ``core.training.TrainOptions``: device, precision) reach ``run_ssprompt_experiment``."""

    cfg = SSPromptConfig()
    if quick:  # same code path, minutes -> seconds, numbers not meaningful
        cfg = SSPromptConfig(image_size=64, sam_per_category=3, sam_steps=3, train_per_class=1, train_multi=2,
                             test_per_class=1, test_multi=2, prompt_steps=3, segmenter_steps=3)  # fmt: skip
    return run_ssprompt_experiment(cfg, out=out, progress=False, options=options)
