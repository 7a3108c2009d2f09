"""``potpourri reproduce defect-gen``: does synthetic defect data lift few-shot defect segmentation? (Defect Spectrum)

The talk's claim: training a segmenter on real + Defect-Gen synthetic images raises mIoU (MVTec 51.58 → 55.55).
Here at CPU scale on DS-Synth: each seed draws N real defect images (all six classes and "multi") and a few
defect-free images from the category's training region; three arms train the same segmenter for the same number
of steps on

* ``real``: the N real images (+ the defect-free ones),
* ``real + copy-paste``: plus M images made by pasting the real defect regions onto the defect-free images,
* ``real + defect-gen-lite``: plus M images sampled from ``potpourri.segment.defectgen.DefectGenLite`` trained on
  the same N real images (skipped, with a note, when that module is not installed).

Generators see only the N real images and the defect-free images of their seed, never DS-Synth's generator, so the
experiment is not circular. Test images come from the photo's held-out rows. mIoU is over the six defect classes
(background IoU is reported apart: it is near 1 and hides differences); mean ± std over seeds, and the mean of the
per-seed paired differences against ``real``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions
from potpourri.report.tables import markdown_table

__all__ = ["GENERATORS", "DefectGenExperimentConfig", "make_generator", "reproduce_defectgen", "run"]

# generator name -> "module:class:config class" (imported only when its arm runs)
GENERATORS: dict[str, str] = {
    "copy-paste": "potpourri.segment.copypaste:CopyPaste:CopyPasteConfig",
    "defect-gen-lite": "potpourri.segment.defectgen:DefectGenLite:DefectGenConfig",
}


@dataclass
class DefectGenExperimentConfig:
    """Data sizes, arms, seeds and the shared segmenter budget; the defaults aim at ~20 min on 2 cores."""

    category: str = "brick"
    image_size: int = 64
    real_per_kind: int = 2  # N = real_per_kind x 7 kinds (six defect classes and "multi")
    n_normal: int = 7  # defect-free training images, seen by every arm and every generator
    n_synthetic: int = 42  # M images per generator
    pool_per_kind: int = 6  # each seed draws its real images from this many per kind (train region)
    test_per_kind: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    generators: tuple[str, ...] = ("copy-paste", "defect-gen-lite")
    encoder: str = "full"
    steps: int = 300
    batch_size: int = 8
    generator_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> config overrides


def make_generator(name: str, options: dict[str, Any] | None = None) -> Any:
    """Build a registered generator; ``options`` fill its config dataclass (keys it lacks are ignored)."""
    if name not in GENERATORS:
        raise PotpourriError(f"unknown generator '{name}'; choose from {', '.join(GENERATORS)}")
    module_name, class_name, config_name = GENERATORS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise PotpourriError(f"generator '{name}' needs {module_name}, which is not in this potpourri") from None
    config_cls = getattr(module, config_name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    generator_cls = getattr(module, class_name)
    config = config_cls(**{k: v for k, v in (options or {}).items() if k in known})
    return generator_cls(config)


def _available(name: str) -> bool:
    module_name = GENERATORS[name].split(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def _real_split(cfg: DefectGenExperimentConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed's N real defect images, their masks and the defect-free images, all from the training rows."""
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    kinds = (*DEFECTS, MULTI)
    pool = make_samples(cfg.category, "train", cfg.pool_per_kind * len(kinds), size=cfg.image_size, kinds=kinds)
    good = make_samples(cfg.category, "train", 3 * cfg.n_normal, size=cfg.image_size, kinds=("good",))
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in kinds:
        members = [s for s in pool if s.kind == kind]
        chosen += [members[i] for i in rng.choice(len(members), cfg.real_per_kind, replace=False)]
    normals = [good[i] for i in rng.choice(len(good), cfg.n_normal, replace=False)]
    images = np.stack([s.image for s in chosen])
    masks = np.stack([s.mask for s in chosen]).astype(np.int64)
    return images, masks, np.stack([s.image for s in normals])


