"""SmolLM2-135M writes SEED image tokens: "[generate] <caption>" -> 32 <img_k> tokens -> decoded -> nearest real image.

1. DS-Synth, 5 categories, 128 px: train images (kinds cycle good + 6 defects) and held-out test images.
2. Frozen EfficientNet-Lite0 maps; a SEED tokenizer (EMA codebook, dead-code restarts, K=256, 32 tokens) trained on
   the training maps; the training images' codes.
3. SmolLM2-135M with <img_0>..<img_255> added (new rows + LoRA q/v train) learns caption -> codes.
4. For every held-out caption (and a few free prompts): greedy codes (constrained to image tokens, and free),
   decode, retrieve the nearest of the held-out images; category and defect-kind accuracy against chance, and
   against the tokenizer's own codes of the caption's image (the best the tokens allow).

Usage: .venv/bin/python benchmarks/vlm_seed_tokens.py [LM_STEPS] [TOKENIZER_STEPS] [N_TRAIN] [N_TEST]
(defaults 60 150 42 14 per category); writes /tmp/notes/vlm_seed_result.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np
import torch

from potpourri.core.registry import create_model
from potpourri.data.synth import CATEGORIES, make_samples
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, codebook_usage, retrieve_nearest
from potpourri.vlm.seed import ImageTokenWriter, ImageWriterTrainConfig, train_image_writer
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

FREE_PROMPTS = [
    ("a scratched brick", "brick", "scratch"),
    ("a grass surface with a hole", "grass", "hole"),
    ("a clean moon surface", "moon", "good"),
    ("a gravel surface with a large stain", "gravel", "stain"),
    ("tissue with a crack", "tissue", "crack"),
]


@torch.no_grad()
def features(encoder, samples) -> torch.Tensor:
    mean = torch.tensor(encoder.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.pretrained_cfg["std"]).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(samples), 32):
        x = torch.from_numpy(np.stack([s.image for s in samples[start : start + 32]])).permute(0, 3, 1, 2).float()
        out.append(encoder.forward_features((x / 255.0 - mean) / std))
    return torch.cat(out)


def main() -> None:
    torch.set_num_threads(1)
    lm_steps, tok_steps, n_train, n_test = (
        int(a) for a in (sys.argv[1:] + ["60", "150", "42", "14"][len(sys.argv) - 1 :])
    )
    t0 = time.perf_counter()
    train = [s for c in CATEGORIES for s in make_samples(c, "train", n_train, size=128)]
    test = [s for c in CATEGORIES for s in make_samples(c, "test", n_test, size=128)]
    encoder = create_model("efficientnet_lite0", pretrained=True).eval()
    f_train, f_test = features(encoder, train), features(encoder, test)
    t_feat = time.perf_counter() - t0

    torch.manual_seed(0)
    seed_tok = SEEDTokenizer(SEEDConfig(feature_dim=f_train.shape[1], codebook_size=256, ema=True, restart_dead=True))
    train_tokenizer(seed_tok, f_train, TokenizerTrainConfig(steps=tok_steps, seed=0, progress=False))
    codes_train, codes_test = seed_tok.tokenize(f_train), seed_tok.tokenize(f_test)
    t_tok = time.perf_counter() - t0 - t_feat

    torch.manual_seed(0)
    lm = create_model("smollm2_135m", pretrained=True)
    writer = ImageTokenWriter(lm, lm.tokenizer, seed_tok.config.codebook_size)
    history = train_image_writer(
        writer, [s.caption for s in train], codes_train,
        ImageWriterTrainConfig(steps=lm_steps, batch_size=8, lr=1e-3, vocab_lr=1e-2, warmup_steps=5),
    )  # fmt: skip
    t_lm = time.perf_counter() - t0 - t_feat - t_tok

    prompts = [s.caption for s in test] + [p for p, _, _ in FREE_PROMPTS]
    want_cat = [s.category for s in test] + [c for _, c, _ in FREE_PROMPTS]
    want_kind = [s.kind for s in test] + [k for _, _, k in FREE_PROMPTS]
    gen, free, valid = [], [], []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        gen.append(writer.generate_codes(chunk, seed_tok.config.num_queries)[0])
        codes_free, ok = writer.generate_codes(chunk, seed_tok.config.num_queries, constrained=False)
        free.append(codes_free)
        valid.append(ok)
    gen, free, valid = torch.cat(gen), torch.cat(free), torch.cat(valid)
    t_gen = time.perf_counter() - t0 - t_feat - t_tok - t_lm

    g_cat = [s.category for s in test]
    g_kind = [s.kind for s in test]

    def rates(index: torch.Tensor, rows: range) -> dict[str, float]:
        idx = index.tolist()
        return {
            "category": float(np.mean([g_cat[idx[i]] == want_cat[i] for i in rows])),
            "kind": float(np.mean([g_kind[idx[i]] == want_kind[i] for i in rows])),
            "self": float(np.mean([idx[i] == i for i in rows])) if rows.stop <= len(test) else float("nan"),
        }

    held = range(len(test))
    generated = retrieve_nearest(seed_tok, gen, f_test)
    oracle = retrieve_nearest(seed_tok, codes_test, f_test)
    free_ok = valid[: len(test)]
    result = {
        "config": {
            "lm_steps": lm_steps,
            "tokenizer_steps": tok_steps,
            "n_train": len(train),
            "n_test": len(test),
            "size": 128,
            "codebook": 256,
            "tokens": seed_tok.config.num_queries,
        },
        "seconds": {"features": t_feat, "tokenizer": t_tok, "lm_train": t_lm, "generate": t_gen},
        "lm_loss": [(h["step"], round(h["loss"], 4)) for h in history],
        "tokenizer_usage_test": codebook_usage(codes_test, 256),
        "generated_constrained": rates(generated, held),
        "tokenizer_codes_of_the_true_image": rates(oracle, held),
        "chance": {"category": 1 / len(CATEGORIES), "kind": 1 / 7, "self": 1 / len(test)},
        "free_generation_valid_fraction": float(free_ok.float().mean()),
        "generated_equals_true_codes_fraction": float((gen[: len(test)] == codes_test).float().mean()),
        "distinct_generated_sequences": len({tuple(r) for r in gen[: len(test)].tolist()}),
        "distinct_true_sequences": len({tuple(r) for r in codes_test.tolist()}),
    }
    if free_ok.any():
        rows = torch.nonzero(free_ok).flatten()
        free_idx = retrieve_nearest(seed_tok, free[rows], f_test)
        result["generated_free_valid_rows"] = {
            "n": len(rows),
            "category": float(
                np.mean([g_cat[j] == want_cat[i] for i, j in zip(rows.tolist(), free_idx.tolist(), strict=True)])
            ),
            "kind": float(
                np.mean([g_kind[j] == want_kind[i] for i, j in zip(rows.tolist(), free_idx.tolist(), strict=True)])
            ),
        }
    free_rows = range(len(test), len(prompts))
    generated_free_prompts = retrieve_nearest(seed_tok, gen[len(test) :], f_test).tolist()
    result["free_prompts"] = [
        {"prompt": prompts[i], "retrieved": f"{g_cat[j]}/{g_kind[j]}", "wanted": f"{want_cat[i]}/{want_kind[i]}"}
        for i, j in zip(free_rows, generated_free_prompts, strict=True)
    ]
    result["retrieved_kind_histogram"] = dict(Counter(g_kind[j] for j in generated.tolist()))
    print(json.dumps(result, indent=1))
    with open("/tmp/notes/vlm_seed_result.json", "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
