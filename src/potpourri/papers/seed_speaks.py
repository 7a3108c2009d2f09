"""``potpourri reproduce seed-speaks``: a SEED tokenizer that speaks (issue 27, part 2) — SEED's text alignment and a
pixel decoder, at CPU scale on DS-Synth.

Reading order:
1. Data: DS-Synth images of five surfaces, every kind (good + six defects), their captions; frozen ImageNet
   EfficientNet-Lite0 ``forward_features`` (the tokenizer's input) and frozen MiniLM-L6 caption embeddings (the text
   side of the alignment; pretrained all-MiniLM-L6-v2, not CLIP's text tower).
2. Two tokenizers, same seed and steps (``vlm/tokenizer.train_tokenizer``): without and with SEED's text alignment
   (a contrastive term between the last causal query and its caption; every image with the same caption is a
   positive).
3. What the tokens carry, on held-out images: decode each image's 32 tokens to a feature, take the most similar
   *other* test image, and score same defect kind / same surface; with the text head also caption → image (each
   test caption against every test image's text embedding: is the top image of the caption's defect kind?).
4. A pixel decoder per tokenizer (``vlm/seed_decoder``: codes → 64 px images, L1 + MSE): PSNR on held-out images
   against a flat mean-colour floor, and a Lite0-feature Fréchet distance (a small-scale FID: the pooled features on
   their first 32 principal components, as 140 images cannot fill 1280 dimensions) of the decoded images to the real
   ones, next to the distance between two real sets (train vs test) as a floor.

Not SEED's scale: no SD decoder (no weights here), no LLM in this experiment (an LM writing these codes is
``vlm/seed.py``'s image writer), a 2-layer Q-Former, a few hundred steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from potpourri.core.metrics import frechet_distance
from potpourri.core.registry import create_model
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions
from potpourri.data.synth import CLASSES, make_samples
from potpourri.models.pixel_decoder import CodePixelDecoder, PixelDecoderConfig
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, codebook_usage
from potpourri.report.tables import markdown_table
from potpourri.vlm.seed_decoder import PixelDecoderTrainConfig, decode_tokens, token_codes, train_pixel_decoder
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

__all__ = ["SeedSpeaksConfig", "chance_same_label", "reproduce_seed_speaks", "run"]

ARMS = ("no text", "text-aligned")


@dataclass
class SeedSpeaksConfig:
    """Data, budgets and shapes; the defaults take a few CPU-minutes on one thread."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "tissue")
    image_size: int = 128  # the tokenizer's input (Lite0: a 4x4 feature grid)
    pixel_size: int = 64  # what the pixel decoder makes
    train_per_kind: int = 14  # per surface: 98 training images
    test_per_kind: int = 4  # per surface: 28 held-out images
    tokenizer_steps: int = 250
    decoder_steps: int = 1500
    batch_size: int = 32
    text_weight: float = 1.0
    codebook_size: int = 256
    frechet_dims: int = 32  # principal components of the Lite0 features the Fréchet distance compares
    seed: int = 0
    quick_models: bool = False  # random-weight encoders (the quick run): numbers meaningless

    def quick(self) -> SeedSpeaksConfig:
        """A seconds-long smoke configuration of the same code path."""
        return replace(self, categories=("brick", "moon"), image_size=64, pixel_size=32, train_per_kind=2,
                       test_per_kind=1, tokenizer_steps=3, decoder_steps=3, batch_size=8, codebook_size=16,
                       quick_models=True)  # fmt: skip


def _samples(cfg: SeedSpeaksConfig, split: str, per_kind: int) -> list:
    return [s for c in cfg.categories
            for s in make_samples(c, split, per_kind * len(CLASSES), seed=cfg.seed, size=cfg.image_size)]  # fmt: skip


