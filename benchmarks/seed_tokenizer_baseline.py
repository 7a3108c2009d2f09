"""Category-mean baseline for the SEED experiment: cos(train mean of the true category, test pooled feature)."""

import numpy as np
import torch
import torch.nn.functional as F

from potpourri.data.synth import CATEGORIES, make_samples
from potpourri.registry import create_model

torch.set_num_threads(1)


def load(split, n):
    images, cats = [], []
    for c, name in enumerate(CATEGORIES):
        for s in make_samples(name, split, n, size=128):
            images.append(s.image)
            cats.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std, torch.tensor(cats)


encoder = create_model("efficientnet_lite0", pretrained=True).eval()
with torch.no_grad():
    xtr, ctr = load("train", 100)
    xte, cte = load("test", 24)
    ptr = torch.cat([encoder.forward_features(b) for b in xtr.split(50)]).flatten(2).mean(2)
    pte = torch.cat([encoder.forward_features(b) for b in xte.split(50)]).flatten(2).mean(2)
cat_means = torch.stack([ptr[ctr == c].mean(0) for c in range(len(CATEGORIES))])
print(f"cos(category mean, test) = {F.cosine_similarity(cat_means[cte], pte).mean():.4f}")
same = [(F.normalize(pte[cte == c], dim=1) @ F.normalize(pte[cte == c], dim=1).T) for c in range(len(CATEGORIES))]
off = torch.cat([s[~torch.eye(len(s), dtype=torch.bool)] for s in same])
print(f"mean cos between two test images of one category = {off.mean():.4f}")
