"""``potpourri reproduce frozen-lm``: "Frozen Transformers in Language Models Are Effective Visual Encoder Layers"
(Pang et al., ICLR 2024) at CPU scale.

A small ViT is trained from scratch on the object-in-clutter set (``potpourri.data.clutter``: 10 shape/colour
classes, distractors, exact object masks) with each of these between its last block and its final norm:

| arm | block between the two trainable adapters |
|---|---|
| vit | nothing (no adapters either) |
| +smollm2-last | SmolLM2-135M-Instruct's last decoder layer, pretrained, frozen (LLaMA architecture) |
| +minilm-last | all-MiniLM-L6-v2's last layer, pretrained, frozen |
| +minilm-first | all-MiniLM-L6-v2's first layer, pretrained, frozen |
| +mlp | GELU + LayerNorm at width 384: the same trainable parameters as the MiniLM arms |
| +random-frozen | a MiniLM-shaped layer, randomly initialised, frozen |
| +minilm-last-trainable | MiniLM's last layer, pretrained, fine-tuned with the rest |
| +tiny-llama-random | a tiny random LLaMA decoder layer (the code-path check for decoder layers) |
| +smollm2-random-frozen | a SmolLM2-shaped decoder layer, randomly initialised (the library's init), frozen |
| +smollm2-shuffled-frozen | SmolLM2's last layer with each weight tensor's entries randomly permuted, frozen |

Every arm trains with the same recipe (AdamW, cosine with warm-up, label smoothing, the DeiT-style weight decay)
through ``potpourri.tune.fit``; the same seed gives every arm the same ViT initialisation and the same batches.
Reported per arm, mean ± std over seeds: clean test accuracy, accuracy under the corruption suite (severity 3,
averaged), and the paper's information-filtering measurement: the best-threshold IoU between per-token activation
pseudo-masks and the true object tokens, for the tokens entering the final norm (``magnitude``), the LM block's own
output, and the last ViT block's CLS attention.

Expectation, stated before the first full run (see docs/results.md): no gain, or a loss, from the pretrained
layers. SmolLM2 (135 M) and MiniLM (22 M) are far below the 1.3 B+ models where the paper sees gains, and the
paper's own Table C shows OPT-125M/350M final layers hurting ViT-S by 3.6 points. Differences smaller than the
seed spread are noise at this scale.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from potpourri.core.errors import PotpourriError
from potpourri.core.results import mean_std
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.papers.registry import compute_options
from potpourri.report.tables import markdown_table

__all__ = ["ARMS", "FrozenLMConfig", "reproduce_frozen_lm", "run"]

# arm -> how to build its block: (lm, layer, random_init, trainable)
ARMS: dict[str, tuple[str | None, int, bool, bool]] = {
    "vit": (None, -1, False, False),
    "+smollm2-last": ("smollm2_135m", -1, False, False),
    "+minilm-last": ("minilm_l6", -1, False, False),
    "+minilm-first": ("minilm_l6", 0, False, False),
    "+mlp": ("mlp:384", -1, False, False),
    "+random-frozen": ("minilm_l6", -1, True, False),
    "+minilm-last-trainable": ("minilm_l6", -1, False, True),
    "+tiny-llama-random": ("tiny-llama", -1, True, False),
    "+smollm2-random-frozen": ("smollm2_135m", -1, True, False),
    "+smollm2-shuffled-frozen": ("smollm2_135m", -1, False, False),
}
# arms whose pretrained layer has every weight tensor's entries permuted: the same weight statistics, no structure
SHUFFLED = {"+smollm2-shuffled-frozen"}
MEAN = STD = (0.5, 0.5, 0.5)
COLUMNS = (
    "arm",
    "seed",
    "status",
    "clean_acc",
    "corrupt_acc",
    "iou_final_mag",
    "iou_vit_mag",
    "iou_lm_mag",
    "iou_lm_freq",
    "iou_cls_attn",
    "seconds",
    "trainable",
    "frozen",
)


@dataclass
class FrozenLMConfig:
    """The experiment's settings; the defaults take about 35 minutes on 2 free CPU cores (10 arms x 3 seeds)."""

    arms: tuple[str, ...] = tuple(ARMS)
    n_train: int = 1500
    n_test: int = 400
    image_size: int = 32
    patch_size: int = 8  # 4x4 tokens: the LM layer's cost grows with tokens, and this must fit a CPU budget
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    epochs: int = 6
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.07
    label_smoothing: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    corruptions: tuple[str, ...] = (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "motion_blur",
        "contrast",
        "brightness",
        "pixelate",
        "jpeg_compression",
    )
    severity: int = 3
    iou_images: int = 200  # test images used for the pseudo-mask IoU

    def quick(self) -> FrozenLMConfig:
        """A seconds-long smoke configuration of the same code path (numbers not meaningful)."""
        return FrozenLMConfig(
            arms=("vit", "+mlp", "+minilm-last", "+tiny-llama-random"),
            n_train=40,
            n_test=20,
            epochs=1,
            batch_size=20,
            seeds=(0, 1),
            corruptions=("gaussian_noise", "contrast"),
            iou_images=10,
        )


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=32,
    )
    return LlamaModel(cfg)


