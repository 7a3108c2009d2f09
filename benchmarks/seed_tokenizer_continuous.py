"""Ablation: the same Q-Former + decoder with the quantiser bypassed (continuous 32 tokens), 250 steps, seed 0."""

import sys

import torch
import torch.nn.functional as F

sys.argv = ["x", "0"]

from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer  # noqa: E402
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer  # noqa: E402

torch.set_num_threads(1)


from seed_tokenizer_data import load  # noqa: E402

from potpourri.core.registry import create_model  # noqa: E402

encoder = create_model("efficientnet_lite0", pretrained=True).eval()
with torch.no_grad():
    ftr = torch.cat([encoder.forward_features(b) for b in load("train", 100)[0].split(50)])
    fte = torch.cat([encoder.forward_features(b) for b in load("test", 24)[0].split(50)])
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
