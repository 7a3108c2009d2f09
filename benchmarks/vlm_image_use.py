"""Does a trained VLM use the image? Test loss with the true, shuffled, mean and zero feature maps; token scales.

Usage: .venv/bin/python benchmarks/vlm_image_use.py runs/vlm/<run>      (a `potpourri vlm train` run folder)

If the true image's loss is no lower than a shuffled image's, the answers ignore the image; if the mean image beats
the true one on the test split, what the model learned about individual images does not generalise. For boxes
(``refer``) it also scores greedy answers with the true and the shuffled image: the shuffled score is the chance level
of this very model (right kind of box, wrong image).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml

from potpourri.data.splits import derangement
from potpourri.models.vlm import vlm_from_config
from potpourri.vlm.train import encode_samples, evaluate_vlm, instruction_data


def main() -> None:
    torch.set_num_threads(1)
    run = sys.argv[1]
    cfg = yaml.safe_load(Path(run, "config.yaml").read_text())
    started = time.perf_counter()
    vlm = vlm_from_config(cfg)
    vlm.load_trainable(f"{run}/trainable.safetensors")
    vlm.eval()
    samples, items = instruction_data(cfg, "test", cfg["n_test"], offset_seed=1)
    feats = encode_samples(vlm, samples)
    with torch.no_grad():
        text_norm = vlm.lm.get_input_embeddings().weight.norm(dim=1).mean().item()
        image_norm = vlm.image_tokens(feats).norm(dim=-1).mean().item()
    print(f"mean norm: text embedding {text_norm:.2f}, projected image token {image_norm:.2f}")
    perm = torch.as_tensor(derangement(len(samples), seed=0))  # every image paired with another image
    variants = {
        "true": lambda idx: feats[idx],
        "shuffled": lambda idx: feats[perm][idx],
        "mean": lambda idx: feats.mean(0, keepdim=True).expand_as(feats[idx]),
        "zeros": lambda idx: torch.zeros_like(feats[idx]),
    }
    for kind in sorted({i.kind for i in items}):
        sub = [i for i in items if i.kind == kind]
        idx = torch.tensor([i.image_index for i in sub])
        losses = {}
        with torch.no_grad():
            for name, pick in variants.items():
                f, total = pick(idx), 0.0
                for s in range(0, len(sub), 8):
                    chunk = sub[s : s + 8]
                    total += vlm(f[s : s + 8], [i.prompt for i in chunk], [i.answer for i in chunk]).item() * len(chunk)
                losses[name] = round(total / len(sub), 4)
        print(f"{kind} (n={len(sub)}) test loss: {losses}")
        if kind == "refer":
            for name in ("true", "shuffled"):
                features = variants[name](torch.arange(len(samples)))
                metrics, _ = evaluate_vlm(
                    vlm, features, sub, max_new_tokens=cfg.get("max_new_tokens") or 24, progress=False
                )
                print(f"refer acc@IoU>0.5 with the {name} image: {metrics['refer_acc']:.3f}")
    print(f"seconds {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
