"""SEED tokenizer on DS-Synth: codebook usage with/without dead-code restarts, feature reconstruction, retrieval.

Run: cd /work/main && .venv/bin/python benchmarks/seed_tokenizer_experiment.py
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from seed_tokenizer_data import load

from potpourri.core.registry import create_model
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, codebook_usage, retrieve_nearest
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

torch.set_num_threads(1)
t0 = time.time()
SIZE, N_TRAIN, N_TEST = 128, 100, 24
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 250
SEEDS = (0, 1)


encoder = create_model("efficientnet_lite0", pretrained=True).eval()
with torch.no_grad():
    xtr, ctr = load("train", N_TRAIN, SIZE)
    xte, cte = load("test", N_TEST, SIZE)
    ftr = torch.cat([encoder.forward_features(b) for b in xtr.split(50)])
    fte = torch.cat([encoder.forward_features(b) for b in xte.split(50)])
print("features", tuple(ftr.shape), tuple(fte.shape), f"{time.time() - t0:.0f}s", flush=True)
t_feat = time.time() - t0

pooled_te = fte.flatten(2).mean(2)
mean_baseline = F.cosine_similarity(ftr.flatten(2).mean(2).mean(0, keepdim=True), pooled_te).mean().item()
nn_train = (F.normalize(pooled_te, dim=1) @ F.normalize(ftr.flatten(2).mean(2), dim=1).T).max(1).values.mean().item()
print(f"baseline cos(train mean, test) = {mean_baseline:.4f}; cos(nearest train image, test) = {nn_train:.4f}")

rows = []
for ema in (False, True):
    for restart in (False, True):
        for seed in SEEDS:
            torch.manual_seed(seed)
            cfg = SEEDConfig(feature_dim=ftr.shape[1], codebook_size=256, ema=ema, restart_dead=restart)
            model = SEEDTokenizer(cfg)
            t = time.time()
            hist = train_tokenizer(
                model, ftr, TokenizerTrainConfig(steps=STEPS, seed=seed, restart_every=50, progress=False)
            )
            codes_tr, codes_te = model.tokenize(ftr), model.tokenize(fte)
            recon = model.decode(codes_te)
            cos = F.cosine_similarity(recon, pooled_te).mean().item()
            found = retrieve_nearest(model, codes_te, fte)
            row = dict(
                ema=ema,
                restart=restart,
                seed=seed,
                ppl_train=codebook_usage(codes_tr, 256)["perplexity"],
                used_train=codebook_usage(codes_tr, 256)["used_fraction"],
                ppl_test=codebook_usage(codes_te, 256)["perplexity"],
                used_test=codebook_usage(codes_te, 256)["used_fraction"],
                cos_test=cos,
                retrieve_self=(found == torch.arange(len(fte))).float().mean().item(),
                retrieve_cat=(cte[found] == cte).float().mean().item(),
                restarted=sum(hist.restarted),
                final_loss=float(np.mean(hist.loss[-20:])),
                secs=time.time() - t,
            )
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

print(
    "\n| quantiser | dead-code restarts | perplexity (train) | codes used (train) | perplexity (test) | codes used "
    "(test) | cos(recon, true) test | retrieve self top-1 | retrieve category | codes restarted |"
)
print("|---|---|---|---|---|---|---|---|---|---|")
for ema in (False, True):
    for restart in (False, True):
        sel = [r for r in rows if r["ema"] == ema and r["restart"] == restart]

        def ms(k, f="{:.3f}", sel=sel):
            v = np.array([r[k] for r in sel])
            return (f + " ± " + f).format(v.mean(), v.std())

        print(
            f"| {'EMA' if ema else 'codebook loss'} | {'yes' if restart else 'no'} | {ms('ppl_train', '{:.1f}')} | "
            f"{ms('used_train')} | {ms('ppl_test', '{:.1f}')} | {ms('used_test')} | {ms('cos_test', '{:.4f}')} | "
            f"{ms('retrieve_self')} | {ms('retrieve_cat')} | {ms('restarted', '{:.0f}')} |"
        )
print(f"\nfeatures {t_feat:.0f}s, total {time.time() - t0:.0f}s, steps {STEPS}, seeds {SEEDS}")
