"""``potpourri reproduce v2l``: images as words of a frozen LLM (V2L tokenizer, Zhu et al., CVPR 2024,
arXiv:2403.07874), k-shot in-context defect classification by frozen SmolLM2-135M, at CPU scale.

Reading order:
1. **Local tokens** (``potpourri.models.v2l.V2LTokenizer``): frozen EfficientNet-Lite0 ``blocks.4`` map (stride 16:
   4x4 tokens at 64 px) → a trainable projection into SmolLM2's 576-d token-embedding space → cosine nearest
   (centred) row among the FROZEN input embeddings of SmolLM2's most frequent lower-case words (straight-through,
   commitment loss) → a small conv decoder trained to reconstruct the image (L1 + L2), on DS-Synth v2 training surfaces,
   through ``core.training.Trainer`` (time-capped, resumable with ``options.resume``).
2. **Global tokens**: as in the paper, the K vocabulary words whose text embedding is most similar to the image's
   embedding in an image–text model's joint space; the model is ours, ``clip_vit_tiny_minilm`` from a ``reproduce
   clip-small`` run (trained on brick / grass / gravel + clutter, never on the held-out surfaces; checked), not
   OpenAI's CLIP. ``global_source="ridge"`` keeps the earlier fallback: a ridge map from the Lite0 pooled feature to
   the (centred) mean SmolLM2 embedding of the image's caption, fitted on the training surfaces.
3. **In-context classification**: per episode, k support images per class (7 classes: good + 6 defect types) on
   held-out surfaces, as lines ``<global words> <local words> -> <label>``, then a query ``... ->``; the class
   whose label tokens have the highest log-likelihood under frozen SmolLM2 wins (no fine-tuning). Compared on the
   same episodes with chance (1/7) and a logistic-regression probe on the same k images' Lite0 pooled features.
   Reconstruction quality of the local tokens: PSNR on held-out images, next to a per-image mean-colour floor.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import create_model
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import Trainer, TrainOptions
from potpourri.data.synth import CLASSES, make_samples
from potpourri.models.v2l import (
    V2LConfig,
    V2LTokenizer,
    global_words,
    label_logliks,
    prefix_cache,
    word_vocabulary,
)
from potpourri.papers.clip_small import clip_model_folder, clip_run_for_seed, tiny_clip
from potpourri.report.tables import markdown_table

__all__ = ["ARMS", "V2LExperimentConfig", "reproduce_v2l", "run", "train_v2l_tokenizer"]

ARMS = ("global+local", "local", "global")  # which image words go into each prompt line
HEADER = "Each line: words describing a surface image, then its defect type.\n"


@dataclass
class V2LExperimentConfig:
    """The experiment's settings; the defaults take a few CPU-minutes on one thread."""

    train_categories: tuple[str, ...] = ("brick", "grass", "gravel")
    eval_categories: tuple[str, ...] = ("moon", "tissue")
    version: str = "2"
    severity: float = 0.75
    image_size: int = 64
    train_per_class: int = 30  # per training surface and class: tokenizer + global map
    pool_per_class: int = 8  # per held-out surface and class: support + query pool of the episodes
    vocab_limit: int = 8000
    vocab_projector: bool = True  # the paper's trainable projector of the frozen vocabulary rows (False: fixed rows)
    global_source: str = "clip"  # "clip": our clip's word-image similarity; "ridge": the Lite0 -> caption fallback
    clip_run: str | None = "runs/clip-small"  # a `reproduce clip-small` run or model folder; None: a tiny random one
    global_words: int = 3
    ridge: float = 10.0
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    max_seconds: float = 300.0  # the tokenizer's training time cap
    shots: tuple[int, ...] = (1, 2, 4)
    episodes: int = 4
    queries_per_class: int = 2
    arms: tuple[str, ...] = ARMS
    seed: int = 0

    def quick(self) -> V2LExperimentConfig:
        """A seconds-long smoke configuration of the same code path (numbers not meaningful)."""
        return replace(self, train_categories=("brick",), eval_categories=("moon",), train_per_class=2,
                       pool_per_class=2, vocab_limit=2000, steps=5, batch_size=8, shots=(1,), episodes=1,
                       queries_per_class=1, arms=("global+local",), clip_run=None)  # fmt: skip


def _images(cfg: V2LExperimentConfig, categories: tuple[str, ...], split: str, per_class: int):
    gen = {"seed": cfg.seed, "size": cfg.image_size, "severity": cfg.severity, "version": cfg.version}
    samples = [s for cat in categories for s in make_samples(cat, split, per_class * len(CLASSES), **gen)]
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.tensor([s.label for s in samples]), [s.caption for s in samples]  # (N, 3, H, W) in [-1, 1]


