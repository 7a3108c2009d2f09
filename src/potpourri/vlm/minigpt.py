"""MiniGPT-4 and MiniGPT-v2's three-stage curriculum on DS-Synth: data, staged training with an eval after each stage.

MiniGPT-4 (``arch="minigpt4"``, ``models.vlm``): stage 1 aligns the Q-Former + linear layer on captions (the broad
caption set below, no instruction beyond "describe"); stage 2 trains the linear layer alone on a small curated set of
detailed, multi-sentence defect descriptions written from DS-Synth ground truth (``detailed_description``: kind,
count, position, size of every defect) in MiniGPT-4's ``###Human: .. ###Assistant:`` conversation template.

MiniGPT-v2's curriculum (``curriculum=True``; projection + LoRA in every stage, as in the paper):

1. broad, weakly labelled data: every DS-Synth training image's caption and its region phrases with boxes
   (``[grounding]``), the defect close-ups' captions and the clutter set's captions (``data.captions``);
2. multi-task with task identifiers: the instruction kinds of the run (``data.instructions``);
3. instruction tuning: the detailed descriptions as ``[vqa]`` conversations mixed with stage 2's tasks.

Every stage is followed by the same test evaluation (``vlm.train.score`` + caption ROUGE-L/BLEU-1 against the
ground-truth caption), so the summary shows each stage's effect. Training goes through ``vlm.train.train_vlm``: each
stage keeps its resumable state in ``state/<stage name>/``.

Example:
    run = run_phased({**cfg, "arch": "minigpt4"}, "runs/vlm/minigpt4")
    run.read_summary()["stages"][-1]["model"]["list_f1"]
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from potpourri.core.errors import PotpourriError
from potpourri.data.instructions import Instruction, make_instructions
from potpourri.data.synth import CLASSES, SynthSample

if TYPE_CHECKING:
    from potpourri.core.training import TrainOptions

__all__ = [
    "DETAIL_PROMPTS",
    "bleu1",
    "broad_instructions",
    "caption_quality",
    "description_instructions",
    "detailed_description",
    "rouge_l",
    "run_phased",
    "stage_plan",
]

# MiniGPT-4's stage-2 instructions (minigpt4/conversation prompts), shortened
DETAIL_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def _size_word(fraction: float) -> str:
    """Area of a defect as a share of the image, in words."""
    if fraction < 0.005:
        return "tiny"
    if fraction < 0.02:
        return "small"
    if fraction < 0.06:
        return "medium-sized"
    return "large"


def detailed_description(sample: SynthSample) -> str:
    """Several sentences from the ground truth: the surface, how many defects, then each one's kind, size (share of
    the image its mask covers), position and generator words; a good image says so and names what is absent."""
    area = sample.mask.size
    visible = [d for d in sample.defects if (sample.mask == CLASSES.index(d.name)).any()]
    if not visible:
        return (f"This is a {sample.category} surface. It shows no defect: no scratch, crack, stain, hole, "
                "contamination or dent is visible. The surface looks even.")  # fmt: skip
    n = len(visible)
    names = sorted({d.name for d in visible}, key=CLASSES.index)
    count = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    sentences = [f"This is a {sample.category} surface with {count} defect{'s' if n > 1 else ''}: {', '.join(names)}."]
    for defect in visible:
        fraction = float((sample.mask == CLASSES.index(defect.name)).sum()) / area
        sentences.append(f"There is a {_size_word(fraction)} {defect.name}, covering about {100 * fraction:.0f}% of "
                         f"the image: {defect.phrase}.")  # fmt: skip
    sentences.append("The rest of the surface is free of defects.")
    return " ".join(sentences)


def description_instructions(
    samples: Sequence[SynthSample], *, seed: int = 0, task: str = "", offset: int = 0
) -> list[Instruction]:
    """One detailed-description conversation per sample (kind ``caption``, so the class recall is scored);
    ``task`` (e.g. ``vqa``) prefixes an identifier; ``offset`` shifts the image indices."""
    rng = np.random.default_rng(seed)
    out = []
    for index, sample in enumerate(samples):
        prompt = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))]
        present = tuple(sorted({d.name for d in sample.defects if (sample.mask == CLASSES.index(d.name)).any()},
                               key=CLASSES.index))  # fmt: skip
        out.append(Instruction("caption", task or "caption", f"[{task}] {prompt}" if task else prompt,
                               detailed_description(sample), index + offset, {"classes": present}))  # fmt: skip
    return out


def broad_instructions(
    cfg: dict[str, Any], samples: Sequence[SynthSample], *, grounding: bool, offset: int
) -> tuple[list[Any], list[Instruction]]:
    """Weakly labelled stage-1 data: captions (+ ``[grounding]`` region phrases with boxes when ``grounding``) of the
    training images, captions of their defect close-ups and of clutter images. Returns (extra images as objects with
    ``.image``, instructions); the extra images are indexed from ``offset`` on (after ``samples``)."""
    from potpourri.data.captions import clutter_pairs, concat_pairs, synth_pairs

    ids = cfg["task_identifiers"] and grounding
    kinds = ("caption", "grounding") if grounding else ("caption",)
    items = make_instructions(samples, kinds=kinds, seed=cfg["seed"] + 7, task_identifiers=ids)
    per_kind = max(1, cfg["n_train"] // (4 * len(CLASSES)))
    pairs = concat_pairs(
        synth_pairs(cfg["categories"], "train", per_kind, size=cfg["image_size"], seed=cfg["seed"] + 11),
        clutter_pairs(max(4, cfg["n_train"] // 4), size=cfg["image_size"], seed=cfg["seed"] + 13),
    )
    rng = np.random.default_rng(cfg["seed"] + 17)
    from potpourri.data.instructions import TEMPLATES

    extra = []
    for j, (image, caption) in enumerate(zip(pairs.images, pairs.captions, strict=True)):
        text = TEMPLATES["caption"][int(rng.integers(len(TEMPLATES["caption"])))]
        named = tuple(c for c in CLASSES[1:] if re.search(rf"\b{c}", caption))
        prompt = f"[caption] {text}" if ids else text
        items.append(Instruction("caption", "caption", prompt, caption, offset + j, {"classes": named}))
        extra.append(SimpleNamespace(image=image))
    return extra, items


# ----------------------------------------------------------------------------------------------------------------
# caption quality


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9%]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta 1) on lower-cased words: longest common subsequence against both lengths."""
    a, b = _words(prediction), _words(reference)
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, reference: str) -> float:
    """BLEU-1 of one sentence: clipped unigram precision times the brevity penalty."""
    a, b = _words(prediction), _words(reference)
    if not a:
        return 0.0
    ref = Counter(b)
    clipped = sum(min(n, ref[w]) for w, n in Counter(a).items())
    penalty = 1.0 if len(a) >= len(b) else math.exp(1 - len(b) / len(a))
    return penalty * clipped / len(a)


