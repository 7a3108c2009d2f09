"""What a frozen LM block costs a ViT-Tiny: parameters, MACs and CPU latency, side by side in one process.

Arms: ViT-Tiny alone, + the MiniLM-L6 last layer (384-d), + the SmolLM2-135M last layer (576-d), + the MLP control.
Run: `.venv/bin/python benchmarks/frozen_lm_cost.py [--size 224] [--rounds 7]`
"""

from __future__ import annotations

import argparse

import timm
import torch

from potpourri import create_model
from potpourri.core.registry import count_macs
from potpourri.deploy.latency import bench_models, latency_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    common = dict(num_classes=7, img_size=args.size)
    models = {
        "vit_tiny": timm.create_model("vit_tiny_patch16_224", **common),
        "+ minilm_l6 last layer": create_model("vit_tiny_frozenlm", lm="minilm_l6", **common),
        "+ smollm2_135m last layer": create_model("vit_tiny_frozenlm", lm="smollm2_135m", **common),
        "+ MLP control (384)": create_model("vit_tiny_frozenlm", lm="mlp:384", **common),
    }
    print("| arm | trainable params | frozen params | GMACs |\n|---|---|---|---|")
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        macs = count_macs(model, (1, 3, args.size, args.size)) / 1e9
        print(f"| {name} | {trainable / 1e6:.2f} M | {frozen / 1e6:.2f} M | {macs:.3f} |")
    rows, conditions = bench_models(
        list(models), models=models, batches=[1], threads=1, image_size=args.size, rounds=args.rounds
    )
    print(latency_table(rows, reference="vit_tiny"))
    print(f"load average before/after: {conditions['loadavg_before'][0]:.2f}/{conditions['loadavg_after'][0]:.2f}")


if __name__ == "__main__":
    main()