def build_arm(arm: str, cfg: FrozenLMConfig, num_classes: int, seed: int, lm_cache: dict[str, nn.Module]) -> nn.Module:
    """The arm's model: the ViT initialised from ``seed`` (identical across arms), then its block and adapters."""
    from potpourri.models.frozen_lm import FrozenLMViT, build_lm_block, load_lm_layer

    if arm not in ARMS:
        raise PotpourriError(f"unknown arm '{arm}'; choose from {', '.join(ARMS)}")
    lm, layer, random_init, trainable = ARMS[arm]
    seed_everything(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
    )
    seed_everything(seed + 10_000)  # random layers differ by seed; pretrained ones come from the cache
    if lm is None:
        block = None
    elif lm == "tiny-llama":
        block = load_lm_layer(_tiny_llama(), layer)
    elif lm.startswith("mlp:"):
        block = build_lm_block(lm)
    elif random_init:
        block = build_lm_block(lm, layer, random_init=True)
    else:
        key = f"{lm}:{layer}"
        if key not in lm_cache:
            lm_cache[key] = load_lm_layer(lm, layer)
        block = copy.deepcopy(lm_cache[key])
        if arm in SHUFFLED:  # keep each tensor's values (scale, distribution), destroy what pretraining arranged
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in block.parameters():
                    flat = param.view(-1)
                    flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    if block is not None and trainable:
        for param in block.parameters():
            param.requires_grad_(True)
        block.keep_frozen = False
    seed_everything(seed + 20_000)  # the adapters
    return FrozenLMViT(vit, block)


