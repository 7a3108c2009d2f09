"""``potpourri demo``: the offline end-to-end job behind ``make demo``.

Builds a small labelled image set from real photos that ship with scikit-image, extracts features with the
pretrained EfficientNet-Lite0, trains a linear probe and writes ``report.html``. Later issues add sections.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from potpourri.data.transforms import eval_transform
from potpourri.registry import create_model, get_pretrained_cfg
from potpourri.report.html import Report
from potpourri.report.plots import confusion_matrix_png, image_grid_png
from potpourri.runs import Run, new_run, seed_everything

__all__ = ["LabelledImages", "extract_features", "run_demo", "texture_dataset"]

# Texture-like greyscale photos bundled with scikit-image (no download needed).
TEXTURE_PHOTOS = ("brick", "grass", "gravel", "moon")


@dataclass
class LabelledImages:
    """Images (N, H, W, 3) uint8 with integer labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def texture_dataset(
    split: str, *, per_class: int, size: int = 128, seed: int = 0, photos: tuple[str, ...] = TEXTURE_PHOTOS
) -> LabelledImages:
    """Random crops of real texture photos, one class per photo; train crops come from the left 60 %, test from
    the right 40 % of each photo, so the two never share a pixel."""
    from skimage import data

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, labels = [], []
    for label, name in enumerate(photos):
        photo = getattr(data, name)()  # (H, W) uint8
        cut = int(photo.shape[1] * 0.6)
        region = photo[:, :cut] if split == "train" else photo[:, cut:]
        for _ in range(per_class):
            top = rng.integers(0, region.shape[0] - size + 1)
            left = rng.integers(0, region.shape[1] - size + 1)
            crop = np.rot90(region[top : top + size, left : left + size], k=int(rng.integers(4)))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            images.append(np.repeat(crop[..., None], 3, axis=2))
            labels.append(label)
    return LabelledImages(np.stack(images), np.array(labels), list(photos))


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, images: np.ndarray, transform, *, batch_size: int = 32, desc: str = "features"
) -> np.ndarray:
    """Pooled backbone features (N, C) of uint8 images (N, H, W, 3), with a progress bar."""
    model.eval()
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.stack([transform(Image.fromarray(img)) for img in images[start : start + batch_size]])
        feats.append(model.forward_head(model.forward_features(batch), pre_logits=True))  # (B, C)
    return torch.cat(feats).numpy()


def run_demo(
    out: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    threads: int | None = None,
    per_class: tuple[int, int] = (40, 20),
) -> Run:
    """Run the offline demo and return its run folder (``report.html`` inside).

    Example:
        run = run_demo(seed=0); print(run.read_summary()["probe_accuracy"])
    """
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    run = new_run("demo", out)
    run.write_config(
        {
            "seed": seed,
            "threads": threads,
            "per_class": list(per_class),
            "model": "efficientnet_lite0",
            "data": f"scikit-image texture photos {list(TEXTURE_PHOTOS)}",
        }
    )
    run.write_env(seed)

    train = texture_dataset("train", per_class=per_class[0], seed=seed)
    test = texture_dataset("test", per_class=per_class[1], seed=seed)
    model = create_model("efficientnet_lite0", pretrained=True)
    transform = eval_transform(get_pretrained_cfg("efficientnet_lite0"))
    t0 = time.perf_counter()
    train_x = extract_features(model, train.images, transform, desc="train features")
    test_x = extract_features(model, test.images, transform, desc="test features")
    feature_s = time.perf_counter() - t0

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5, random_state=seed))
    probe.fit(train_x, train.labels)
    predicted = probe.predict(test_x)
    accuracy = float(accuracy_score(test.labels, predicted))
    matrix = confusion_matrix(test.labels, predicted, labels=range(len(test.class_names)))
    run.log_metrics(
        {
            "stage": "linear_probe",
            "train_images": len(train.labels),
            "test_images": len(test.labels),
            "accuracy": accuracy,
        }
    )

    report = Report("potpourri demo")
    report.section(
        "Linear probe on pretrained EfficientNet-Lite0",
        f"{len(train.labels)} training and {len(test.labels)} test crops of {len(test.class_names)} real texture "
        f"photos from scikit-image ({', '.join(test.class_names)}); train and test crops come from disjoint "
        f"regions of each photo. Features: the pretrained ImageNet EfficientNet-Lite0 (offline), pooled, "
        f"then a logistic-regression probe.",
    )
    per_class_rows = [
        {"class": name, "test images": int(matrix[i].sum()), "recall": float(matrix[i, i] / max(matrix[i].sum(), 1))}
        for i, name in enumerate(test.class_names)
    ]
    report.table([{"metric": "test accuracy", "value": accuracy}, {"metric": "feature time (s)", "value": feature_s}])
    report.table(per_class_rows)
    report.image(
        confusion_matrix_png(matrix, test.class_names, run.images / "confusion_matrix.png"), "confusion matrix (test)"
    )
    shown = np.random.default_rng(seed).choice(len(test.labels), size=min(12, len(test.labels)), replace=False)
    captions = [f"{test.class_names[predicted[i]]} ({test.class_names[test.labels[i]]})" for i in shown]
    colors = ["green" if predicted[i] == test.labels[i] else "red" for i in shown]
    report.image(
        image_grid_png(test.images[shown], captions, run.images / "examples.png", colors=colors),
        "test examples: predicted (true); red = wrong",
    )

    elapsed = time.perf_counter() - started
    report.text(f"Total time {elapsed:.1f} s with {torch.get_num_threads()} threads; seed {seed}.", note=True)
    run.write_summary(
        {
            "probe_accuracy": accuracy,
            "confusion_matrix": matrix.tolist(),
            "class_names": test.class_names,
            "seconds": elapsed,
        }
    )
    report.write(run.path / "report.html")
    return run
