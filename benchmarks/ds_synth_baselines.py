"""Is DS-Synth more than pixel statistics? Colour-histogram vs pretrained EfficientNet-Lite0 features.

Task (a), defect-type classification (good + 6 defect classes), on all five categories: a logistic regression on
each feature set, trained on train-region crops and tested on the disjoint test-region crops. With ``--anomaly``
also task (b): per category, the distance of a test image's features to its nearest good training image, scored
by image AUROC (a PatchCore-free, global-feature baseline).

Run: ``.venv/bin/python benchmarks/ds_synth_baselines.py --n-per-class 20 --severity 0.5 [--anomaly]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import potpourri
from potpourri.data.baselines import colour_histograms
from potpourri.data.synth import CATEGORIES, make_task


@torch.no_grad()
def lite0_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Global-average-pooled EfficientNet-Lite0 ImageNet features at 224 px; (N, 1280)."""
    model = potpourri.create_model("efficientnet_lite0", pretrained=True).eval()
    cfg = potpourri.get_pretrained_cfg("efficientnet_lite0")
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        if x.shape[-1] != cfg.input_size[-1]:
            x = torch.nn.functional.interpolate(x, size=cfg.input_size[1:], mode="bilinear", antialias=True)
        feats = model.forward_features((x - mean) / std)  # (B, 1280, 7, 7)
        out.append(feats.mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    """Standardised multinomial logistic regression; test accuracy and balanced accuracy."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    clf.fit(train_x, train_y)
    pred = clf.predict(test_x)
    accuracy, balanced = accuracy_score(test_y, pred), balanced_accuracy_score(test_y, pred)
    return {"accuracy": float(accuracy), "balanced_accuracy": float(balanced)}


def nearest_good_auroc(train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of the distance from each L2-normalised test feature to its nearest good training feature."""
    train = train / (np.linalg.norm(train, axis=1, keepdims=True) + 1e-12)
    test = test / (np.linalg.norm(test, axis=1, keepdims=True) + 1e-12)
    distances = np.sqrt(np.maximum(((test[:, None, :] - train[None, :, :]) ** 2).sum(-1), 0)).min(axis=1)
    return float(roc_auc_score(labels, distances))


def anomaly_baselines(categories: tuple[str, ...], n_per_class: int, seed: int, size: int, severity: float) -> dict:
    """Per-category nearest-good AUROC for both feature sets, and their means."""
    per_category: dict[str, dict[str, float]] = {}
    for category in categories:
        task = make_task("anomaly", categories=(category,), n_per_class=n_per_class, seed=seed, size=size,
                         severity=severity)  # fmt: skip
        per_category[category] = {
            "colour_histogram": nearest_good_auroc(colour_histograms(task.train_images),
                                                   colour_histograms(task.test_images), task.test_labels),
            "lite0_features": nearest_good_auroc(lite0_features(task.train_images),
                                                 lite0_features(task.test_images), task.test_labels),
        }  # fmt: skip
    means = {k: float(np.mean([v[k] for v in per_category.values()])) for k in ("colour_histogram", "lite0_features")}
    return {"per_category": per_category, "mean": means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-class", type=int, default=20, help="train and test images per class and category")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anomaly", action="store_true", help="also run task (b), nearest-good image AUROC")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    categories = tuple(args.categories.split(","))
    task = make_task("classification", categories=categories, n_per_class=args.n_per_class, seed=args.seed,
                     size=args.size, severity=args.severity)  # fmt: skip
    gen_s = time.perf_counter() - start
    results = {"chance": 1 / len(task.class_names)}
    results["colour_histogram"] = probe(colour_histograms(task.train_images), task.train_labels,
                                        colour_histograms(task.test_images), task.test_labels)  # fmt: skip
    start = time.perf_counter()
    train_f, test_f = lite0_features(task.train_images), lite0_features(task.test_images)
    feat_s = time.perf_counter() - start
    results["lite0_features"] = probe(train_f, task.train_labels, test_f, task.test_labels)
    summary = {"task": "classification", "classes": task.class_names, "categories": list(categories),
               "train": len(task.train_labels), "test": len(task.test_labels), "size": args.size,
               "severity": args.severity, "seed": args.seed, "generate_s": round(gen_s, 1),
               "lite0_feature_s": round(feat_s, 1), "results": results}  # fmt: skip
    print(f"DS-Synth defect-type classification, {len(task.class_names)} classes, {len(categories)} categories, "
          f"{summary['train']} train / {summary['test']} test, severity {args.severity}")  # fmt: skip
    for name in ("colour_histogram", "lite0_features"):
        r = results[name]
        print(f"  {name:<18} accuracy {r['accuracy']:.3f}  balanced {r['balanced_accuracy']:.3f}")
    print(f"  chance             {results['chance']:.3f}")
    if args.anomaly:
        n_anomaly = max(1, args.n_per_class // 2)
        summary["anomaly"] = anomaly_baselines(categories, n_anomaly, args.seed, args.size, args.severity)
        print(f"DS-Synth anomaly detection, good-only train, {8 * n_anomaly} train / {8 * n_anomaly} test per category")
        for category, row in summary["anomaly"]["per_category"].items():
            print(f"  {category:<8} AUROC histogram {row['colour_histogram']:.3f}  Lite0 {row['lite0_features']:.3f}")
        mean = summary["anomaly"]["mean"]
        print(f"  mean     AUROC histogram {mean['colour_histogram']:.3f}  Lite0 {mean['lite0_features']:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
