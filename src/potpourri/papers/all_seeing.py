"""``potpourri reproduce all-seeing``: the All-Seeing-style region-text head (Lite0 RoI tokens vs MiniLM captions),
region -> caption retrieval accuracy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from potpourri.core.results import mean_std
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.models.allseeing import RegionTextHead
from potpourri.vlm.allseeing import RegionPair, pool_regions, region_caption_pairs, retrieval_accuracy, train_head


# ----------------------------------------------------------------------------------------------- experiment
@dataclass
class AllSeeingConfig:
    """Every knob of ``reproduce all-seeing``."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    image_size: int = 128
    train_per_kind: int = 16  # images per kind (six defects + multi) and category
    test_per_kind: int = 6
    feature_upsample: int = 2
    pool_size: int = 3
    embed_dim: int = 128
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    progress: bool = True


def _region_tensors(features: torch.Tensor, pairs: list[RegionPair], cfg: AllSeeingConfig):
    boxes = torch.tensor([p.box for p in pairs], dtype=torch.float32)
    index = torch.tensor([p.image_index for p in pairs])
    pooled = pool_regions(features, index, boxes, (cfg.image_size, cfg.image_size), output_size=cfg.pool_size)
    return pooled.flatten(1), boxes / cfg.image_size  # (N, C·s·s), (N, 4) in [0, 1]


