"""Ablation: the same Q-Former + decoder with the quantiser bypassed (continuous 32 tokens), 250 steps, seed 0."""

import sys

import torch
import torch.nn.functional as F

sys.argv = ["x", "0"]
import numpy as np  # noqa: E402

from potpourri.data.synth import CATEGORIES, make_samples  # noqa: E402
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, TokenizerTrainConfig, train_tokenizer  # noqa

torch.set_num_threads(1)


def load(split, n):
    images = [s.image for name in CATEGORIES for s in make_samples(name, split, n, size=128)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


from potpourri.registry import create_model  # noqa: E402

encoder = create_model("efficientnet_lite0", pretrained=True).eval()
with torch.no_grad():
    ftr = torch.cat([encoder.forward_features(b) for b in load("train", 100).split(50)])
    fte = torch.cat([encoder.forward_features(b) for b in load("test", 24).split(50)])
torch.manual_seed(0)
model = SEEDTokenizer(SEEDConfig(feature_dim=1280, restart_dead=False))
model.quantizer.forward = lambda z: (z, torch.zeros(z.shape[:-1], dtype=torch.long), z.sum() * 0)  # bypass VQ
train_tokenizer(model, ftr, TokenizerTrainConfig(steps=250, seed=0, progress=False))
with torch.no_grad():
    recon = model.decode_codes(model.encode(fte))
    train_recon = model.decode_codes(model.encode(ftr))
print(
    f"continuous: cos(recon, true) test = {F.cosine_similarity(recon, fte.flatten(2).mean(2)).mean():.4f}, "
    f"train = {F.cosine_similarity(train_recon, ftr.flatten(2).mean(2)).mean():.4f}"
)
