"""Which DS-Synth classification settings can a pretrained model tell apart? A sweep toward the benchmark v2 of the
experiments issue: image size x defect severity x images per class, scoring a logistic probe on frozen ImageNet
EfficientNet-Lite0 features against the same probe on colour histograms (7 classes: chance 0.143).

Run: ``.venv/bin/python benchmarks/ds_synth_probe_sweep.py [--sizes 128 224] [--severities 0.5 1.0] [--n 10 30]
[--version 2]``.
Prints one row per setting: probe accuracy, histogram accuracy, their gap and seconds; one thread.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch


def probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(scaler.transform(train), y_train)
    return float((clf.predict(scaler.transform(test)) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--severities", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30], help="images per class per surface")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", default="1", choices=["1", "2"], help="DS-Synth version")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from potpourri import create_model
    from potpourri.data.baselines import colour_histograms
    from potpourri.data.synth import make_task
    from potpourri.data.transforms import images_to_tensor

    model = create_model("efficientnet_lite0", pretrained=True).eval()
    cfg = model.pretrained_cfg

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        out = []
        for first in range(0, len(images), 32):
            x = images_to_tensor(images[first : first + 32], cfg["mean"], cfg["std"])
            out.append(model.forward_head(model.forward_features(x), pre_logits=True))
        return torch.cat(out).numpy()

    print("| size | severity | per class | Lite0 probe | histogram | gap | s |")
    print("|---|---|---|---|---|---|---|")
    for size, severity, n in itertools.product(args.sizes, args.severities, args.n):
        start = time.perf_counter()
        task = make_task("classification", n_per_class=n, size=size, severity=severity, seed=args.seed,
                         version=args.version)  # fmt: skip
        y_train, y_test = task.train_labels, task.test_labels
        lite0 = probe(features(task.train_images), y_train, features(task.test_images), y_test)
        hist = probe(colour_histograms(task.train_images), y_train, colour_histograms(task.test_images), y_test)
        seconds = time.perf_counter() - start
        print(f"| {size} | {severity} | {n} | {lite0:.3f} | {hist:.3f} | {lite0 - hist:+.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