@torch.no_grad()
def _lite0_features(encoder: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stride-16 maps (N, 112, h, w), pooled (N, 1280)); Lite0's mean/std are 0.5, so [-1, 1] pixels feed it."""
    maps, pooled = [], []
    for batch in pixels.split(64):
        maps.append(encoder.forward_intermediates(batch, indices=[3], intermediates_only=True)[0])
        pooled.append(encoder.forward_head(encoder.forward_features(batch), pre_logits=True))
    return torch.cat(maps), torch.cat(pooled)


def train_v2l_tokenizer(
    tok: V2LTokenizer, maps: torch.Tensor, pixels: torch.Tensor, cfg: V2LExperimentConfig, folder: Any,
    options: TrainOptions,
) -> dict[str, Any]:  # fmt: skip
    """Train the projection and decoder on (feature map, pixels) batches for ``cfg.steps`` or ``cfg.max_seconds``;
    under torchrun each process reconstructs its slice of every batch (rank 0's clock ends all). Steps, loss, time."""
    optimizer = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = Trainer(tok, optimizer, total_steps=cfg.steps, options=options, folder=folder,
                      generators={"batches": generator}, desc="v2l tokenizer")  # fmt: skip
    start, losses = time.perf_counter(), []
    for _ in trainer.steps():
        index = torch.randint(len(maps), (cfg.batch_size,), generator=generator)
        local, share = trainer.shard(index)  # every term is a mean over equal-sized items: the share makes it exact
        out = tok(maps[local].to(trainer.device))
        target = pixels[local].to(trainer.device)
        loss = F.l1_loss(out.reconstruction, target) + F.mse_loss(out.reconstruction, target) + out.vq_loss
        losses.append(trainer.update(loss * share))
        if trainer.group.broadcast_object(time.perf_counter() - start > cfg.max_seconds):  # rank 0's clock decides
            break  # time cap: the final checkpoint below lets --resume continue
    trainer.finish()
    return {"steps": trainer.step, "final_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - start}


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (N,) in dB of [-1, 1] images, on the [0, 1] scale."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)  # (C, D)


@torch.no_grad()
def _clip_global_ids(folder, words, vocab: torch.Tensor, pixels: torch.Tensor, k: int) -> tuple[torch.Tensor, str]:
    """Global word ids (N, k) from our clip: each vocabulary word's text embedding (the bare word) against the image
    embedding of the [-1, 1] pixels at the clip's own input size; and a line naming the model."""
    import json

    from potpourri.models.clip_small import load_small_clip

    clip = load_small_clip(folder).eval()
    config = json.loads((folder / "config.json").read_text())
    size = config.get("vision", {}).get("img_size", pixels.shape[-1])
    texts = [t.removeprefix("Ġ") for t in words.convert_ids_to_tokens(vocab.tolist())]
    word_emb = torch.cat([clip.encode_texts(texts[i : i + 256]).float() for i in range(0, len(texts), 256)])
    image_emb = torch.cat([clip.encode_image(F.interpolate(b, size=size, mode="bilinear", antialias=True))
                           for b in pixels.split(64)])  # fmt: skip
    source = (f"our clip_vit_tiny_minilm (`{folder}`, trained on {config.get('trained_on')}), not OpenAI's CLIP: "
              "image embedding vs each vocabulary word's text embedding")  # fmt: skip
    return global_words(image_emb, word_emb, vocab, k), source


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit(((train_x - mean) / std).numpy(), train_y.numpy())
    return float((clf.predict(((test_x - mean) / std).numpy()) == test_y.numpy()).mean())


def reproduce_v2l(cfg: V2LExperimentConfig, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train the local-token tokenizer, fit the global-word map, run the in-context episodes; write results.md."""
    if unknown := set(cfg.arms) - set(ARMS):
        raise PotpourriError(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if cfg.global_source not in ("clip", "ridge"):
        raise PotpourriError(f"global_source '{cfg.global_source}' is not one of clip, ridge")
    clip_folder = None
    if cfg.global_source == "clip" and cfg.clip_run:  # before the run folder: a missing clip writes nothing
        clip_folder = clip_model_folder(cfg.clip_run, seed=cfg.seed, held_out=cfg.eval_categories)
    options = options or TrainOptions(progress=False)
    run = new_run("reproduce-v2l", out, config=asdict(cfg), seed=cfg.seed)
    began = time.perf_counter()
    seed_everything(cfg.seed)
    encoder = create_model("efficientnet_lite0", pretrained=True).eval()
    lm = create_model("smollm2_135m", pretrained=True).eval()
    words = lm.tokenizer
    table = lm.lm.get_input_embeddings().weight.detach()  # (49152, 576), frozen
    table_before = table.clone()
    vocab = word_vocabulary(words, limit=cfg.vocab_limit)

    train_px, _, captions = _images(cfg, cfg.train_categories, "train", cfg.train_per_class)
    eval_px, eval_y, _ = _images(cfg, cfg.eval_categories, "test", cfg.pool_per_class)
    train_maps, train_pooled = _lite0_features(encoder, train_px)
    eval_maps, eval_pooled = _lite0_features(encoder, eval_px)

    # 1. local tokens
    tok = V2LTokenizer(table[vocab], vocab, V2LConfig(feature_dim=train_maps.shape[1], stride=16,
                                                      vocab_projector=cfg.vocab_projector))  # fmt: skip
    training = train_v2l_tokenizer(tok, train_maps, train_px, cfg, run.path / "tokenizer", options)
    tok = tok.cpu().eval()
    with torch.no_grad():
        local_ids = tok.tokenize(eval_maps)  # (N, h*w) vocabulary ids
        recon = torch.cat([tok.decode_ids(ids.view(-1, *eval_maps.shape[2:])) for ids in local_ids.split(64)])
    psnr_tokens = psnr(recon, eval_px)
    flat_colour = eval_px.mean((2, 3), keepdim=True).expand_as(eval_px)
    psnr_floor = psnr(flat_colour, eval_px)
    used = int(local_ids.unique().numel())

    # 2. global words: our clip's image-word similarity, or the ridge fallback
    if cfg.global_source == "clip":
        clip_folder = clip_folder or tiny_clip(run.path / "tiny-clip")
        global_ids, source = _clip_global_ids(clip_folder, words, vocab, eval_px, cfg.global_words)
    else:
        caption_emb = torch.stack([table[words(c, add_special_tokens=False).input_ids].mean(0) for c in captions])
        mu_x, sd_x, mu_y = train_pooled.mean(0), train_pooled.std(0) + 1e-6, caption_emb.mean(0)
        weight = _ridge((train_pooled - mu_x) / sd_x, caption_emb - mu_y, cfg.ridge)
        word_rows = table[vocab] - table[vocab].mean(0)
        mapped = ((eval_pooled - mu_x) / sd_x) @ weight
        global_ids = global_words(mapped, word_rows, vocab, cfg.global_words)  # (N, K)
        source = ("fallback: ridge map Lite0 pooled -> mean SmolLM2 caption embedding (training surfaces' "
                  "captions); not CLIP")  # fmt: skip

    # 3. in-context episodes
    arrow = words(" ->", add_special_tokens=False).input_ids
    newline = words("\n", add_special_tokens=False).input_ids
    label_ids = [words(" " + name, add_special_tokens=False).input_ids for name in CLASSES]
    header = words(HEADER).input_ids

    def image_words(i: int, arm: str) -> list[int]:
        parts = {"global": global_ids[i].tolist(), "local": local_ids[i].tolist()}
        return [t for part in ("global", "local") if part in arm for t in parts[part]]

    rows, prompt_example = [], ""
    by_class = [torch.nonzero(eval_y == c).flatten().tolist() for c in range(len(CLASSES))]
    for k in cfg.shots:
        if k + cfg.queries_per_class > min(len(m) for m in by_class):
            raise PotpourriError(f"{k}-shot needs pool_per_class * surfaces >= {k + cfg.queries_per_class}")
        for episode in range(cfg.episodes):
            rng = np.random.default_rng([cfg.seed, k, episode])
            support, queries = [], []
            for members in by_class:
                chosen = rng.permutation(members)[: k + cfg.queries_per_class].tolist()
                support += chosen[:k]
                queries += chosen[k:]
            support = rng.permutation(support).tolist()
            row: dict[str, Any] = {"k": k, "episode": episode, "chance": 1 / len(CLASSES)}
            for arm in cfg.arms:
                prompt = list(header)
                for i in support:
                    prompt += image_words(i, arm) + arrow + label_ids[int(eval_y[i])] + newline
                prefix = prefix_cache(lm.lm, prompt)
                hits = 0
                for i in queries:
                    scores = label_logliks(lm.lm, prefix, image_words(i, arm) + arrow, label_ids)
                    hits += int(scores.argmax()) == int(eval_y[i])
                row[arm] = hits / len(queries)
                row[f"prompt_tokens_{arm}"] = len(prompt)
                if not prompt_example:
                    prompt_example = words.decode(prompt[: 4 * (len(image_words(support[0], arm)) + 3) + len(header)])
            row["linear_probe"] = _probe_accuracy(eval_pooled[support], eval_y[support], eval_pooled[queries],
                                                  eval_y[queries])  # fmt: skip
            run.log_metrics(row)
            rows.append(row)

    table_identical = bool(torch.equal(lm.lm.get_input_embeddings().weight.detach(), table_before))
    summary = _summarise(cfg, rows, training, psnr_tokens, psnr_floor, used, vocab, table_identical)
    summary["global_words_source"] = source
    summary["distinct_global_words_used"] = int(global_ids.unique().numel())
    summary["distinct_global_word_sets"] = len({tuple(sorted(r.tolist())) for r in global_ids})
    summary["seconds"] = time.perf_counter() - began
    summary["example_image_words"] = {
        "global": words.decode(global_ids[0]),
        "local": words.decode(local_ids[0]),
        "true_label": CLASSES[int(eval_y[0])],
    }
    summary["prompt_example"] = prompt_example
    (run.path / "results.md").write_text(_markdown(cfg, summary) + "\n")
    run.write_summary(summary)
    return run


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(cfg, rows, training, psnr_tokens, psnr_floor, used, vocab, table_identical) -> dict[str, Any]:
    per_k: dict[str, dict[str, Any]] = {}
    for k in cfg.shots:
        mine = [r for r in rows if r["k"] == k]
        per_k[str(k)] = {m: _mean_std([r[m] for r in mine]) for m in (*cfg.arms, "linear_probe")}
    best = cfg.arms[0]
    verdict = {
        f"{k}-shot": {
            "in_context_above_chance": per_k[str(k)][best][0] - per_k[str(k)][best][1] > 1 / len(CLASSES),
            "in_context_beats_probe": per_k[str(k)][best][0] > per_k[str(k)]["linear_probe"][0],
        }
        for k in cfg.shots
    }
    return {
        "per_k": per_k,
        "episodes": rows,
        "chance": 1 / len(CLASSES),
        "tokenizer": training,
        "psnr_tokens": _mean_std(psnr_tokens.tolist()),
        "psnr_mean_colour": _mean_std(psnr_floor.tolist()),
        "vocabulary_subset": len(vocab),
        "distinct_local_words_used": used,
        "llm_embeddings_bit_identical": table_identical,
        "verdict": verdict,
    }


def _markdown(cfg: V2LExperimentConfig, s: dict[str, Any]) -> str:
    fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    header = ["k per class", *[f"in-context ({a})" for a in cfg.arms], "linear probe (Lite0)", "chance"]
    body = [[k, *[fmt(v[a]) for a in cfg.arms], fmt(v["linear_probe"]), f"{s['chance']:.3f}"]
            for k, v in s["per_k"].items()]  # fmt: skip
    example = s["example_image_words"]
    return "\n".join([
        "# V2L-style tokenizer: k-shot in-context defect classification by frozen SmolLM2-135M",
        "",
        f"DS-Synth v{cfg.version} at {cfg.image_size} px; tokenizer and global-word map fitted on "
        f"{', '.join(cfg.train_categories)} (train split); episodes on held-out {', '.join(cfg.eval_categories)} "
        f"(test split), {cfg.episodes} episodes per k, {cfg.queries_per_class} queries per class, seed {cfg.seed}. "
        "Accuracy mean ± std over episodes.",
        "",
        markdown_table(header, body),
        "",
        f"Local tokens: {s['distinct_local_words_used']} distinct words used of a {s['vocabulary_subset']}-word "
        f"codebook; reconstruction PSNR on the held-out images {fmt(s['psnr_tokens'])} dB vs "
        f"{fmt(s['psnr_mean_colour'])} dB for a flat mean-colour image. Tokenizer: {s['tokenizer']['steps']} steps "
        f"in {s['tokenizer']['seconds']:.0f} s. SmolLM2 input embeddings bit-identical after training: "
        f"{s['llm_embeddings_bit_identical']}.",
        "",
        f"Global words: {s['global_words_source']}; {s['distinct_global_words_used']} distinct words, "
        f"{s['distinct_global_word_sets']} distinct sets over the held-out images.",
        "",
        f"One held-out image ({example['true_label']}): global `{example['global']}`, local `{example['local']}`.",
        "",
        f"Verdict: {s['verdict']}",
    ])  # fmt: skip


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """``potpourri reproduce v2l`` (or its smoke run) on ``options``' device/precision; ``seed`` seeds the data, the
    tokenizer and the episodes, and picks the clip of ``reproduce clip-small --seed`` (``clip_run_for_seed``)."""
    cfg = V2LExperimentConfig(seed=seed, clip_run=clip_run_for_seed(seed))
    return reproduce_v2l(cfg.quick() if quick else cfg, out=out, options=options)
