"""Efficient architectures side by side on this CPU, in one process, with one protocol (potpourri.deploy.latency).

Ours: EfficientMod-xxs/xs/s, FasterViT-0, the RepConv net (multi-branch and fused). Peers: the `fastervit`
package's FasterViT-0 (same weights), DeiT-Tiny, MobileNetV2, EfficientNet-Lite0, timm FastViT-T8 and
EfficientFormerV2-S0 (both re-parameterised). Prints a Markdown table with speed-ups against DeiT-Tiny.
Run: `.venv/bin/python benchmarks/efficient.py [--batch 1 8] [--size 224] [--rounds 7] [--allocator default]`
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

from potpourri import create_model, reparameterize
from potpourri.deploy.latency import ALLOCATORS, bench_models, latency_table


def build() -> dict[str, torch.nn.Module]:
    """Every compared model, eval mode, random weights (latency does not depend on them)."""
    import fastervit  # noqa: F401  (registers faster_vit_*_224 into timm)

    torch.manual_seed(0)
    ours_fvit = create_model("faster_vit_0")
    theirs_fvit = timm.create_model("faster_vit_0_224")
    theirs_fvit.load_state_dict(ours_fvit.state_dict())
    rep = create_model("repconvnet_s")
    models = {
        "deit_tiny_patch16_224": timm.create_model("deit_tiny_patch16_224"),
        "efficientmod_xxs": create_model("efficientmod_xxs"),
        "efficientmod_xs": create_model("efficientmod_xs"),
        "efficientmod_s": create_model("efficientmod_s"),
        "faster_vit_0 (ours)": ours_fvit,
        "faster_vit_0 (fastervit package)": theirs_fvit,
        "mobilenetv2_100": timm.create_model("mobilenetv2_100"),
        "efficientnet_lite0": create_model("efficientnet_lite0"),
        "fastvit_t8 (reparam)": reparameterize(timm.create_model("fastvit_t8")),
        "efficientformerv2_s0 (reparam)": reparameterize(timm.create_model("efficientformerv2_s0")),
        "repconvnet_s (multi-branch)": rep,
        "repconvnet_s (fused)": reparameterize(rep),
    }
    return {name: model.eval() for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="retain", help="glibc malloc setting (bench_models)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    models = build()
    rows, conditions = bench_models(
        list(models),
        models=models,
        batches=args.batch,
        threads=1,
        image_size=args.size,
        rounds=args.rounds,
        allocator=args.allocator,
    )
    print(latency_table(rows, reference="deit_tiny_patch16_224"))
    print(f"conditions: {conditions}")
    by = {(r.model, r.batch): r.median_ms for r in rows}
    for batch in args.batch:
        ours, theirs = by[("faster_vit_0 (ours)", batch)], by[("faster_vit_0 (fastervit package)", batch)]
        fused, unfused = by[("repconvnet_s (fused)", batch)], by[("repconvnet_s (multi-branch)", batch)]
        print(
            f"batch {batch}: FasterViT-0 throughput ours/package {theirs / ours:.2f}x; "
            f"RepConv fused/multi-branch {unfused / fused:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": [r.__dict__ for r in rows], "conditions": conditions}, fh, indent=2)


if __name__ == "__main__":
    main()
