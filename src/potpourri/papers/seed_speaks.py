"""``potpourri reproduce seed-speaks``: a SEED tokenizer that speaks (issue 27, part 2) — SEED's text alignment, a
pixel decoder and a caption-conditioned code writer, at CPU scale on DS-Synth.

Reading order:
1. Data: DS-Synth images of five surfaces, every kind (good + six defects), their captions; frozen ImageNet
   EfficientNet-Lite0 ``forward_features`` (the tokenizer's input) and frozen MiniLM-L6 caption embeddings (the text
   side of the alignment; pretrained all-MiniLM-L6-v2, not CLIP's text tower).
2. Three tokenizers, same seed and steps (``vlm/tokenizer.train_tokenizer``): no text; SEED's contrastive alignment
   on the last causal query (continuous, before quantisation); the same alignment read from the *quantised* codes
   (``text_from="codes"``: a learned query over the straight-through code vectors, so only what survives
   quantisation can match the caption).
3. What the tokens carry, on held-out images: the most similar *other* test image by the decoded feature and by the
   code vectors themselves (same defect kind? same surface?); with a text head, caption → image (each test caption
   against every test image's text embedding: is the top image of the caption's defect kind?).
4. Pixels, from the code-aligned tokenizer: a decoder from the 32 codes alone, and one that also reads 16 colour
   tokens (``vlm/seed_decoder.ColourTokens``: a 4x4 thumbnail quantised to a k-means palette) and adds detail to
   them; PSNR on held-out images against a flat mean-colour image (an oracle: the true image's own mean), and a
   Lite0-feature Fréchet distance (a small-scale FID on the first 32 principal components) to the real ones.
5. Codes → new images: a small caption-conditioned causal transformer (``vlm/code_sampler``, NOT the LLM: a stand-in
   for SmolLM2 writing ``<img_k>`` tokens) learns caption → 32 codes + 16 colour tokens on the training images, then
   writes codes for every held-out caption; the decoder makes pixels. Scored by the Fréchet distance to the real
   test images, a defect-kind and a surface classifier (logistic regression on Lite0 features of real training
   images) on the generated images against the requested kind/surface, and the tokenizer's own reading (the held-out
   caption nearest the generated tokens' text embedding: of the requested kind?).
6. The LLM writes the same sequences: SmolLM2-135M with the 256 codes and the palette's colours as new ``<img_k>``
   vocabulary (``vlm/seed.ImageTokenWriter``: new rows + LoRA on q/v, the rest frozen), trained on
   ``[generate] caption`` -> sequence, then greedy for every held-out caption (each part restricted to its ids); the
   same decoder makes pixels, scored as in 5.

Not SEED's scale: no SD decoder (no weights here), a 135M LLM, a 2-layer Q-Former, a few hundred steps.
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
from potpourri.vlm.code_sampler import CodeSampler, CodeSamplerConfig, CodeSamplerTrainConfig, train_code_sampler
from potpourri.vlm.seed import ImageTokenWriter, ImageWriterTrainConfig, train_image_writer
from potpourri.vlm.seed_decoder import (
    ColourTokens,
    PixelDecoderTrainConfig,
    decode_tokens,
    token_codes,
    train_pixel_decoder,
)
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

__all__ = [
    "SeedSpeaksConfig", "chance_same_label", "nearest_other_same", "reproduce_seed_speaks", "run", "write_with_lm",
]  # fmt: skip

ARMS = {"no text": None, "text on last query": "last", "text on codes": "codes"}  # arm -> text_from


@dataclass
class SeedSpeaksConfig:
    """Data, budgets and shapes; the defaults take about 10 CPU-minutes on one thread."""

    categories: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "tissue")
    image_size: int = 128  # the tokenizer's input (Lite0: a 4x4 feature grid)
    pixel_size: int = 64  # what the pixel decoder makes
    train_per_kind: int = 14  # per surface: 98 training images
    test_per_kind: int = 4  # per surface: 28 held-out images
    tokenizer_steps: int = 250
    decoder_steps: int = 500
    sampler_steps: int = 600
    batch_size: int = 32
    text_weight: float = 1.0
    codebook_size: int = 256
    colour_grid: int = 4  # colour tokens: a colour_grid x colour_grid thumbnail ...
    colour_palette: int = 64  # ... each cell one of this many k-means colours
    temperature: float = 1.0  # the code sampler's
    lm: str = "smollm2_135m"  # the LLM that writes the same sequences as new vocabulary ("tiny": a random test LM)
    lm_steps: int = 100  # its steps (new vocabulary rows + LoRA on q/v)
    frechet_dims: int = 32  # principal components of the Lite0 features the Fréchet distance compares
    seed: int = 0
    quick_models: bool = False  # random-weight encoders (the quick run): numbers meaningless

    def quick(self) -> SeedSpeaksConfig:
        """A seconds-long smoke configuration of the same code path."""
        return replace(self, categories=("brick", "moon"), image_size=64, pixel_size=32, train_per_kind=2,
                       test_per_kind=1, tokenizer_steps=3, decoder_steps=3, sampler_steps=3, batch_size=8,
                       codebook_size=16, colour_palette=8, quick_models=True, lm="tiny", lm_steps=2)  # fmt: skip


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


def nearest_other_same(embeddings: torch.Tensor, labels: list, gallery: torch.Tensor | None = None) -> float:
    """Fraction of items whose most cosine-similar *other* item (in ``gallery``, default the items themselves, row
    for row) has the same label."""
    queries = F.normalize(embeddings.flatten(1).float(), dim=1)
    keys = queries if gallery is None else F.normalize(gallery.flatten(1).float(), dim=1)
    sims = queries @ keys.T
    sims.fill_diagonal_(-float("inf"))  # the item itself does not count
    best = sims.argmax(1).tolist()
    return float(np.mean([labels[b] == labels[i] for i, b in enumerate(best)]))


@torch.no_grad()
def _token_scores(tok: SEEDTokenizer, tokens: torch.Tensor, features: torch.Tensor, kinds, surfaces) -> dict:
    """Nearest other test image by the decoded feature (against the real targets) and by the code vectors."""
    decoded, targets = tok.decode(tokens), tok.target_of(features)
    codes = tok.quantizer.codebook[tokens]
    return {"neighbour_kind": nearest_other_same(decoded, kinds, targets),
            "neighbour_surface": nearest_other_same(decoded, surfaces, targets),
            "codes_kind": nearest_other_same(codes, kinds),
            "codes_surface": nearest_other_same(codes, surfaces)}  # fmt: skip


def _psnr(images: torch.Tensor, real: torch.Tensor) -> float:
    mse = ((images.clamp(-1, 1) - real) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def _probe(train: np.ndarray, labels: list, tests: dict[str, tuple[np.ndarray, list]]) -> dict[str, float]:
    """A logistic regression on standardised features of real training images; its accuracy on each test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(scaler.transform(train), labels)
    return {name: float(clf.score(scaler.transform(x), y)) for name, (x, y) in tests.items()}


