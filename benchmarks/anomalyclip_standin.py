"""AnomalyCLIP (stand-in towers) vs a WinCLIP-style baseline vs PatchCore on DS-Synth, leave-one-category-out.

Departure from the paper, stated: no real CLIP weights exist offline, so both zero-shot methods run on the
stand-in towers (frozen EfficientNet-Lite0 patch features, frozen MiniLM-L6 text encoder, a trained linear bridge;
see ``potpourri/inspect/anomalyclip_standin.py``). For each held-out category, AnomalyCLIP trains its prompts and
the bridge on the labelled test splits of the other four categories (AnomalyCLIP's protocol trains on an auxiliary
dataset's test split); WinCLIP-style trains only the bridge there, with hand-written prompts fixed. Both are then
applied unchanged to the held-out category. PatchCore is a different setting: it fits on the held-out category's
own normal training images. All three are scored on the same test split (the ``ds-synth:<category>`` folder:
80 images at 256 px, 10 good + 70 defective, resized to 224).

Run: ``.venv/bin/python benchmarks/anomalyclip_standin.py [--epochs 15] [--categories brick,moon] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from potpourri.core.metrics import evaluate
from potpourri.data.folders import ds_synth_category, read_folder, truth_masks
from potpourri.data.synth import CATEGORIES
from potpourri.inspect.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, batched_features, train_prompts
from potpourri.inspect.anomalyclip_standin import StandInTowers
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig
from potpourri.inspect.winclip import WinCLIP, WinCLIPConfig

SIZE = 224


def _metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    e = evaluate(labels, scores, masks, maps)
    return {"image_auroc": e.image_auroc, "pixel_auroc": e.pixel_auroc, "aupro": e.aupro}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="held-out categories to evaluate")
    parser.add_argument("--object-name", default="surface", help="the noun in WinCLIP's hand-written prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    data = {c: read_folder(str(ds_synth_category(c))) for c in CATEGORIES}
    masks = {c: truth_masks(d, SIZE)[0] for c, d in data.items()}
    labels = {c: np.asarray(d.labels) for c, d in data.items()}

    towers = StandInTowers.pretrained(image_size=SIZE, seed=args.seed)
    initial = {k: v.detach().clone() for k, v in towers.named_trainable().items()}
    anomaly = AnomalyCLIP(AnomalyCLIPConfig(epochs=args.epochs, seed=args.seed), towers=towers)
    win = WinCLIP(WinCLIPConfig(epochs=args.epochs, object_name=args.object_name, seed=args.seed), towers=towers)
    t0 = time.perf_counter()
    features = {}
    for c, d in data.items():  # the frozen tower is shared: embed every category's test split once
        features[c] = batched_features(towers, torch.stack([anomaly.tensor(p) for p in d.test]), 16)
    feature_s = time.perf_counter() - t0

    results: list[dict] = []
    for held_out in args.categories.split(","):
        aux = [c for c in CATEGORIES if c != held_out]
        aux_features = {k: torch.cat([features[c][k] for c in aux]) for k in features[aux[0]]}
        aux_masks = torch.as_tensor(np.concatenate([masks[c] for c in aux]), dtype=torch.float32)
        aux_labels = torch.as_tensor(np.concatenate([labels[c] for c in aux]))
        test, truth, y = data[held_out].test, masks[held_out], labels[held_out]
        for name, method, text_fn, params in (
            ("anomalyclip (stand-in)", anomaly, None, towers.trainable),
            ("winclip-style (stand-in)", win, win.text_features, towers.bridge_parameters),
        ):
            towers.load_state_dict(initial, strict=False)  # every fold starts from the same seeded prompts/bridge
            t0 = time.perf_counter()
            history = train_prompts(
                towers,
                aux_labels,
                aux_masks,
                aux_labels,
                text_fn=text_fn,
                params=params,
                features=aux_features,
                epochs=args.epochs,
                seed=args.seed,
            )
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, maps = method.score(test)
            score_s = time.perf_counter() - t0
            row = {"held_out": held_out, "method": name, **_metrics(y, scores, truth, maps)}
            row |= {"train_s": round(train_s, 1), "score_s": round(score_s, 1)}
            row |= {"loss_first": round(history[0]["loss"], 3), "loss_last": round(history[-1]["loss"], 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
        t0 = time.perf_counter()
        patchcore = PatchCore(PatchCoreConfig(image_size=SIZE, seed=args.seed), backbone=towers.lite0).fit(
            data[held_out].train
        )
        scores, maps = patchcore.score(test)
        row = {"held_out": held_out, "method": "patchcore (own normals)", **_metrics(y, scores, truth, maps)}
        row |= {"fit_and_score_s": round(time.perf_counter() - t0, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    total = time.perf_counter() - started
    print(f"\nfeature extraction {feature_s:.0f} s, total {total:.0f} s on {torch.get_num_threads()} thread(s)")
    print("| held-out | method | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|")
    for r in results:
        values = " | ".join(f"{r[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro"))
        print(f"| {r['held_out']} | {r['method']} | {values} |")
    methods = dict.fromkeys(r["method"] for r in results)
    for m in methods:
        rows = [r for r in results if r["method"] == m]
        means = {k: float(np.mean([r[k] for r in rows])) for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(f"| mean | {m} | {means['image_auroc']:.3f} | {means['pixel_auroc']:.3f} | {means['aupro']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "total_s": total, "feature_s": feature_s, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