@torch.no_grad()
def filtering_iou(
    model: nn.Module, images: torch.Tensor, token_truth: torch.Tensor, *, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Mean best-threshold IoU of activation pseudo-masks with the true object tokens (paper §6.2, App. A.3); the
    model runs on ``device``, the masks are scored on the CPU."""
    from potpourri.models.frozen_lm import activation_map, cls_attention, pseudo_mask_iou

    model.to(device).eval()
    images = images.to(device)
    record: dict[str, torch.Tensor] = {}
    model.forward_tokens(images, record)
    prefix = model.vit.num_prefix_tokens
    final = record["adapter_out"] if "adapter_out" in record else record["vit"]
    scores = {
        "iou_final_mag": activation_map(final[:, prefix:], "magnitude"),
        "iou_vit_mag": activation_map(record["vit"][:, prefix:], "magnitude"),
        "iou_cls_attn": cls_attention(model, images),
    }
    if "lm" in record:
        scores["iou_lm_mag"] = activation_map(record["lm"][:, prefix:], "magnitude")
        scores["iou_lm_freq"] = activation_map(record["lm"][:, prefix:], "frequency")
    out = {}
    for name, act in scores.items():
        if name == "iou_cls_attn":
            low, high = act.amin(1, keepdim=True), act.amax(1, keepdim=True)
            act = (act - low) / (high - low).clamp_min(1e-12)
        out[name] = float(pseudo_mask_iou(act.float().cpu(), token_truth).mean())
    return out


def summarise(rows: list[dict[str, Any]], arms: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per arm: mean ± std of every metric over seeds, and the paired mean delta against ``vit``."""
    base = {r["seed"]: r for r in rows if r["arm"] == "vit" and r["status"] == "ok"}
    table = []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        ok = [r for r in runs if r["status"] == "ok"]
        entry: dict[str, Any] = {"arm": arm, "runs": len(runs), "diverged": len(runs) - len(ok)}
        if runs:
            entry["trainable"], entry["frozen"] = runs[0]["trainable"], runs[0]["frozen"]
        for key in ("clean_acc", "corrupt_acc", "iou_final_mag", "iou_lm_mag", "iou_cls_attn", "seconds"):
            values = [r[key] for r in ok if key in r]
            entry[key] = mean_std(values)
            entry[f"{key}_values"] = values
        for key in ("clean_acc", "corrupt_acc"):
            deltas = [r[key] - base[r["seed"]][key] for r in ok if r["seed"] in base]
            entry[f"{key}_delta"] = f"{statistics.fmean(deltas):+.3f}" if deltas and arm != "vit" else "—"
        table.append(entry)
    return table


def _markdown(table: list[dict[str, Any]]) -> str:
    header = ["arm", "trainable", "frozen", "clean acc", "Δ vs vit", "corruption acc", "Δ vs vit", "IoU final tokens",
              "IoU LM output", "IoU CLS attn", "s/run"]  # fmt: skip
    rows = []
    for e in table:
        diverged = f" ({e['diverged']} of {e['runs']} runs diverged)" if e["diverged"] else ""
        rows.append([
            e["arm"], f"{e.get('trainable', 0) / 1e6:.2f} M", f"{e.get('frozen', 0) / 1e6:.2f} M", e["clean_acc"],
            e["clean_acc_delta"], e["corrupt_acc"], e["corrupt_acc_delta"], e["iou_final_mag"], e["iou_lm_mag"],
            e["iou_cls_attn"], f"{e['seconds']}{diverged}",
        ])  # fmt: skip
    return markdown_table(header, rows)


def reproduce_frozen_lm(
    cfg: FrozenLMConfig | None = None, *, out: str | None = None, options: TrainOptions | None = None
) -> Run:
    """Train every arm for every seed, evaluate clean / corrupted / pseudo-mask IoU; write results.md and report.

    ``options``: the device and precision every arm trains and is evaluated on.
    """
    from potpourri.data.clutter import CLUTTER_CLASSES, make_clutter, token_masks
    from potpourri.data.corruptions import corrupt
    from potpourri.data.transforms import normalized_dataset
    from potpourri.report.html import Report
    from potpourri.tune.trainer import TuneConfig, evaluate, fit

    cfg = cfg or FrozenLMConfig()
    device = resolve_device((options or TrainOptions()).device)
    started = time.perf_counter()
    run = new_run("reproduce-frozen-lm", out, config=asdict(cfg), seed=cfg.seeds[0])
    train_images, train_labels, _ = make_clutter(cfg.n_train, size=cfg.image_size, seed=0)
    test_images, test_labels, test_masks = make_clutter(cfg.n_test, size=cfg.image_size, seed=1)
    train = normalized_dataset(train_images, train_labels, MEAN, STD)
    test = normalized_dataset(test_images, test_labels, MEAN, STD)
    corrupted = {
        name: normalized_dataset(
            np.stack([corrupt(img, name, cfg.severity, seed=i) for i, img in enumerate(test_images)]),
            test_labels,
            MEAN,
            STD,
        )
        for name in tqdm(cfg.corruptions, desc="corrupting the test set", unit="corruption", leave=False)
    }
    k = min(cfg.iou_images, cfg.n_test)
    iou_x = test.tensors[0][:k]
    iou_truth = torch.from_numpy(token_masks(test_masks[:k], cfg.patch_size))
    steps = cfg.epochs * -(-cfg.n_train // cfg.batch_size)
    lm_cache: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []
    jobs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]  # seed-major: a partial run is still paired
    for arm, seed in tqdm(jobs, desc="frozen-lm arms x seeds", unit="run"):
        model = build_arm(arm, cfg, len(CLUTTER_CLASSES), seed, lm_cache)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"arm": arm, "seed": seed}
        try:
            result = fit(
                model,
                train,
                None,
                "full-adamw",
                epochs=cfg.epochs,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                warmup_steps=max(1, round(cfg.warmup_fraction * steps)),
                label_smoothing=cfg.label_smoothing,
                batch_size=cfg.batch_size,
                seed=seed,
                progress=False,
                **compute_options(TuneConfig, options),
            )
        except PotpourriError as exc:  # a NaN loss is a result of this arm, not a crash of the experiment
            row.update(status="diverged", error=str(exc))
        else:
            model = result.model
            row.update(
                status="ok",
                clean_acc=evaluate(model, test, device=device)["acc"],
                corrupt_acc=statistics.fmean(
                    evaluate(model, data, device=device)["acc"] for data in corrupted.values()
                ),
                **filtering_iou(model, iou_x, iou_truth, device=device),
            )
        row["seconds"] = time.perf_counter() - t0
        row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        rows.append(row)
        run.log_metrics({k: row.get(k, "") for k in COLUMNS})  # fixed columns: arms differ in what they record
    table = summarise(rows, cfg.arms)
    markdown = _markdown(table)
    seconds = time.perf_counter() - started
    (run.path / "results.md").write_text(markdown + "\n")
    run.write_summary({"table": table, "runs": rows, "seconds": seconds})
    report = Report("potpourri reproduce frozen-lm")
    report.section(
        "A frozen language-model layer inside a small ViT",
        f"ViT (d={cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size}) trained from scratch on "
        f"{cfg.n_train} object-in-clutter images at {cfg.image_size} px for {cfg.epochs} epochs, seeds "
        f"{list(cfg.seeds)}; test on {cfg.n_test} images, corruptions {', '.join(cfg.corruptions)} at severity "
        f"{cfg.severity}. IoU: best-threshold token pseudo-mask IoU with the object tokens on {k} test images.",
    )
    report.table([{k: v for k, v in e.items() if not k.endswith("_values")} for e in table])
    report.code(markdown)
    report.text(f"Total {seconds:.0f} s.", note=True)
    report.write(run.path / "report.html")
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce frozen-lm`` (or its smoke run with ``quick``) on ``options``' device and precision."""
    cfg = FrozenLMConfig()
    return reproduce_frozen_lm(cfg.quick() if quick else cfg, out=out, options=options)
