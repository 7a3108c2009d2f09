"""``potpourri reproduce <experiment>``: every paper re-run at CPU scale, behind one verb.

An experiment is a function ``run(quick: bool, out: str | None) -> Run`` that writes ``results.md`` into its run
folder; ``quick`` is a seconds-long smoke run of the same code path (numbers not meaningful). Register a new one by
adding a line to ``EXPERIMENTS``; modules are imported only when their experiment runs.
"""

from __future__ import annotations

import importlib

__all__ = [
    "EXPERIMENTS",
    "run_experiment",
]

# name -> ("module:function", one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "autovp": (
        "potpourri.papers.autovp:run",
        "AutoVP: padding prompt + label mapping on frozen Lite0, successive-halving search vs linear probing",
    ),
    "all-seeing": (
        "potpourri.papers.all_seeing:run",
        "All-Seeing-style region-text contrastive head (Lite0 RoI tokens vs MiniLM captions): retrieval accuracy",
    ),
    "defect-gen": ("potpourri.papers.defect_gen:run", "segmentation mIoU: real vs + copy-paste / Defect-Gen"),
    "freeze-embed": ("potpourri.papers.freeze_embed:run", "SGD vs AdamW vs SGD freeze-embed, ID and OOD accuracy"),
    "layer-proxies": ("potpourri.papers.layer_proxies:run", "cheap layer-choice proxies vs the finetuning profile"),
    "ssprompt": (
        "potpourri.papers.ssprompt:run",
        "SSPrompt: learned class prompts for a frozen small SAM vs the best single click vs a supervised segmenter",
    ),
    "sam-clip": (
        "potpourri.papers.sam_clip:run",
        "SAM-CLIP-style merging: small SAM + Lite0 teachers into one student, forgetting with vs without rehearsal",
    ),
    "opro": (
        "potpourri.papers.opro:run",
        "OPRO with SmolLM2-135M vs random search, same budget: tuning a cached linear probe (lr, wd, epochs)",
    ),
    "frozen-lm": (
        "potpourri.papers.frozen_lm:run",
        "a frozen LM layer (SmolLM2, MiniLM, controls) inside a small ViT: accuracy, robustness, filtering IoU",
    ),
    "semi-supervised": (
        "potpourri.papers.semi_supervised:run",
        "FixMatch vs SimCLR + fine-tuning vs supervised, same labels and steps (paper rejected at ICLR 2024)",
    ),
    "smr": (
        "potpourri.papers.smr:run",
        "token-merging student reconstructing teacher features vs MAE-style masking, linear probe (withdrawn)",
    ),
    "simdetr": (
        "potpourri.papers.simdetr:run",
        "SimDETR-style (withdrawn): feature-clustering proposals, pseudo-classes, self-training, low-label detection",
    ),
    "subtuning": ("potpourri.papers.subtuning:run", "linear / full / SubTuning / LoRA against training-set size"),
}


def run_experiment(name: str, *, quick: bool = False, out: str | None = None):
    """Run one registered experiment and return its ``Run`` (``results.md`` inside)."""
    target, _ = EXPERIMENTS[name]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(quick, out)
