"""Fit Defect-Gen-lite on 15 DS-Synth brick segmentation images at 64 px on one thread; time fit and sampling.

Run: ``.venv/bin/python benchmarks/defectgen_samples.py '{"train_steps": 800}' samples.png [MODEL_DIR]``
(the JSON overrides ``DefectGenConfig`` fields; the grid shows 8 real images over 24 samples, masks below each row).
"""

import json
import sys
import time

import numpy as np
import torch
from PIL import Image

from potpourri.data.synth import make_task
from potpourri.segment.defectgen import DefectGenConfig, DefectGenLite, preview_grid

torch.set_num_threads(1)
overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/dg_samples.png"
task = make_task("segmentation", categories=("brick",), n_per_class=3, seed=0, size=64)
images, masks = task.train_images[:15], task.train_masks[:15].astype(np.int64)
print("train", images.shape, "classes present", np.unique(masks).tolist(), f"defect px {(masks > 0).mean():.3f}")
cfg = DefectGenConfig(num_classes=7, **overrides)
t0, c0 = time.perf_counter(), time.process_time()
gen = DefectGenLite(cfg).fit(images, masks)
fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
t0, c0 = time.perf_counter(), time.process_time()
xs, ms = gen.sample(50, seed=0)
samp_s, samp_cpu = time.perf_counter() - t0, time.process_time() - c0
print(
    json.dumps(
        {
            "overrides": overrides,
            "fit_wall_s": round(fit_s, 1),
            "fit_cpu_s": round(fit_cpu, 1),
            "sample50_wall_s": round(samp_s, 1),
            "sample50_cpu_s": round(samp_cpu, 1),
            "final_loss": gen.fit_info["final_loss"],
            "sample_defect_px": round(float((ms > 0).mean()), 4),
            "sample_classes": {int(k): int(v) for k, v in zip(*np.unique(ms, return_counts=True), strict=False)},
            "samples_with_defect": int(((ms > 0).reshape(50, -1).any(1)).sum()),
            "train_defect_px": round(float((masks > 0).mean()), 4),
            "rgb_mean_sample": xs.reshape(-1, 3).mean(0).round(1).tolist(),
            "rgb_mean_train": images.reshape(-1, 3).mean(0).round(1).tolist(),
        }
    )
)
if len(sys.argv) > 3:
    gen.save(sys.argv[3])
grid = np.concatenate([preview_grid(images[:8], masks[:8]), preview_grid(xs[:24], ms[:24])])
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(out)
