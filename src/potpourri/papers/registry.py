"""``potpourri reproduce <experiment>``: every paper re-run at CPU scale, behind one verb.

An experiment is a function ``run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run`` that
writes ``results.md`` into its run folder; ``quick`` is a seconds-long smoke run of the same code path (numbers not
meaningful); ``options`` carries ``--device`` and ``--precision`` to every model the experiment trains or runs. An
experiment whose seed the user may choose (``reproduce X --seed N``) also takes ``seed: int = 0``.
Register a new one by adding a line to ``EXPERIMENTS``; modules are imported only when their experiment runs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions

__all__ = [
    "EXPERIMENTS",
    "SEEDED",
    "compute_options",
    "experiment_function",
    "run_experiment",
    "takes_seed",
]

# the experiments whose run takes ``seed=`` (``reproduce NAME --seed N``); a test checks it against the functions
SEEDED = (
    "anomalyclip", "clip-small", "mask-frozen-detr", "minigpt-v2", "minigpt4", "seed-speaks", "v2l", "words-annotation",
)  # fmt: skip

# name -> ("module:function", one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "anomalyclip": (
        "potpourri.papers.anomalyclip_own:run",
        "AnomalyCLIP (learned prompts, DPAM, glocal loss) on our clip-small towers, zero-shot on moon/tissue, vs "
        "hand-written prompts and PatchCore 1/4/8-shot (run clip-small first)",
    ),
    "autovp": (
        "potpourri.papers.autovp:run",
        "AutoVP: padding prompt + label mapping on frozen Lite0, successive-halving search vs linear probing",
    ),
    "all-seeing": (
        "potpourri.papers.all_seeing:run",
        "All-Seeing-style region-text contrastive head (Lite0 RoI tokens vs MiniLM captions): retrieval accuracy",
    ),
    "clip-small": (
        "potpourri.papers.clip_small:run",
        "a CLIP-style model trained here (timm ViT + MiniLM on DS-Synth brick/grass/gravel + clutter): zero-shot "
        "defect classification and retrieval on held-out moon/tissue",
    ),
    "defect-gen": ("potpourri.papers.defect_gen:run", "segmentation mIoU: real vs + copy-paste / Defect-Gen"),
    "freeze-embed": ("potpourri.papers.freeze_embed:run", "SGD vs AdamW vs SGD freeze-embed, ID and OOD accuracy"),
    "layer-proxies": ("potpourri.papers.layer_proxies:run", "cheap layer-choice proxies vs the finetuning profile"),
    "ssprompt": (
        "potpourri.papers.ssprompt:run",
        "SSPrompt: learned class prompts for a frozen small SAM vs the best single click vs a supervised segmenter",
    ),
    "seed-speaks": (
        "potpourri.papers.seed_speaks:run",
        "SEED tokenizer without text, aligned on its last query, aligned on its quantised codes (MiniLM captions); "
        "pixel decoders (codes, codes + colour tokens) and a caption-conditioned code sampler writing new images",
    ),
    "sam-clip": (
        "potpourri.papers.sam_clip:run",
        "SAM-CLIP-style merging: small SAM + our CLIP-style model into one student; forgetting with vs without "
        "rehearsal, zero-shot segmentation by text on held-out surfaces",
    ),
    "mask-frozen-detr": (
        "potpourri.papers.mask_frozen_detr:run",
        "Mask Frozen-DETR (withdrawn): one mask head on a frozen small DETR (trained here, resumable) vs on a frozen "
        "YOLO vs full fine-tuning vs Mask R-CNN at the frozen DETR arm's CPU budget; box and mask AP, CPU seconds",
    ),
    "minigpt4": (
        "potpourri.papers.minigpt:run_minigpt4",
        "MiniGPT-4 (Q-Former + one linear, frozen SmolLM2) vs MiniGPT-v2, same data and steps, real vs random LM",
    ),
    "minigpt-v2": (
        "potpourri.papers.minigpt:run_minigpt_v2",
        "MiniGPT-v2's three-stage curriculum vs two stages, same steps, eval after each stage; random-LM control",
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
    "yolov6-v3": (
        "potpourri.papers.yolov6_v3:run",
        "YOLOv6 v3 parts one at a time (BiC, SimCSPSPPF, anchor-aided training, ATSS→TAL) on DS-Synth detection: "
        "mAP, train time, re-parameterised latency (eager, ONNX Runtime)",
    ),
    "words-annotation": (
        "potpourri.papers.words_annotation:run",
        "annotations in words (not a paper): a defect sentence parsed into a prior prompting our small SAM / "
        "segmenter vs box vs click on DS-Synth v2, and description accuracy from predicted masks",
    ),
    "request-routing": (
        "potpourri.papers.request_routing:run",
        "plain-language requests -> toolkit calls (not a paper): grammar-constrained SmolLM2-135M vs keywords on "
        "105 held-out phrasings",
    ),
    "v2l": (
        "potpourri.papers.v2l:run",
        "V2L-style tokenizer: images as SmolLM2 vocabulary words (local: quantised against the projected frozen "
        "embeddings; global: our clip-small's image-word similarity; run clip-small first), k-shot in-context defect "
        "classification vs a linear probe, PSNR",
    ),
    "subtuning": ("potpourri.papers.subtuning:run", "linear / full / SubTuning / LoRA against training-set size"),
}


def experiment_function(name: str) -> Callable[..., Any]:
    """The ``run`` function registered under ``name`` (its module imported now)."""
    module, function = EXPERIMENTS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def takes_seed(name: str) -> bool:
    """Whether an experiment's seed can be chosen (its ``run`` takes ``seed=``); the others fix their seeds."""
    return "seed" in inspect.signature(experiment_function(name)).parameters


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    out: str | None = None,
    options: TrainOptions | None = None,
    seed: int | None = None,
):
    """Run one registered experiment on ``options``' device and precision; return its ``Run`` (``results.md``).
    ``seed`` (None: the experiment's default) is refused by experiments that fix their own seeds."""
    fn = experiment_function(name)
    extra = {}
    if seed is not None:
        if not takes_seed(name):
            raise PotpourriError(f"reproduce {name} fixes its own seeds; --seed applies to: "
                                 f"{', '.join(SEEDED)}")  # fmt: skip
        extra["seed"] = seed
    return fn(quick, out, options or TrainOptions(progress=False), **extra)


def compute_options(config_type: type, options: TrainOptions | None) -> dict[str, Any]:
    """``device``/``precision`` of ``options`` as keyword arguments for a training config dataclass, limited to the
    fields that config has (e.g. ``TuneConfig(**cfg, **compute_options(TuneConfig, options))``)."""
    options = options or TrainOptions()
    known = {f.name for f in fields(config_type)}
    return {k: getattr(options, k) for k in ("device", "precision") if k in known}