def reproduce_all_seeing(cfg: AllSeeingConfig, *, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train and evaluate the region–text head; writes ``results.md``, ``summary.json`` and ``pairs.jsonl``.

    ``options``: the head trains and is evaluated on its device (and precision, once ``train_head`` takes options);
    the Lite0 features and MiniLM text embeddings are computed on the CPU.

    Example:
        run = reproduce_all_seeing(AllSeeingConfig(seeds=(0,))); print((run.path / "results.md").read_text())
    """
    import json

    from potpourri.core.registry import create_model
    from potpourri.data.synth import DEFECTS, MULTI, make_samples
    from potpourri.detect.simdetr import lite0_feature_maps

    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-all-seeing", out, config=asdict(cfg), seed=cfg.seeds[0])
    kinds = (*DEFECTS, MULTI)
    split_samples = {}
    for split, per_kind in (("train", cfg.train_per_kind), ("test", cfg.test_per_kind)):
        split_samples[split] = [
            s for c in cfg.categories for s in make_samples(c, split, per_kind * len(kinds), size=cfg.image_size,
                                                            kinds=kinds)
        ]  # fmt: skip
    pairs = {split: region_caption_pairs(samples) for split, samples in split_samples.items()}
    with open(run.path / "pairs.jsonl", "w") as fh:
        for split, found in pairs.items():
            for p in found:
                fh.write(json.dumps({"split": split, **asdict(p)}) + "\n")
    text_encoder = create_model("minilm_l6", pretrained=True).eval()
    region, text, caption_ids, galleries = {}, {}, {}, {}
    for split, samples in split_samples.items():
        features = lite0_feature_maps([s.image for s in samples], upsample=cfg.feature_upsample,
                                      progress=cfg.progress)  # fmt: skip
        region[split] = tuple(t.to(device) for t in _region_tensors(features, pairs[split], cfg))
        gallery = sorted({p.caption for p in pairs[split]})
        galleries[split] = gallery
        caption_ids[split] = torch.tensor([gallery.index(p.caption) for p in pairs[split]])
        text[split] = text_encoder.encode(gallery).to(device)  # (G, 384)
    train_captions, test_captions = set(galleries["train"]), galleries["test"]
    seen = float(np.mean([c in train_captions for c in test_captions]))
    seen_regions = float(np.mean([p.caption in train_captions for p in pairs["test"]]))
    test_pairs, gallery = pairs["test"], galleries["test"]
    targets = caption_ids["test"]
    defect_of = {p.caption: p.defect for p in test_pairs}
    location_of = {p.caption: p.location for p in test_pairs}
    chance_defect = float(np.mean([np.mean([defect_of[g] == p.defect for g in gallery]) for p in test_pairs]))
    chance_location = float(np.mean([np.mean([location_of[g] == p.location for g in gallery]) for p in test_pairs]))

    def evaluate(head: RegionTextHead) -> dict[str, float]:
        with torch.no_grad():
            similarity = (head.encode_regions(*region["test"]) @ head.encode_texts(text["test"]).T).float().cpu()
        acc = retrieval_accuracy(similarity, targets, (1, 5))
        seen_rows = torch.tensor([p.caption in train_captions for p in test_pairs])
        on_seen = retrieval_accuracy(similarity[seen_rows], targets[seen_rows], (1,))[1]
        on_unseen = retrieval_accuracy(similarity[~seen_rows], targets[~seen_rows], (1,))[1]
        best = [gallery[b] for b in similarity.argmax(1).tolist()]
        defect = np.mean([defect_of[b] == p.defect for b, p in zip(best, test_pairs, strict=True)])
        location = np.mean([location_of[b] == p.location for b, p in zip(best, test_pairs, strict=True)])
        return {"top1": acc[1], "top5": acc[5], "defect": float(defect), "location": float(location),
                "top1_seen": on_seen, "top1_unseen": on_unseen,
                "temperature": 1 / head.logit_scale.exp().item()}  # fmt: skip

    arms = {
        "untrained head (random projection)": dict(train=False),
        "trained: features + box (All-Seeing)": dict(train=True),
        "trained: features only": dict(train=True, use_box=False),
        "trained: box only": dict(train=True, use_features=False),
    }
    results: dict[str, list[dict[str, float]]] = {}
    region_dim = region["train"][0].shape[1]
    train_text = text["train"][caption_ids["train"].to(device)]  # (N_train, 384) one row per region
    for seed in cfg.seeds:
        for arm, spec in arms.items():
            seed_everything(seed)
            head = RegionTextHead(region_dim, embed_dim=cfg.embed_dim, use_features=spec.get("use_features", True),
                                  use_box=spec.get("use_box", True)).to(device)  # fmt: skip
            tic = time.perf_counter()
            losses = []
            if spec["train"]:
                losses = train_head(head, *region["train"], train_text, caption_ids["train"].to(device),
                                    steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                    options=options)  # fmt: skip
            head.eval()
            row = {**evaluate(head), "seconds": time.perf_counter() - tic,
                   "final_loss": float(np.mean(losses[-20:])) if losses else float("nan")}  # fmt: skip
            results.setdefault(arm, []).append(row)
            run.log_metrics({"arm": arm, "seed": seed, **row})

    def cell(values: list[float]) -> str:
        return mean_std(values, sep=" ± ")

    n_gallery = len(gallery)
    lines = [
        f"# All-Seeing-style region–caption retrieval on DS-Synth ({', '.join(cfg.categories)}, {cfg.image_size} px)",
        "",
        f"{len(pairs['train'])} train regions ({len(galleries['train'])} distinct captions), {len(test_pairs)} test "
        f"regions ranked against the {n_gallery} distinct test captions ({seen:.0%} of them, and the captions of "
        f"{seen_regions:.0%} of the test regions, also occur in train). "
        f"Region token: RoIAlign {cfg.pool_size}x{cfg.pool_size} on frozen Lite0 blocks.2+blocks.4 "
        f"({region_dim} dims) + Fourier box embedding → MLP; text: frozen MiniLM-L6 → linear; symmetric InfoNCE, "
        f"learnable temperature, {cfg.steps} steps. Mean ± std over seeds {list(cfg.seeds)}.",
        "",
        "| region tokens | top-1 | top-5 | top-1 caption names the right defect | … the right location | "
        "top-1, caption seen in train | top-1, caption unseen |",
        "|---|---|---|---|---|---|---|",
        f"| chance | {1 / n_gallery:.3f} | {min(1.0, 5 / n_gallery):.3f} | {chance_defect:.3f} | "
        f"{chance_location:.3f} | {1 / n_gallery:.3f} | {1 / n_gallery:.3f} |",
    ]
    summary = {"config": asdict(cfg), "gallery": n_gallery, "test_regions": len(test_pairs),
               "train_regions": len(pairs["train"]), "chance": {"top1": 1 / n_gallery, "top5": min(1.0, 5 / n_gallery),
               "defect": chance_defect, "location": chance_location}, "test_captions_seen_in_train": seen,
               "test_regions_with_seen_caption": seen_regions}  # fmt: skip
    for arm, rows in results.items():
        keys = ("top1", "top5", "defect", "location", "top1_seen", "top1_unseen")
        lines.append(f"| {arm} | " + " | ".join(cell([r[k] for r in rows]) for k in keys) + " |")
        summary[arm] = rows
    example = test_pairs[0]
    total = time.perf_counter() - started
    lines += ["", f"Example pair: `{example.caption}` ↔ ASMv2 region text `{example.asm_text}`.", "",
              f"Total {total / 60:.1f} min on {torch.get_num_threads()} thread(s)."]  # fmt: skip
    summary["seconds"] = total
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary(summary)
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce all-seeing``: the full study, or a seconds-long smoke run of the same code path."""
    cfg = AllSeeingConfig()
    if quick:  # same code path, numbers not meaningful
        cfg = AllSeeingConfig(categories=("brick",), image_size=64, train_per_kind=1, test_per_kind=1,
                              feature_upsample=1, steps=5, batch_size=8, seeds=(0,), progress=False)  # fmt: skip
    return reproduce_all_seeing(cfg, out=out, options=options)