def caption_quality(instructions: Sequence[Instruction], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L and BLEU-1 of the ``caption`` answers against their reference answers (empty if none)."""
    pairs = [(p, i.answer) for i, p in zip(instructions, predictions, strict=True) if i.kind == "caption"]
    if not pairs:
        return {}
    return {"caption_rouge_l": float(np.mean([rouge_l(p, r) for p, r in pairs])),
            "caption_bleu1": float(np.mean([bleu1(p, r) for p, r in pairs]))}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# stages


def stage_plan(cfg: dict[str, Any]) -> list[tuple[str, int, int, float]]:
    """(name, parameter stage of ``VisionLanguageModel.set_stage``, steps, lr) of each stage with steps > 0."""
    if cfg.get("arch", "minigpt-v2") == "minigpt4":
        plan = [("align", 1, cfg["steps"], cfg["lr"]), ("describe", 2, cfg["lora_steps"], cfg["lora_lr"])]
    elif cfg.get("curriculum"):
        plan = [("broad", 2, cfg["steps"], cfg["lr"]), ("multitask", 2, cfg["lora_steps"], cfg["lora_lr"]),
                ("instruct", 2, cfg.get("stage3_steps", 0), cfg["lora_lr"])]  # fmt: skip
    else:  # the plain MiniGPT-v2 recipe of ``vlm.pipeline.run_train``: both stages on the run's tasks
        plan = [("projection", 1, cfg["steps"], cfg["lr"]), ("lora", 2, cfg["lora_steps"], cfg["lora_lr"])]
    return [stage for stage in plan if stage[2] > 0]


def _stage_data(cfg: dict[str, Any], name: str, samples: Sequence[SynthSample], tasks: list[Instruction]):
    """(extra images beyond ``samples``, instructions) of one stage."""
    ids = cfg["task_identifiers"]
    if name in ("align", "broad"):
        return broad_instructions(cfg, samples, grounding=name == "broad", offset=len(samples))
    if name == "describe":
        return [], description_instructions(samples, seed=cfg["seed"] + 3)
    if name in ("multitask", "projection", "lora"):
        return [], tasks
    described = description_instructions(samples, seed=cfg["seed"] + 3, task="vqa" if ids else "")
    return [], described + tasks  # instruct: the descriptions mixed with the tasks


def _evaluate(vlm, cfg, train_tasks, test_samples, test_tasks, features, options) -> dict[str, Any]:
    from potpourri.vlm.train import evaluate_vlm, score, trivial_predictions

    long_answers = any(i.kind in ("caption", "grounding", "detection") for i in test_tasks)
    max_new = cfg.get("max_new_tokens") or (64 if long_answers else 24)
    metrics, predictions = evaluate_vlm(vlm, features, test_tasks, max_new_tokens=max_new, progress=False,
                                        device=options.device, precision=options.precision)  # fmt: skip
    metrics.update(caption_quality(test_tasks, predictions))
    trivial = trivial_predictions(train_tasks, test_tasks)
    baseline = {**score(test_tasks, trivial), **caption_quality(test_tasks, trivial)}
    return {"model": metrics, "question_only_baseline": baseline, "predictions": predictions}


def run_phased(cfg: dict[str, Any], out: str | None = None, *, options: TrainOptions | None = None):
    """Build, train stage by stage (``stage_plan``), evaluate after each; returns the ``Run``. ``summary.json``:
    ``stages`` (name, steps, test metrics after it), ``model``/``question_only_baseline`` of the last stage.
    ``options.resume`` continues from ``state/`` (a finished stage is restored, not trained again). Under torchrun
    each process trains on its slice of every batch; rank 0 makes the run, evaluates and writes (None elsewhere)."""
    import json
    from dataclasses import replace

    from potpourri.core.distributed import process_group
    from potpourri.core.io import atomic_write_bytes
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.core.training import TrainOptions, resolve_device
    from potpourri.models.vlm import vlm_from_config
    from potpourri.vlm.train import VLMTrainConfig, encode_samples, instruction_data, train_vlm

    started = time.perf_counter()
    options = options or TrainOptions(checkpoint_every=cfg["checkpoint_every"])
    if cfg.get("arch") == "minigpt4":
        cfg = {**cfg, "task_identifiers": False}  # MiniGPT-4 knows no identifiers
    plan = stage_plan(cfg)
    if options.resume and (out is None or not (Path(out) / "config.yaml").is_file()):
        raise PotpourriError("--resume needs --out DIR, the folder of a `potpourri vlm train` run to continue")
    if options.resume:  # the stages continue only with the options they were started with
        from potpourri.vlm.pipeline import check_same_config

        check_same_config(cfg, Path(out))
    seed_everything(cfg["seed"])
    with process_group(resolve_device(options.device)) as group:  # rank 0 of 1 outside torchrun
        run = group.main_first(lambda: new_run("vlm", out, config=cfg, seed=cfg["seed"]))  # rank 0's folder
        options = replace(options, progress=options.progress and group.is_main)
        vlm = vlm_from_config(cfg)
        samples, tasks = instruction_data(cfg, "train", cfg["n_train"])
        features = encode_samples(vlm, samples, device=options.device)
        test_cfg = {**cfg, "kinds": ",".join(dict.fromkeys([*cfg["kinds"].split(","), "caption"]))}
        test_samples, test_tasks = instruction_data(test_cfg, "test", cfg["n_test"], offset_seed=1)
        test_features = encode_samples(vlm, test_samples, device=options.device)
        common = dict(batch_size=cfg["batch_size"], seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"])
        stages, result = [], None
        for name, stage, steps, lr in plan:
            extra, items = _stage_data(cfg, name, samples, tasks)
            stage_features = features
            if extra:
                import torch

                stage_features = torch.cat([features, encode_samples(vlm, extra, device=options.device)])
            train_vlm(vlm, stage_features, items, VLMTrainConfig(stage=stage, steps=steps, lr=lr, **common),
                      run=run, state_dir=run.path / "state" / name, options=options)  # fmt: skip
            if group.is_main:  # rank 0 evaluates; the others wait at the next stage's first collective
                result = _evaluate(vlm, cfg, tasks, test_samples, test_tasks, test_features, options)
                stages.append({"name": name, "stage": stage, "steps": steps, "n_train": len(items),
                               "model": result["model"]})  # fmt: skip
    if not group.is_main:  # rank 0 writes the weights, the predictions and the summary
        return None
    vlm.save_trainable(run.path / "trainable.safetensors")
    lines = [json.dumps({"kind": i.kind, "prompt": i.prompt, "answer": i.answer, "prediction": p}) + "\n"
             for i, p in zip(test_tasks, result["predictions"], strict=True)]  # fmt: skip
    atomic_write_bytes(run.path / "predictions.jsonl", "".join(lines).encode())
    run.write_summary({"arch": cfg.get("arch", "minigpt-v2"), "random_lm": bool(cfg.get("random_lm")),
                       "stages": stages, "model": result["model"],
                       "question_only_baseline": result["question_only_baseline"],
                       "seconds": time.perf_counter() - started})  # fmt: skip
    return run