def _summarise(rows: list[dict[str, Any]], class_names: list[str]) -> list[dict[str, Any]]:
    """Mean ± std per arm over seeds, and the paired per-seed difference of defect mIoU against ``real``."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = {r["seed"]: r["miou_defects"] for r in rows if r["arm"] == "real"}
    table = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        values = [r["miou_defects"] for r in mine]
        deltas = [r["miou_defects"] - base[r["seed"]] for r in mine if r["seed"] in base]
        entry = {
            "arm": arm,
            "seeds": len(mine),
            "train_images": mine[0]["train_images"],
            "miou_mean": statistics.fmean(values),
            "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "delta_mean": statistics.fmean(deltas) if deltas else float("nan"),
            "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "background_iou": statistics.fmean(r["iou_good"] for r in mine),
            "wins": sum(d > 0 for d in deltas),
        }
        for name in class_names[1:]:
            entry[f"iou_{name}"] = float(np.nanmean([r[f"iou_{name}"] for r in mine]))
        table.append(entry)
    return table


def _markdown(table: list[dict[str, Any]], class_names: list[str]) -> str:
    header = ["arm", "train images", "defect mIoU (mean ± std)", "Δ vs real (paired, mean ± std)", "seeds better",
              "bg IoU"]  # fmt: skip
    rows = []
    for r in table:
        real = r["arm"] == "real"
        rows.append([
            r["arm"], r["train_images"], f"{r['miou_mean']:.3f} ± {r['miou_std']:.3f}",
            "—" if real else f"{r['delta_mean']:+.3f} ± {r['delta_std']:.3f}",
            "—" if real else f"{r['wins']}/{r['seeds']}", f"{r['background_iou']:.3f}",
        ])  # fmt: skip
    names = class_names[1:]
    per_class = [[r["arm"], *(f"{r[f'iou_{n}']:.3f}" for n in names)] for r in table]
    return "\n".join(
        [
            markdown_table(header, rows),
            "",
            "Per-class IoU (mean over seeds):",
            "",
            markdown_table(["arm", *names], per_class),
        ]
    )


def reproduce_defectgen(
    cfg: DefectGenExperimentConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    options: TrainOptions | None = None,
) -> Run:
    """Run every arm for every seed; writes metrics.csv, summary.json, results.md and report.html.

    ``options`` (device, precision) reach every generator and segmenter whose training takes an ``options`` keyword.

    Example:
        run = reproduce_defectgen(DefectGenExperimentConfig(steps=300))
        print((run.path / "results.md").read_text())
    """
    from potpourri.data.synth import CLASSES, DEFECTS, MULTI, make_samples
    from potpourri.report.html import Report
    from potpourri.report.plots import image_grid_png
    from potpourri.segment.segmenter import SegmenterConfig, colour_mask, segmentation_panels_png, train_segmenter

    cfg = cfg or DefectGenExperimentConfig()
    started = time.perf_counter()
    run = new_run("reproduce-defect-gen", out, config=asdict(cfg), seed=cfg.seeds[0])
    class_names = list(CLASSES)
    notes: list[str] = []
    generators = []
    for name in cfg.generators:
        if _available(name):
            generators.append(name)
        else:
            notes.append(f"arm 'real + {name}' skipped: {GENERATORS[name].split(':')[0]} is not in this potpourri")
    kinds = (*DEFECTS, MULTI)
    test = make_samples(cfg.category, "test", cfg.test_per_kind * len(kinds), size=cfg.image_size, kinds=kinds)
    test_images = np.stack([s.image for s in test])
    test_masks = np.stack([s.mask for s in test]).astype(np.int64)
    seg_cfg = SegmenterConfig(
        image_size=cfg.image_size, encoder=cfg.encoder, steps=cfg.steps, batch_size=cfg.batch_size
    )
    rows: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}
    generator_configs: dict[str, dict[str, Any]] = {}
    examples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    predictions: dict[str, np.ndarray] = {}
    jobs = [(seed, arm) for seed in cfg.seeds for arm in ("real", *generators)]
    bar = tqdm(jobs, desc="defect-gen arms", unit="arm")
    for seed, arm in bar:
        bar.set_postfix(seed=seed, arm=arm)
        real_images, real_masks, normals = _real_split(cfg, seed)
        train_images = np.concatenate([real_images, normals])
        train_masks = np.concatenate([real_masks, np.zeros(normals.shape[:3], np.int64)])
        row: dict[str, Any] = {"seed": seed, "arm": "real" if arm == "real" else f"real + {arm}"}
        row.update(generator_s="", synthetic_defect_fraction="")  # metrics.csv takes its columns from the first row
        if arm != "real":
            start = time.perf_counter()
            # the generator gets copies of the N real images and the defect-free ones: nothing else
            overrides = {
                "image_size": cfg.image_size,
                "num_classes": len(class_names),
                "seed": seed,
                "progress": False,
                **cfg.generator_options.get(arm, {}),
            }
            generator = make_generator(arm, overrides)
            generator_configs.setdefault(arm, dataclasses.asdict(generator.config))
            generator.fit(real_images.copy(), real_masks.copy(), normals=normals.copy(), options=options)
            fake_images, fake_masks = generator.sample(cfg.n_synthetic, seed=seed)
            seconds = time.perf_counter() - start
            timings.setdefault(arm, []).append(seconds)
            fake_images, fake_masks = np.asarray(fake_images), np.asarray(fake_masks)
            if (
                fake_images.shape != (cfg.n_synthetic, *real_images.shape[1:])
                or fake_masks.shape != fake_images.shape[:3]
            ):
                raise PotpourriError(
                    f"generator '{arm}' returned images {fake_images.shape} and masks {fake_masks.shape}; expected "
                    f"({cfg.n_synthetic}, {cfg.image_size}, {cfg.image_size}, 3) uint8 and matching masks"
                )
            examples.setdefault(arm, (fake_images[:6], fake_masks[:6]))
            train_images = np.concatenate([train_images, fake_images.astype(np.uint8)])
            train_masks = np.concatenate([train_masks, fake_masks.astype(np.int64)])
            row["generator_s"] = seconds
            row["synthetic_defect_fraction"] = float((fake_masks > 0).mean())
        seed_everything(seed)
        segmenter = train_segmenter(
            train_images, train_masks, dataclasses.replace(seg_cfg, seed=seed), progress=False,
            options=options,
        )  # fmt: skip
        metrics = segmenter.evaluate(test_images, test_masks)
        predictions.setdefault(row["arm"], segmenter.predict(test_images[: len(kinds)]))
        row.update(
            train_images=len(train_images),
            train_s=segmenter.metrics["train_s"],
            miou_defects=metrics["miou_defects"],
            miou_all=metrics["miou"],
            **{f"iou_{k}": v for k, v in metrics["per_class_iou"].items()},
        )
        run.log_metrics(row)
        rows.append(row)
    table = _summarise(rows, class_names)
    markdown = _markdown(table, class_names)
    seconds = time.perf_counter() - started
    real_n = cfg.real_per_kind * len(kinds)
    header = (
        f"DS-Synth `{cfg.category}` at {cfg.image_size} px: N = {real_n} real defect images ({cfg.real_per_kind} per "
        f"kind: six classes and multi) + {cfg.n_normal} defect-free images per seed, M = {cfg.n_synthetic} synthetic "
        f"images per generator; segmenter EfficientNet-Lite0 ({cfg.encoder} encoder) + UNet decoder, "
        f"{cfg.steps} AdamW steps of batch {cfg.batch_size} in every arm; test: {len(test)} images from the photo's "
        f"held-out rows; seeds {list(cfg.seeds)}. mIoU over the six defect classes. The generators were fitted only "
        "on each seed's N real images (and its defect-free images), never on DS-Synth's procedural generator."
    )
    gen_times = "; ".join(f"{k} fit+sample {statistics.fmean(v):.0f} s per seed" for k, v in timings.items())
    footer = [
        *notes,
        f"Total {seconds:.0f} s on {torch.get_num_threads()} thread(s){'; ' + gen_times if gen_times else ''}.",
    ]
    (run.path / "results.md").write_text(header + "\n\n" + markdown + "\n" + "".join(f"\n- {n}" for n in footer) + "\n")
    run.write_summary(
        {
            "table": table,
            "runs": rows,
            "generator_seconds": timings,
            "generator_configs": generator_configs,
            "notes": notes,
            "seconds": seconds,
            "latency": segmenter.latency_ms(),
        }
    )
    report = Report("potpourri reproduce defect-gen")
    report.section("Few real images vs real + synthetic defects", header)
    report.code(markdown)
    for note in notes:
        report.text(note, note=True)
    for arm, (images, masks) in examples.items():
        tiles = [t for image, mask in zip(images, masks, strict=True) for t in (image, colour_mask(mask))]
        caps = [c for i in range(len(images)) for c in (f"{arm} {i}", "mask")]
        report.section(f"Synthetic samples: {arm} (seed {cfg.seeds[0]})")
        report.image(image_grid_png(tiles, caps, run.images / f"samples_{arm}.png", columns=6))
    report.section("Test predictions (seed " + str(cfg.seeds[0]) + ")", "image | ground truth | prediction")
    shown = test_images[: len(kinds)], test_masks[: len(kinds)]  # one test image of each kind
    for arm, pred in predictions.items():
        path = segmentation_panels_png(
            shown[0], pred, run.images / f"pred_{arm.replace(' + ', '_')}.png", truth=shown[1]
        )
        report.image(path, arm)
    report.text(f"Total {seconds:.0f} s.", note=True)
    report.write(run.path / "report.html")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce defect-gen``: the full experiment, or a seconds-long smoke run of the same code path."""
    cfg = DefectGenExperimentConfig()
    if quick:  # same code path, minutes -> seconds, numbers not meaningful
        cfg = DefectGenExperimentConfig(
            real_per_kind=1,
            n_normal=2,
            n_synthetic=4,
            pool_per_kind=2,
            test_per_kind=1,
            seeds=(0, 1, 2),
            steps=3,
            batch_size=4,
            generator_options={
                "defect-gen-lite": {"train_steps": 4, "global_width": 8, "local_width": 8, "sample_steps": 2}
            },
        )
    return reproduce_defectgen(cfg, out=out, options=options)