def _pixels(samples: list, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]."""
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def _features(encoder: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([encoder.forward_features(b) for b in pixels.split(64)])  # Lite0's mean/std are 0.5: [-1, 1]


@torch.no_grad()
def _pooled(encoder: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    return torch.cat([encoder.forward_head(encoder.forward_features(b), pre_logits=True)
                      for b in pixels.split(64)]).double().numpy()  # fmt: skip


@torch.no_grad()
def _neighbour_scores(tok: SEEDTokenizer, tokens: torch.Tensor, features: torch.Tensor, kinds, surfaces) -> dict:
    """Decode each image's tokens; its most similar other test image (by target feature): same kind / surface?"""
    decoded = F.normalize(tok.decode(tokens).flatten(1), dim=1)
    gallery = F.normalize(tok.target_of(features).flatten(1), dim=1)
    sims = decoded @ gallery.T
    sims.fill_diagonal_(-float("inf"))  # the image itself does not count
    best = sims.argmax(1).tolist()
    return {"kind": float(np.mean([kinds[b] == kinds[i] for i, b in enumerate(best)])),
            "surface": float(np.mean([surfaces[b] == surfaces[i] for i, b in enumerate(best)]))}  # fmt: skip


def chance_same_label(labels: list, *, others_only: bool = True) -> float:
    """Chance that an image drawn uniformly has my label: from the other images (nearest-other-image scores), or from
    all of them, mine included (caption → image)."""
    _, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    if others_only:
        return float(sum(c * (c - 1) for c in counts) / (n * (n - 1)))
    return float(sum(c * c for c in counts) / (n * n))


