"""Category-mean baseline for the SEED experiment: cos(train mean of the true category, test pooled feature)."""

import torch
import torch.nn.functional as F
from seed_tokenizer_data import load

from potpourri.core.registry import create_model
from potpourri.data.synth import CATEGORIES

torch.set_num_threads(1)


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
