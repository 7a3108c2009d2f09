"""The inspection pipelines behind ``potpourri inspect fit`` and ``inspect predict``: read a folder, fit or load
a method, score, calibrate, write the run folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import find_images, load_rgb
from potpourri.core.runs import Run


def fit_folder(
    *,
    data_spec: str,
    method_name: str,
    config: Any,
    out: str | None = None,
    val_fraction: float = 0.5,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    false_alarm_rate: float = 0.01,
    normal_holdout: float = 0.2,
) -> Run:
    """``potpourri inspect fit``: fit ``method_name`` on the normal images of ``data_spec``, calibrate thresholds and
    evaluate on its test images if any; writes the run folder (metrics, report.html) and returns it.

    Thresholds: F1-max on a labelled validation share of the test images when they hold defects; otherwise (good
    images only) the ``1 - false_alarm_rate`` quantile of scores of ``normal_holdout`` of the training images,
    held out of the fit."""
    import torch

    from potpourri.core.distributed import join
    from potpourri.core.metrics import evaluate, roc_curve
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.folders import read_folder, truth_masks
    from potpourri.inspect.base import method_module
    from potpourri.inspect.patchcore import bank_dtype, memory_budget
    from potpourri.report.html import Report
    from potpourri.report.inspect_plots import inspection_panel_png, roc_curves_png

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    module = method_module(method_name)
    method = module.METHOD(config).to(device, precision)  # an unsupported device fails before the run folder
    if method_name == "patchcore":
        method.features  # noqa: B018  (builds the backbone: a bad name or layer fails before the run folder too)
    group = join(method.device)  # torchrun: every process fits its share, rank 0 writes the run
    try:
        data = group.main_first(lambda: read_folder(data_spec))  # a ds-synth set is generated once, by rank 0
        run = group.main_first(lambda: new_run(
            "inspect", out, config={"verb": "inspect fit", "method": method_name, "data": data_spec, **vars(config)},
            seed=seed,
        ))  # fmt: skip
        notes = [n for n in (_size_note(data.train, config.image_size, "training"),) if n]
        train, normal_held = list(data.train), []
        labelled = bool(data.test) and bool(np.asarray(data.labels).any())
        if not labelled and threshold is None and normal_holdout > 0 and len(train) >= 4:
            order = np.random.default_rng(seed).permutation(len(train))
            n_held = max(2, round(normal_holdout * len(train)))
            normal_held = [train[i] for i in sorted(order[:n_held])]
            train = [train[i] for i in sorted(order[n_held:])]

        start = time.perf_counter()
        method.fit(train)
        fit_s = time.perf_counter() - start
    finally:
        group.destroy()
    if not group.is_main:  # rank 0 calibrates, evaluates and writes alone
        group.after_main_writes()
        return run
    if normal_held:
        from potpourri.inspect.base import calibrate_on_normal

        held_scores, held_maps = method.score(normal_held)
        method.thresholds = calibrate_on_normal(held_scores, held_maps, false_alarm_rate)
        if pixel_threshold is not None:
            method.thresholds.pixel = float(pixel_threshold)
    summary: dict = {
        "method": method_name,
        "layout": data.layout,
        "train_images": method.n_train_images,
        "normal_holdout_images": len(normal_held),
        "world_size": group.world,  # processes the fit ran in (torchrun)
        **(
            {
                "memory_bank_rows": int(method.memory_bank.shape[0]),
                "memory_bank_bytes": method.memory_bank.nelement() * bank_dtype(method.config).itemsize,
                "budget_1000_images": memory_budget(config, 1000, method.grid()),
            }
            if method_name == "patchcore"
            else method.fit_summary()  # zero-shot methods (anomalyclip, winclip): trained on --aux-data only
        ),
        "fit_s": round(fit_s, 3),
        **{k: round(v, 3) for k, v in method.timings.items()},
    }
    report = Report(f"potpourri inspect fit: {method_name} on {data_spec}")
    if data.test:
        labels = np.array(data.labels)
        notes += [n for n in (_size_note(data.test, config.image_size, "test"),) if n]
        start = time.perf_counter()
        scores, maps = method.score(data.test)
        summary["test_images"] = len(data.test)
        summary["predict_images_per_s"] = round(len(data.test) / (time.perf_counter() - start), 2)
        masks, mask_notes = truth_masks(data, config.image_size)
        evaluation = evaluate(labels, scores, masks, maps)
        val, held_out, split_note = _validation_split(labels, val_fraction, seed)
        if labelled or not normal_held:
            method.calibrate(
                scores[val],
                labels[val],
                maps[val],
                None if masks is None else masks[val],
                image_threshold=threshold,
                pixel_threshold=pixel_threshold,
            )
        else:
            held_out = np.arange(len(labels))  # calibrated on training images: every test image is held out
            split_note = None
        notes += mask_notes + list(evaluation.notes) + [n for n in (split_note,) if n]
        summary["metrics"] = {k: v for k, v in evaluation.as_dict().items() if k != "notes"}
        summary["held_out_at_threshold"] = _threshold_metrics(
            labels[held_out], scores[held_out], method.thresholds.image
        )
        run.log_metrics({"split": "test", **summary["metrics"]})
    else:
        notes.append("no labelled test set (test/<defect> folders): metrics not computed")
        if not normal_held:
            method.calibrate(np.array([]), np.array([]), image_threshold=threshold, pixel_threshold=pixel_threshold)
    method.notes = notes + method.thresholds.notes
    method.save(run.path)
    summary["thresholds"] = vars(method.thresholds)
    summary["notes"] = method.notes
    run.write_summary(summary)

    report.section("Summary")
    report.table([{"quantity": k, "value": v} for k, v in summary.items() if not isinstance(v, dict | list)])
    if "metrics" in summary:
        report.section("Test metrics (all test images, threshold-free)")
        report.table([{"metric": k, "value": v} for k, v in summary["metrics"].items()])
        report.section("At the calibrated threshold (held-out test images)")
        report.table([{"quantity": k, "value": v} for k, v in summary["held_out_at_threshold"].items()])
        if labels.any() and not labels.all():
            fpr, tpr, _ = roc_curve(scores.astype(np.float64), labels.astype(float), 1.0 - labels)
            curves = {"image": (fpr, tpr, summary["metrics"]["image_auroc"])}
            report.image(roc_curves_png(curves, run.images / "roc.png"), "image-level ROC")
        report.section("Hardest examples", "Highest-scoring normal images and lowest-scoring defect images.")
        vmin, vmax = float(maps.min()), float(maps.max())
        good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
        hardest = list(good[np.argsort(-scores[good])][:3]) + list(bad[np.argsort(scores[bad])][:3])
        results = method.results(scores, maps)
        for index in hardest:
            panel = inspection_panel_png(
                _rgb_at(data.test[index], config.image_size),
                maps[index],
                run.images / f"test_{index:03d}.png",
                mask=results[index].mask,
                truth=None if masks is None else masks[index],
                vmin=vmin,
                vmax=vmax,
                title=f"{data.test[index].parent.name}/{data.test[index].name}: score {scores[index]:.3f}",
            )
            report.image(panel, f"{data.test[index].parent.name}/{data.test[index].name}")
    report.section("Thresholds", f"image {method.thresholds.image}, pixel {method.thresholds.pixel}")
    report.text(f"source: {method.thresholds.source}", note=True)
    for note in method.notes:
        report.text(note, note=True)
    report.write(run.path / "report.html")
    metrics = summary.get("metrics", {})
    line = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("image_auroc", "pixel_auroc", "aupro"))
    print(f"fitted {method_name} on {method.n_train_images} images in {fit_s:.1f} s{': ' + line if line else ''}")
    for note in method.notes:
        print(f"note: {note}")
    print(f"run: {run.path}")
    group.after_main_writes()
    return run


PREDICTION_FIELDS = [
    "image", "score", "normalised", "label", "image_threshold", "defect_fraction", "width", "height", "mask",
]  # fmt: skip


def predict_images(
    *,
    run_dir: str | Path,
    images: list[str],
    out: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    resume: bool = False,
    top_k: int = 16,
    max_overlays: int = 100,
    progress: bool = True,
) -> Run:
    """``potpourri inspect predict``: score any number of images with a fitted run, streamed in batches (bounded
    memory, a progress bar): ``predictions.csv`` grows batch by batch (``resume`` continues a killed run in ``out``
    with the same CSV), masks are written per image, overlays only for the ``top_k`` scores and up to
    ``max_overlays`` flagged images; report.html. Returns the run (default RUN/predict/vN)."""
    import heapq

    import torch
    import yaml

    from potpourri.core.distributed import join, rows_in_parts
    from potpourri.core.runs import Run, new_run
    from potpourri.inspect.base import load_method
    from potpourri.report.html import Report
    from potpourri.report.inspect_plots import inspection_panel_png

    if threads:
        torch.set_num_threads(threads)
    method = load_method(run_dir).to(device, precision)
    paths = find_images(images)
    size = method.config.image_size
    batch = int(getattr(method.config, "batch_size", 8))
    group = join(method.device)
    config = {"verb": "inspect predict", "run": str(run_dir), "images": [str(p) for p in paths], "batch_size": batch,
              "world_size": group.world}  # fmt: skip

    def open_run() -> Run:
        if not resume:
            return new_run("predict", out, root=run_dir, config=config)
        if out is None or not (Path(out) / "config.yaml").is_file():
            raise PotpourriError("--resume needs --out DIR of an earlier `inspect predict`")
        before = yaml.safe_load((Path(out) / "config.yaml").read_text())
        if {k: before.get(k, 1 if k == "world_size" else None) for k in config} != config:
            raise PotpourriError(
                f"'{out}' predicted other images, another run, batch size or number of processes; start a new --out"
            )
        return Run(Path(out))

    try:
        run = group.main_first(open_run)
        notes = [n for n in (_size_note(paths, size, "input"),) if n]
        if not method.thresholds.calibrated:
            notes.append("the run has no calibrated threshold: no labels or masks (refit with --threshold)")
        masks_dir = run.path / "masks"
        masks_dir.mkdir(exist_ok=True)
        threshold = "" if method.thresholds.image is None else method.thresholds.image

        counted = [0]  # images this process scored (a resumed run skips some)

        def score(first: int, stop: int) -> list[dict]:
            counted[0] += stop - first
            rows = []
            for index, path, result in zip(range(first, stop), paths[first:stop], method.predict(paths[first:stop]),
                                           strict=True):  # fmt: skip
                with Image.open(path) as img:
                    width, height = img.size
                mask_png = ""
                if result.mask is not None:  # maps are at the model size; masks go back to the image's own size
                    mask = Image.fromarray(result.mask.astype(np.uint8) * 255)
                    mask_png = f"masks/{index:05d}_{path.stem}_mask.png"
                    mask.resize((width, height), Image.Resampling.NEAREST).save(run.path / mask_png)
                rows.append({
                    "image": str(path), "score": result.score, "width": width, "height": height, "mask": mask_png,
                    "normalised": "" if result.normalised is None else result.normalised,
                    "label": "" if result.label is None else ("defect" if result.label else "good"),
                    "image_threshold": threshold,
                    "defect_fraction": "" if result.mask is None else float(result.mask.mean()),
                })  # fmt: skip
            return rows

        start = time.perf_counter()
        rows = rows_in_parts(group, run.path / "predictions.csv", [str(p) for p in paths], score, batch_size=batch,
                             fieldnames=PREDICTION_FIELDS, progress=progress)  # fmt: skip
        scored = counted[0] * group.world  # rank 0's block is about 1/world of the job
    finally:
        group.destroy()
    if not group.is_main:  # rank 0 writes the summary, overlays and report
        group.after_main_writes()
        return run
    seconds = time.perf_counter() - start

    # overlays for the highest scores and the flagged images only: re-scored, so no map was kept in memory
    top = heapq.nlargest(top_k, range(len(rows)), key=lambda i: float(rows[i]["score"]))
    flagged = sorted((i for i, r in enumerate(rows) if r["label"] == "defect"), key=lambda i: -float(rows[i]["score"]))
    chosen = list(dict.fromkeys(top + flagged[:max_overlays]))
    panels = []
    if chosen:
        results = method.predict([paths[i] for i in chosen])
        vmin = min(float(r.anomaly_map.min()) for r in results)
        vmax = max(float(r.anomaly_map.max()) for r in results)
        for index, result in zip(chosen, results, strict=True):
            original = load_rgb(paths[index])
            full_map = np.asarray(Image.fromarray(result.anomaly_map).resize(original.size, Image.Resampling.BILINEAR))
            mask = (
                None
                if result.mask is None
                else np.asarray(
                    Image.fromarray(result.mask.astype(np.uint8)).resize(original.size, Image.Resampling.NEAREST)
                )
                > 0
            )
            panel = inspection_panel_png(
                np.asarray(original), full_map, run.images / f"{index:05d}_{paths[index].stem}_overlay.png",
                mask=mask, vmin=vmin, vmax=vmax, title=f"{paths[index].name}: score {result.score:.3f}",
            )  # fmt: skip
            panels.append((panel, paths[index].name))
    summary = {
        "images": len(paths),
        "flagged": len(flagged),
        "images_per_s": scored / seconds if seconds > 0 and scored else None,
        "overlays": [str(p.relative_to(run.path)) for p, _ in panels],
        "notes": notes,
    }
    run.write_summary(summary)
    report = Report(f"potpourri inspect predict: {len(paths)} images")
    report.section("Model", f"run {run_dir}; method {method.name}; threshold {method.thresholds.image}")
    for note in notes + method.notes:
        report.text(note, note=True)
    ranked = sorted(rows, key=lambda r: -float(r["score"]))
    report.section("Highest scores", f"{len(flagged)} of {len(paths)} images flagged; all rows in predictions.csv")
    report.table([{k: r[k] for k in ("image", "score", "label", "defect_fraction")} for r in ranked[:200]])
    report.section("Overlays", f"top {top_k} scores and up to {max_overlays} flagged images; one colour scale")
    for panel, caption in panels:
        report.image(panel, caption)
    report.write(run.path / "report.html")
    for row in rows[:20]:
        label = f" {row['label']}" if row["label"] else ""
        print(f"{row['image']}: score {float(row['score']):.4f}{label}")
    if len(rows) > 20:
        print(f"... {len(rows) - 20} more rows in {run.path / 'predictions.csv'}")
    for note in notes:
        print(f"note: {note}")
    print(f"report: {run.path / 'report.html'}")
    group.after_main_writes()
    return run


def _size_note(paths: list[Path], size: int, what: str) -> str | None:
    sizes = {}
    for path in paths:
        with Image.open(path) as img:
            sizes[img.size] = sizes.get(img.size, 0) + 1
    if set(sizes) == {(size, size)}:
        return None
    listed = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items())[:4])
    return f"{what} images were resized to {size}x{size} (found {listed})"


def _validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Stratified seeded split of test indices into (validation, held-out); all-in-validation when too small."""
    rng = np.random.default_rng(seed)
    val, rest = [], []
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = round(fraction * len(members))
        val.extend(members[:cut])
        rest.extend(members[cut:])
    if not (labels[val].any() and (~labels[val].astype(bool)).any() and labels[rest].any()):
        everything = np.arange(len(labels))
        note = "test set too small to hold out validation images: threshold calibrated on the whole test set"
        return everything, everything, note
    return np.sort(val), np.sort(rest), None


def _threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
    if threshold is None:
        return {}
    predicted = scores >= threshold
    tp, fp = int((predicted & (labels == 1)).sum()), int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1, "false_positives": fp, "false_negatives": fn}


def _rgb_at(path: Path, size: int) -> np.ndarray:
    return np.asarray(load_rgb(path).resize((size, size), Image.Resampling.BICUBIC))