def reproduce_seed_speaks(cfg: SeedSpeaksConfig, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train both tokenizers and their pixel decoders, score them; writes ``results.md`` and ``summary.json``."""
    options = options or TrainOptions(progress=False)
    run = new_run("reproduce-seed-speaks", out, config=asdict(cfg), seed=cfg.seed)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    pretrained = not cfg.quick_models
    encoder = create_model("efficientnet_lite0", pretrained=pretrained).eval()
    text_model = create_model("minilm_l6", pretrained=pretrained).eval()
    train, test = _samples(cfg, "train", cfg.train_per_kind), _samples(cfg, "test", cfg.test_per_kind)
    train_px, test_px = _pixels(train, cfg.image_size), _pixels(test, cfg.image_size)
    train_f, test_f = _features(encoder, train_px), _features(encoder, test_px)
    small_train, small_test = _pixels(train, cfg.pixel_size), _pixels(test, cfg.pixel_size)
    captions = sorted({s.caption for s in train})
    caption_ids = torch.tensor([captions.index(s.caption) for s in train])
    with torch.no_grad():
        caption_emb = text_model.encode(captions)  # (C, 384), unit norm
    kinds, surfaces = [s.kind for s in test], [s.category for s in test]
    real_test = _pooled(encoder, F.interpolate(small_test, size=cfg.image_size, mode="bilinear"))
    real_train = _pooled(encoder, F.interpolate(small_train, size=cfg.image_size, mode="bilinear"))
    # the Fréchet distance needs more images than dimensions: Lite0's 1280-d pooled features on their first
    # principal components, fitted on the real training images
    centre = real_train.mean(0)
    basis = np.linalg.svd(real_train - centre, full_matrices=False)[2][: min(cfg.frechet_dims, len(test) - 1)]
    real_test, real_train = (real_test - centre) @ basis.T, (real_train - centre) @ basis.T

    rows: list[dict[str, Any]] = []
    for arm in ARMS:
        aligned = arm == "text-aligned"
        torch.manual_seed(cfg.seed)
        tok = SEEDTokenizer(SEEDConfig(feature_dim=train_f.shape[1], codebook_size=cfg.codebook_size, ema=True,
                                       text_dim=caption_emb.shape[1] if aligned else 0))  # fmt: skip
        tcfg = TokenizerTrainConfig(steps=cfg.tokenizer_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                    text_weight=cfg.text_weight, progress=False)  # fmt: skip
        folder = run.path / arm.replace(" ", "-")
        history = train_tokenizer(tok, train_f, tcfg, options=options, checkpoints=folder / "tokenizer",
                                  captions=caption_emb[caption_ids] if aligned else None,
                                  caption_ids=caption_ids if aligned else None)  # fmt: skip
        tok = tok.cpu().eval()
        tokens = tok.tokenize(test_f)
        row: dict[str, Any] = {"arm": arm, "tokenizer_loss_last": history.loss[-1],
                               "codes_used_test": codebook_usage(tokens, cfg.codebook_size)["used_fraction"],
                               **{f"neighbour_{k}": v for k, v in _neighbour_scores(tok, tokens, test_f, kinds,
                                                                                   surfaces).items()}}  # fmt: skip
        if aligned:  # each test caption against every test image's text embedding: the top image's defect kind
            with torch.no_grad():
                image_text = F.normalize(tok.text_embedding(test_f), dim=-1)
                queries = text_model.encode([s.caption for s in test])
            top = (queries @ image_text.T).argmax(1).tolist()
            row["caption_to_image_kind"] = float(np.mean([kinds[t] == kinds[i] for i, t in enumerate(top)]))
        torch.manual_seed(cfg.seed)
        decoder = CodePixelDecoder(PixelDecoderConfig(code_dim=tok.config.code_dim, num_codes=tok.config.num_queries,
                                                      image_size=cfg.pixel_size))  # fmt: skip
        dcfg = PixelDecoderTrainConfig(steps=cfg.decoder_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                       progress=False)  # fmt: skip
        dlosses = train_pixel_decoder(decoder, token_codes(tok, train_f), small_train, dcfg, options=options,
                                      checkpoints=folder / "pixel-decoder")  # fmt: skip
        decoder = decoder.cpu().eval()
        decoded = decode_tokens(decoder, tok, tokens)
        mse = ((decoded.clamp(-1, 1) - small_test) / 2).pow(2).flatten(1).mean(1)
        row["psnr"] = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
        fake = (_pooled(encoder, F.interpolate(decoded, size=cfg.image_size, mode="bilinear")) - centre) @ basis.T
        row["frechet_lite0"] = frechet_distance(fake, real_test)
        row["decoder_loss_last"] = dlosses[-1]
        rows.append(row)
        run.log_metrics(row)

    flat = small_test.mean((2, 3), keepdim=True).expand_as(small_test)
    floor_mse = ((flat - small_test) / 2).pow(2).flatten(1).mean(1)
    references = {"psnr_mean_colour": float((10 * torch.log10(1 / floor_mse.clamp_min(1e-10))).mean()),
                  "frechet_real_train_vs_test": frechet_distance(real_train, real_test),
                  "chance_kind": chance_same_label(kinds), "chance_surface": chance_same_label(surfaces),
                  "chance_caption_kind": chance_same_label(kinds, others_only=False)}  # fmt: skip
    seconds = time.perf_counter() - started
    header = ["arm", "nearest other image: same defect kind", "same surface", "caption → image: defect kind",
              "codes used (test)", "PSNR dB", "Lite0 Fréchet"]  # fmt: skip
    body = [[r["arm"], f"{r['neighbour_kind']:.3f}", f"{r['neighbour_surface']:.3f}",
             f"{r['caption_to_image_kind']:.3f}" if "caption_to_image_kind" in r else "—",
             f"{r['codes_used_test']:.3f}", f"{r['psnr']:.2f}", f"{r['frechet_lite0']:.1f}"] for r in rows]  # fmt: skip
    body.append(["reference", f"chance {references['chance_kind']:.3f}", f"chance {references['chance_surface']:.3f}",
                 f"chance {references['chance_caption_kind']:.3f}", "—",
                 f"{references['psnr_mean_colour']:.2f} (mean colour)",
                 f"{references['frechet_real_train_vs_test']:.1f} (real train vs test)"])  # fmt: skip
    lines = [
        "# SEED that speaks: text alignment and a pixel decoder (DS-Synth, CPU scale)", "",
        f"{len(train)} training and {len(test)} held-out images of {', '.join(cfg.categories)} at {cfg.image_size} px "
        f"(every kind); tokenizers {cfg.tokenizer_steps} steps (EMA codebook of {cfg.codebook_size}, restarts), pixel "
        f"decoders {cfg.decoder_steps} steps to {cfg.pixel_size} px; seed {cfg.seed}. Captions embedded by frozen "
        f"MiniLM-L6 ({len(captions)} distinct)." + (" QUICK: random-weight encoders, numbers meaningless." if
                                                    cfg.quick_models else ""), "",
        markdown_table(header, body), "",
        f"Total {seconds / 60:.1f} min on {torch.get_num_threads()} thread(s).",
    ]  # fmt: skip
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary({"config": asdict(cfg), "rows": rows, "references": references, "seconds": seconds})
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """``potpourri reproduce seed-speaks`` (or its smoke run); ``seed`` seeds the data, both models and the batches."""
    cfg = SeedSpeaksConfig(seed=seed)
    return reproduce_seed_speaks(cfg.quick() if quick else cfg, out=out, options=options)
