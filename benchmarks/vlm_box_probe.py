"""How much box position do frozen EfficientNet-Lite0 features hold? A small regression head per feature map.

Usage: .venv/bin/python benchmarks/vlm_box_probe.py SIZE LEVEL N_TRAIN
       (LEVEL: ``head`` for forward_features, or a block index: 4 is the stride-16 map)

The VLM has to write a refer box from the same frozen map, so the probe's test accuracy (IoU > 0.5, MiniGPT-v2's rule)
is a rough ceiling for what the frozen features give at this data size. The head: 1x1 conv to 64 channels times a
class embedding, flattened, a 2-layer MLP to a sigmoid box; L1 + GIoU, AdamW, 300 epochs on cached features.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from potpourri.core.registry import create_model
from potpourri.data.instructions import make_instructions
from potpourri.data.synth import DEFECTS, make_samples
from potpourri.models.vlm import encoder_transform_stats


def features(encoder: nn.Module, samples: list, level: str) -> torch.Tensor:
    """Frozen maps of the samples at ``level``."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in encoder_transform_stats(encoder))
    out = []
    for i in range(0, len(samples), 32):
        x = torch.from_numpy(np.stack([s.image for s in samples[i : i + 32]])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            x = (x - mean) / std
            if level == "head":
                out.append(encoder.forward_features(x))
                continue
            h = encoder.bn1(encoder.conv_stem(x))
            for j, block in enumerate(encoder.blocks):
                h = block(h)
                if j == int(level):
                    break
            out.append(h)
    return torch.cat(out)


def refer_set(encoder: nn.Module, split: str, n: int, size: int, level: str, seed: int):
    """(features, class index, normalised box) of every refer instruction on ``n`` brick images."""
    samples = make_samples("brick", split, n, seed=0, size=size)
    items = [i for i in make_instructions(samples, kinds=("refer",), seed=seed) if i.kind == "refer"]
    maps = features(encoder, samples, level)
    index = torch.tensor([i.image_index for i in items])
    classes = torch.tensor([DEFECTS.index(i.target["class"]) for i in items])
    boxes = torch.tensor([i.target["box"] for i in items], dtype=torch.float32) / size
    return maps[index], classes, boxes


class BoxHead(nn.Module):
    """Feature map + class -> box (x1, y1, x2, y2) in [0, 1]."""

    def __init__(self, channels: int, h: int, w: int) -> None:
        super().__init__()
        self.reduce, self.cls = nn.Conv2d(channels, 64, 1), nn.Embedding(len(DEFECTS), 64)
        self.mlp = nn.Sequential(nn.Linear(64 * h * w, 256), nn.ReLU(), nn.Linear(256, 4))

    def forward(self, maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.reduce(maps)) * (1 + self.cls(classes)[:, :, None, None])
        o = self.mlp(h.flatten(1)).sigmoid()
        return torch.cat([torch.minimum(o[:, :2], o[:, 2:]), torch.maximum(o[:, :2], o[:, 2:]) + 1e-3], 1)


def main() -> None:
    torch.set_num_threads(1)
    size, level, n_train = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    started = time.perf_counter()
    encoder = create_model("efficientnet_lite0", pretrained=True).eval()
    f_train, c_train, b_train = refer_set(encoder, "train", n_train, size, level, seed=0)
    f_test, c_test, b_test = refer_set(encoder, "test", 140, size, level, seed=1)
    torch.manual_seed(0)
    head = BoxHead(*f_train.shape[1:])
    optimizer = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(300):
        order = torch.randperm(len(f_train))
        for i in range(0, len(f_train), 64):
            j = order[i : i + 64]
            pred = head(f_train[j], c_train[j])
            loss = F.l1_loss(pred, b_train[j]) + generalized_box_iou_loss(pred, b_train[j], reduction="mean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        acc = lambda f, c, b: (box_iou(head(f, c), b).diag() > 0.5).float().mean().item()  # noqa: E731
        row = {"size": size, "level": level, "map": list(f_train.shape[1:]), "n_train": len(f_train),
               "train_acc": round(acc(f_train, c_train, b_train), 3), "test_acc": round(acc(f_test, c_test, b_test), 3),
               "n_test": len(f_test), "seconds": round(time.perf_counter() - started)}  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