def chance_same_label(labels: list, *, others_only: bool = True) -> float:
    """Chance that an image drawn uniformly has my label: from the other images (nearest-other-image scores), or from
    all of them, mine included (caption → image)."""
    _, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    if others_only:
        return float(sum(c * (c - 1) for c in counts) / (n * (n - 1)))
    return float(sum(c * c for c in counts) / (n * n))


def _train_decoder(cfg: SeedSpeaksConfig, tok: SEEDTokenizer, codes: torch.Tensor, pixels: torch.Tensor, folder,
                   options: TrainOptions, low: torch.Tensor | None = None) -> CodePixelDecoder:  # fmt: skip
    torch.manual_seed(cfg.seed)
    decoder = CodePixelDecoder(PixelDecoderConfig(code_dim=tok.config.code_dim, num_codes=tok.config.num_queries,
                                                  image_size=cfg.pixel_size,
                                                  skip_grid=0 if low is None else cfg.colour_grid))  # fmt: skip
    dcfg = PixelDecoderTrainConfig(steps=cfg.decoder_steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
    train_pixel_decoder(decoder, codes, pixels, dcfg, options=options, checkpoints=folder, low=low)
    return decoder.cpu().eval()


def reproduce_seed_speaks(cfg: SeedSpeaksConfig, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train the three tokenizers, the code-aligned one's pixel decoders and code sampler, score them; writes
    ``results.md`` and ``summary.json``."""
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
        test_caption_emb = text_model.encode([s.caption for s in test])  # (N, 384): the prompts
    kinds, surfaces = [s.kind for s in test], [s.category for s in test]

    def lite0(images: torch.Tensor) -> np.ndarray:  # pooled features of pixel-size images, seen at the input size
        return _pooled(encoder, F.interpolate(images, size=cfg.image_size, mode="bilinear"))

    real_test, real_train = lite0(small_test), lite0(small_train)
    # the Fréchet distance needs more images than dimensions: Lite0's 1280-d pooled features on their first
    # principal components, fitted on the real training images
    centre = real_train.mean(0)
    basis = np.linalg.svd(real_train - centre, full_matrices=False)[2][: min(cfg.frechet_dims, len(test) - 1)]

    def frechet(pooled: np.ndarray) -> float:
        return frechet_distance((pooled - centre) @ basis.T, (real_test - centre) @ basis.T)

    rows: list[dict[str, Any]] = []
    tokenizers: dict[str, SEEDTokenizer] = {}
    for arm, text_from in ARMS.items():
        torch.manual_seed(cfg.seed)
        tok = SEEDTokenizer(SEEDConfig(feature_dim=train_f.shape[1], codebook_size=cfg.codebook_size, ema=True,
                                       text_dim=caption_emb.shape[1] if text_from else 0,
                                       text_from=text_from or "last"))  # fmt: skip
        tcfg = TokenizerTrainConfig(steps=cfg.tokenizer_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                    text_weight=cfg.text_weight, progress=False)  # fmt: skip
        history = train_tokenizer(tok, train_f, tcfg, options=options, checkpoints=run.path / _slug(arm) / "tokenizer",
                                  captions=caption_emb[caption_ids] if text_from else None,
                                  caption_ids=caption_ids if text_from else None)  # fmt: skip
        tok = tokenizers[arm] = tok.cpu().eval()
        tokens = tok.tokenize(test_f)
        row: dict[str, Any] = {"arm": arm, "tokenizer_loss_last": history.loss[-1],
                               "codes_used_test": codebook_usage(tokens, cfg.codebook_size)["used_fraction"],
                               **_token_scores(tok, tokens, test_f, kinds, surfaces)}  # fmt: skip
        if text_from:  # each test caption against every test image's text embedding: the top image's defect kind
            with torch.no_grad():
                image_text = F.normalize(tok.text_embedding(test_f), dim=-1)
            top = (test_caption_emb @ image_text.T).argmax(1).tolist()
            row["caption_to_image_kind"] = float(np.mean([kinds[t] == kinds[i] for i, t in enumerate(top)]))
            row["text_kind"] = nearest_other_same(image_text, kinds)
        rows.append(row)
        run.log_metrics(row)

    # pixels and new images, from the tokenizer aligned on its codes
    tok = tokenizers["text on codes"]
    train_tokens, test_tokens = tok.tokenize(train_f), tok.tokenize(test_f)
    train_codes = token_codes(tok, train_f)
    colours = ColourTokens(cfg.colour_grid, cfg.colour_palette).fit(small_train, seed=cfg.seed)
    train_colours, test_colours = colours.encode(small_train), colours.encode(small_test)
    folder = run.path / _slug("text on codes")
    plain = _train_decoder(cfg, tok, train_codes, small_train, folder / "pixel-decoder", options)
    skip = _train_decoder(cfg, tok, train_codes, small_train, folder / "pixel-decoder-colour", options,
                          low=colours.decode(train_colours))  # fmt: skip
    decoded = {"codes only": decode_tokens(plain, tok, test_tokens),
               "codes + colour tokens": decode_tokens(skip, tok, test_tokens, colours, test_colours)}  # fmt: skip
    coarse = F.interpolate(colours.decode(test_colours), size=cfg.pixel_size, mode="bilinear", align_corners=False)
    flat = small_test.mean((2, 3), keepdim=True).expand_as(small_test)
    oracle = F.interpolate(colours.cells(small_test).transpose(1, 2).reshape(coarse.shape[0], 3, cfg.colour_grid,
                                                                             cfg.colour_grid),
                           size=cfg.pixel_size, mode="bilinear", align_corners=False)  # fmt: skip
    pixel_rows = [{"decoder": name, "psnr": _psnr(images, small_test), "frechet_lite0": frechet(lite0(images))}
                  for name, images in decoded.items()]  # fmt: skip
    pixel_refs = {"psnr_colour_tokens_alone": _psnr(coarse, small_test), "psnr_mean_colour": _psnr(flat, small_test),
                  "psnr_thumbnail_unquantised": _psnr(oracle, small_test),
                  "frechet_colour_tokens_alone": frechet(lite0(coarse)),
                  "frechet_real_train_vs_test": frechet(real_train)}  # fmt: skip

    # codes -> new images: a caption-conditioned sampler writes 32 codes + the colour tokens for each test caption
    sequences = torch.cat([train_tokens, train_colours + cfg.codebook_size], 1)  # colour ids after the codebook's
    torch.manual_seed(cfg.seed)
    sampler = CodeSampler(CodeSamplerConfig(codebook_size=cfg.codebook_size + cfg.colour_palette,
                                            num_codes=sequences.shape[1], cond_dim=caption_emb.shape[1]))  # fmt: skip
    scfg = CodeSamplerTrainConfig(steps=cfg.sampler_steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
    sampler_losses = train_code_sampler(sampler, caption_emb[caption_ids], sequences, scfg, options=options,
                                        checkpoints=folder / "code-sampler")  # fmt: skip
    sampler = sampler.cpu().eval()
    q = tok.config.num_queries
    allowed = torch.zeros(sequences.shape[1], cfg.codebook_size + cfg.colour_palette, dtype=torch.bool)
    allowed[:q, : cfg.codebook_size], allowed[q:, cfg.codebook_size :] = True, True  # codes first, then colours
    written = sampler.sample(test_caption_emb, temperature=cfg.temperature, allowed=allowed,
                             generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    semantic, colour_part = written[:, :q], written[:, q:] - cfg.codebook_size
    generated = decode_tokens(skip, tok, semantic, colours, colour_part)
    lm_written, lm_history = write_with_lm(cfg, [s.caption for s in train], sequences, [s.caption for s in test],
                                           allowed, folder / "lm-writer", options)  # fmt: skip
    lm_semantic = lm_written[:, :q]
    lm_generated = decode_tokens(skip, tok, lm_semantic, colours, lm_written[:, q:] - cfg.codebook_size)
    seen = {tuple(t) for t in train_tokens.tolist()}
    pooled = {"real test images": real_test, "decoded test tokens": lite0(decoded["codes + colour tokens"]),
              "generated from test captions": lite0(generated),
              f"written by {cfg.lm} from test captions": lite0(lm_generated)}  # fmt: skip
    train_kinds, train_surfaces = [s.kind for s in train], [s.category for s in train]
    kind_acc = _probe(real_train, train_kinds, {k: (v, kinds) for k, v in pooled.items()})
    surface_acc = _probe(real_train, train_surfaces, {k: (v, surfaces) for k, v in pooled.items()})
    with torch.no_grad():  # the tokenizer's own reading: the test caption nearest each image's tokens
        prompts = F.normalize(test_caption_emb, dim=-1)
        read = {"decoded test tokens": tok.text_of_tokens(test_tokens), "generated from test captions":
                tok.text_of_tokens(semantic), f"written by {cfg.lm} from test captions":
                tok.text_of_tokens(lm_semantic)}  # fmt: skip
        reading = {k: float(np.mean([kinds[j] == kinds[i] for i, j in enumerate(
            (F.normalize(v, dim=-1) @ prompts.T).argmax(1).tolist())])) for k, v in read.items()}  # fmt: skip
    generation = {
        "distinct": len({tuple(t) for t in semantic.tolist()}),
        "copies_of_training_codes": float(np.mean([tuple(t) in seen for t in semantic.tolist()])),
        "sampler_loss_last": sampler_losses[-1],
        "lm_distinct": len({tuple(t) for t in lm_semantic.tolist()}),
        "lm_copies_of_training_codes": float(np.mean([tuple(t) in seen for t in lm_semantic.tolist()])),
        "lm_loss_last": lm_history[-1]["loss"] if lm_history else None,
        "rows": [{"images": k, "frechet_lite0": frechet(v) if k != "real test images" else None,
                  "kind_classifier": kind_acc[k], "surface_classifier": surface_acc[k], "tokenizer_reads_kind":
                  reading.get(k)} for k, v in pooled.items()],
    }  # fmt: skip
    references = {"chance_kind": chance_same_label(kinds), "chance_surface": chance_same_label(surfaces),
                  "chance_caption_kind": chance_same_label(kinds, others_only=False),
                  "chance_classifier_kind": 1 / len(set(kinds)), "chance_classifier_surface": 1 / len(set(surfaces)),
                  **pixel_refs}  # fmt: skip
    seconds = time.perf_counter() - started
    (run.path / "results.md").write_text(_report(cfg, len(train), len(test), len(captions), rows, pixel_rows,
                                                 generation, references, seconds))  # fmt: skip
    run.write_summary({"config": asdict(cfg), "rows": rows, "pixels": pixel_rows, "generation": generation,
                       "references": references, "seconds": seconds})  # fmt: skip
    return run


def write_with_lm(cfg: SeedSpeaksConfig, captions: list[str], sequences: torch.Tensor, prompts: list[str],
                  allowed: torch.Tensor, folder, options: TrainOptions) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """The LLM (``cfg.lm``) learns ``[generate] caption`` -> the training sequences as new ``<img_k>`` vocabulary
    (``vlm.seed``), then writes one sequence per prompt, greedy, each position restricted by ``allowed``."""
    from potpourri.models.vlm import build_lm

    torch.manual_seed(cfg.seed)
    lm, tokenizer = build_lm(cfg.lm, seed=cfg.seed)
    writer = ImageTokenWriter(lm, tokenizer, allowed.shape[1])
    wcfg = ImageWriterTrainConfig(steps=cfg.lm_steps, batch_size=8, lr=1e-3, vocab_lr=1e-2, warmup_steps=5,
                                  seed=cfg.seed, progress=False)  # fmt: skip
    history = train_image_writer(writer, captions, sequences, wcfg, options=options, checkpoints=folder)
    writer.cpu().eval()
    written = [writer.generate_codes(prompts[i : i + 16], allowed.shape[0], allowed=allowed)[0]
               for i in range(0, len(prompts), 16)]  # fmt: skip
    return torch.cat(written), history


def _slug(arm: str) -> str:
    return arm.replace(" ", "-")


def _report(cfg: SeedSpeaksConfig, n_train: int, n_test: int, n_captions: int, rows: list, pixel_rows: list,
            generation: dict, refs: dict, seconds: float) -> str:  # fmt: skip
    """The run's ``results.md``: three tables (what the tokens carry; pixels; new images)."""

    def cell(value: float | None, fmt: str = ".3f") -> str:
        return "—" if value is None else format(value, fmt)

    tokens = markdown_table(
        ["tokenizer", "nearest other image by decoded feature: same defect kind", "same surface",
         "by code vectors: same defect kind", "same surface", "by text embedding: same defect kind",
         "caption → image: defect kind", "codes used (test)"],
        [[r["arm"], cell(r["neighbour_kind"]), cell(r["neighbour_surface"]), cell(r["codes_kind"]),
          cell(r["codes_surface"]), cell(r.get("text_kind")), cell(r.get("caption_to_image_kind")),
          cell(r["codes_used_test"])] for r in rows]
        + [["chance", cell(refs["chance_kind"]), cell(refs["chance_surface"]), cell(refs["chance_kind"]),
            cell(refs["chance_surface"]), cell(refs["chance_kind"]), cell(refs["chance_caption_kind"]), "—"]],
    )  # fmt: skip
    pixels = markdown_table(
        ["decoder (tokenizer: text on codes)", "PSNR dB", "Lite0 Fréchet"],
        [[r["decoder"], cell(r["psnr"], ".2f"), cell(r["frechet_lite0"], ".1f")] for r in pixel_rows]
        + [["colour tokens alone (upsampled)", cell(refs["psnr_colour_tokens_alone"], ".2f"),
            cell(refs["frechet_colour_tokens_alone"], ".1f")],
           ["flat mean colour of the true image (oracle)", cell(refs["psnr_mean_colour"], ".2f"), "—"],
           [f"true {cfg.colour_grid}x{cfg.colour_grid} thumbnail, unquantised (oracle)",
            cell(refs["psnr_thumbnail_unquantised"], ".2f"), "—"],
           ["real training images", "—", cell(refs["frechet_real_train_vs_test"], ".1f")]],
    )  # fmt: skip
    new = markdown_table(
        ["images (of the test captions)", "Lite0 Fréchet to real test", "kind classifier: requested kind",
         "surface classifier: requested surface", "tokenizer reads the requested kind"],
        [[r["images"], cell(r["frechet_lite0"], ".1f"), cell(r["kind_classifier"]), cell(r["surface_classifier"]),
          cell(r["tokenizer_reads_kind"])] for r in generation["rows"]]
        + [["chance", "—", cell(refs["chance_classifier_kind"]), cell(refs["chance_classifier_surface"]),
            cell(refs["chance_caption_kind"])]],
    )  # fmt: skip
    lines = [
        "# SEED that speaks: text alignment, a pixel decoder, captions → new images (DS-Synth, CPU scale)", "",
        f"{n_train} training and {n_test} held-out images of {', '.join(cfg.categories)} at {cfg.image_size} px "
        f"(every kind); tokenizers {cfg.tokenizer_steps} steps (EMA codebook of {cfg.codebook_size}, restarts), pixel "
        f"decoders {cfg.decoder_steps} steps to {cfg.pixel_size} px, colour tokens {cfg.colour_grid}x{cfg.colour_grid} "
        f"of a {cfg.colour_palette}-colour palette, code sampler {cfg.sampler_steps} steps (temperature "
        f"{cfg.temperature}); seed {cfg.seed}. Captions embedded by frozen MiniLM-L6 ({n_captions} distinct)."
        + (" QUICK: random-weight encoders, numbers meaningless." if cfg.quick_models else ""), "",
        "## What the tokens carry (held-out images)", "", tokens, "",
        "## Pixels from tokens (held-out images)", "", pixels, "",
        "## New images: the code sampler (not the LLM) and the LLM write tokens for each held-out caption", "", new,
        "",
        f"Sampled code sequences (32 codes, then colour tokens; sampling restricted to each part's ids): distinct "
        f"{generation['distinct']} of {n_test}; exact copies of a training image's codes: "
        f"{generation['copies_of_training_codes']:.3f}. Written by {cfg.lm} ({cfg.lm_steps} steps of new "
        f"vocabulary rows + LoRA, greedy, each part restricted to its ids): distinct {generation['lm_distinct']} of "
        f"{n_test}; copies {generation['lm_copies_of_training_codes']:.3f}.", "",
        f"Total {seconds / 60:.1f} min on {torch.get_num_threads()} thread(s).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """``potpourri reproduce seed-speaks`` (or its smoke run); ``seed`` seeds the data, every model and the batches."""
    cfg = SeedSpeaksConfig(seed=seed)
    return reproduce_seed_speaks(cfg.quick() if quick else cfg, out=out, options=options)
