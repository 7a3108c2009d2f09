"""Training and evaluation of the MiniGPT-v2-style VLM on DS-Synth instructions.

One plain loop stepping through ``core.training.Trainer`` (AdamW, warm-up + cosine via ``core.training.lr_at``,
gradient clipping, device and precision). The encoder is frozen and in eval mode, so its feature maps are computed
once per image and cached. With ``state_dir`` the loop keeps a resumable checkpoint per stage (trainable parts, AdamW
moments, data order, every RNG, the log): resuming continues where it stopped and ends with the same parameters as
an uninterrupted run.

Evaluation (greedy answers, parsed tolerantly by ``potpourri.core.textgeo``):

* ``refer_acc``: grounding accuracy, first parsed box against the mask's box at IoU > 0.5 (MiniGPT-v2's REC rule);
* ``yesno_acc``: yes/no VQA accuracy; ``list_f1``: micro F1 of the named defect classes;
* ``caption_recall``: share of the image's defect classes the caption names;
* ``where_acc``, ``identify_acc``, ``grounding_recall``/``detection_recall`` (box + class at IoU > 0.5).

``trivial_predictions`` is the baseline that reads only the question: the majority training answer of the same
kind and queried class (for ``refer``: the class's mean training box). The non-LLM baseline (segmenter boxes,
defect-classifier answers) is ``potpourri.papers.vlm_baseline``, scored by the same ``score``.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from potpourri.core.boxes import box_iou
from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run
from potpourri.core.textgeo import box_to_text, dequantize_box, parse_boxes, parse_phrases, quantize_box
from potpourri.core.training import Trainer, TrainOptions, autocast, check_precision, lr_at, resolve_device
from potpourri.data.instructions import Instruction
from potpourri.data.synth import DEFECTS, SynthSample
from potpourri.models.vlm import VisionLanguageModel, encoder_transform_stats

__all__ = [
    "TrainableParts",
    "VLMTrainConfig",
    "encode_samples",
    "evaluate_vlm",
    "model_device",
    "saved_stage",
    "score",
    "token_normaliser",
    "train_options",
    "train_vlm",
    "trivial_predictions",
]


@dataclass
class VLMTrainConfig:
    """Knobs of the loop."""

    stage: int = 1  # 1: projection; 2: projection + LoRA
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints of the trainable parts; 0: only at the end
    progress: bool = True


@torch.no_grad()
def encode_samples(
    vlm: VisionLanguageModel,
    samples: Sequence[SynthSample],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """The frozen encoder's feature maps ``(N, C, h, w)`` of DS-Synth images, normalised with the encoder's stats;
    computed on ``device`` (``auto``, ``cpu``, ``cuda[:N]``; None: where the model is; the model moves there) and
    returned there."""
    from tqdm.auto import tqdm

    where = _place(vlm, device, precision)
    mean, std = encoder_transform_stats(vlm.encoder)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    chunks = []
    for start in tqdm(range(0, len(samples), batch_size), desc="encode images", leave=False, disable=len(samples) < 64):
        images = np.stack([s.image for s in samples[start : start + batch_size]])
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t  # (B, 3, H, W)
        with autocast(where, precision):
            chunks.append(vlm.encode_images(pixels.to(where)).float())
    return torch.cat(chunks)


def _place(vlm: nn.Module, device: str | torch.device | None, precision: str) -> torch.device:
    """Resolve ``device`` (``auto``, ``cpu``, ``cuda[:N]``; None: the model's), check ``precision``, move the model."""
    where = device if isinstance(device, torch.device) else resolve_device(device or model_device(vlm))
    check_precision(precision, where)
    vlm.to(where)
    return where


class TrainableParts(nn.Module):
    """A model seen through its trainable parameters only: ``state_dict`` holds just those (the frozen encoder and LM
    are rebuilt from the config, not written at every checkpoint); ``.to()`` moves the whole model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        own = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise PotpourriError(f"the checkpoint does not fit this model (missing {missing[:2]}, unexpected "
                                 f"{extra[:2]}); resume with the options the run was started with")  # fmt: skip
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        return None


def model_device(model: nn.Module) -> str:
    """Where ``model``'s parameters are (``cpu``, ``cuda:0``, …): the default of the loops and evaluations here, so a
    call without options or device computes where the caller put the model, as before ``--device`` existed."""
    first = next(model.parameters(), None)
    return str(first.device) if first is not None else "cpu"


def train_options(
    options: TrainOptions | None, model: nn.Module, *, grad_clip: float, checkpoint_every: int, progress: bool
) -> TrainOptions:
    """``options`` with the loop's own clipping when they set none; without options: the loop's config (fp32, on the
    model's device)."""
    if options is None:
        return TrainOptions(device=model_device(model), grad_clip=grad_clip or None,
                            checkpoint_every=checkpoint_every, progress=progress)  # fmt: skip
    return replace(options, grad_clip=grad_clip or None) if options.grad_clip is None else options


def token_normaliser(trainer: Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Under torchrun: the divisor of a slice's summed token loss, the global batch's token count over the world
    size (the gradients' average over processes is then the one-process mean over tokens); None in one process."""
    if not trainer.group.distributed:
        return None
    return lambda count: trainer.total_over_processes(count) / trainer.group.world


def train_vlm(
    vlm: VisionLanguageModel,
    features: torch.Tensor,
    instructions: Sequence[Instruction],
    cfg: VLMTrainConfig,
    *,
    run: Run | None = None,
    checkpoint: str | Path | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    options: TrainOptions | None = None,
) -> list[dict[str, float]]:
    """Train the current stage's parameters on (image features, instruction, answer); returns the logged history.

    ``checkpoint``: a file for the trainable parts, written when the stage ends; ``state_dir``: a folder for the
    resumable state, one ``stage<N>/`` per stage (``resume=True`` or ``options.resume`` continues from it; a stage
    finished there is restored, not trained again). ``options``: device, precision, checkpoint cadence (default: the
    config's ``grad_clip``, ``checkpoint_every`` and ``progress``, fp32 on the model's device). Under torchrun each
    process trains on its slice of every batch (LoRA dropout then draws other masks than one process would).

    Example:
        history = train_vlm(vlm, encode_samples(vlm, samples), make_instructions(samples), VLMTrainConfig(steps=100))
    """
    if not instructions:
        raise PotpourriError("no instructions to train on; generate some with make_instructions(samples)")
    options = train_options(options, vlm, grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
                            progress=cfg.progress)  # fmt: skip
    if (resume or options.resume) and state_dir is None:
        raise PotpourriError("resume needs the state folder of the run to continue (state_dir)")
    vlm.set_stage(cfg.stage)
    stage_dir = Path(state_dir) / f"stage{cfg.stage}" if state_dir is not None else None
    # a stage without a checkpoint yet starts from its first step (the one before it finished, or the run was killed
    # before its first checkpoint: the same data and seeds make that the same run)
    again = (resume or options.resume) and stage_dir is not None and (stage_dir / "last.json").is_file()
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = Trainer(
        TrainableParts(vlm), optimizer, total_steps=cfg.steps, options=replace(options, resume=again),
        folder=stage_dir, params=params, generators={"order": generator}, desc=f"vlm stage {cfg.stage}",
    )  # fmt: skip
    state = trainer.state  # the data order and the log: checkpointed, so a resumed stage logs what a straight one does
    if not state:
        state.update(order=[], history=[], running=0.0, seen=0)
    features = features.to(trainer.device)
    started = time.perf_counter()
    vlm.train()
    for step in trainer.steps():
        if len(state["order"]) < cfg.batch_size:  # reshuffle an epoch's order when it runs out
            state["order"] += torch.randperm(len(instructions), generator=generator).tolist()
        batch = [instructions[i] for i in state["order"][: cfg.batch_size]]
        state["order"] = state["order"][cfg.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base=cfg.lr, total=cfg.steps, warmup=cfg.warmup_steps)
        local, _ = trainer.shard(batch)  # under torchrun: batch[rank::world]; the loss counts the global batch's tokens
        index = torch.tensor([item.image_index for item in local], device=trainer.device)
        with trainer.autocast():
            loss = vlm(features[index], [item.prompt for item in local], [item.answer for item in local],
                       normaliser=token_normaliser(trainer))  # fmt: skip
        # logged before the update, whose checkpoint then holds the row: a resumed run neither loses nor repeats it
        state["running"], state["seen"] = state["running"] + trainer.mean_over_processes(loss.item()), state["seen"] + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"stage": cfg.stage, "step": step + 1, "loss": state["running"] / state["seen"],
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}  # fmt: skip
            state["history"].append(row)
            if run is not None and trainer.group.is_main:  # one row per step, not one per process
                run.log_metrics(row)
            state["running"], state["seen"] = 0.0, 0
        trainer.update(loss)
    trainer.finish()
    vlm.eval()
    if checkpoint is not None:
        vlm.save_trainable(checkpoint)
    return [dict(row) for row in state["history"]]


def saved_stage(state_dir: str | Path | None) -> int | None:
    """The latest stage with a resumable checkpoint in ``state_dir`` (one ``stage<N>/`` folder per stage)."""
    if state_dir is None:
        return None
    stages = [int(last.parent.name[5:]) for last in Path(state_dir).glob("stage*/last.json")]
    return max(stages, default=None)


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _yes_no(text: str) -> str | None:
    match = re.search(r"\b(yes|no)\b", text.lower())
    return match.group(1) if match else None


def _classes_named(text: str) -> set[str]:
    return {c for c in DEFECTS if re.search(rf"\b{c}", text.lower())}


def _box_hits(target: dict[str, Any], prediction: str) -> tuple[int, int, int]:
    """(true positives, predicted boxes, target boxes) for grounding/detection: class named + IoU > 0.5."""
    size, boxes = target["size"], target["boxes"]
    found = [(phrase, box) for phrase, grid_boxes in parse_phrases(prediction) for box in grid_boxes]
    hits, used = 0, set()
    for name, gt in boxes.items():
        for i, (phrase, box) in enumerate(found):
            if i not in used and name in phrase.lower() and box_iou([gt], [dequantize_box(box, size)])[0, 0] > 0.5:
                hits, used = hits + 1, used | {i}
                break
    return hits, len(found), len(boxes)


def score(instructions: Sequence[Instruction], predictions: Sequence[str]) -> dict[str, float]:
    """Metrics per instruction kind from predicted answer texts (see the module docstring); NaN-free, counts too."""
    if len(instructions) != len(predictions):
        raise PotpourriError(f"{len(predictions)} predictions for {len(instructions)} instructions")
    per: dict[str, list] = defaultdict(list)
    list_counts = Counter()
    box_counts: dict[str, Counter] = defaultdict(Counter)
    for item, prediction in zip(instructions, predictions, strict=True):
        target = item.target
        if item.kind == "refer":
            boxes = parse_boxes(prediction)
            hit = bool(boxes) and box_iou([target["box"]], [dequantize_box(boxes[0], target["size"])])[0, 0] > 0.5
            per["refer_acc"].append(hit)
            per["refer_format"].append(bool(boxes))
        elif item.kind == "yesno":
            per["yesno_acc"].append(_yes_no(prediction) == ("yes" if target["present"] else "no"))
        elif item.kind == "list":
            truth, guess = set(target["classes"]), _classes_named(prediction)
            list_counts.update(tp=len(truth & guess), fp=len(guess - truth), fn=len(truth - guess))
        elif item.kind == "caption" and target["classes"]:
            named = _classes_named(prediction)
            per["caption_recall"] += [c in named for c in target["classes"]]
        elif item.kind == "where":
            per["where_acc"].append(bool(target["location"]) and prediction.strip().lower() == target["location"])
        elif item.kind == "identify":
            per["identify_acc"].append(_classes_named(prediction) == {target["class"]})
        elif item.kind in ("grounding", "detection") and target["boxes"]:
            hits, _, n_true = _box_hits(target, prediction)
            box_counts[item.kind].update(tp=hits, true=n_true)
    out: dict[str, float] = {name: float(np.mean(values)) for name, values in per.items()}
    if any(item.kind == "list" for item in instructions):
        tp, fp, fn = list_counts["tp"], list_counts["fp"], list_counts["fn"]
        out["list_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    for kind, counts in box_counts.items():
        out[f"{kind}_recall"] = counts["tp"] / counts["true"]
    out.update({f"n_{kind}": count for kind, count in Counter(item.kind for item in instructions).items()})
    return out


_NAMES_CLASS = ("refer", "where", "yesno")  # kinds whose question names the class (identify's names only a box)


def trivial_predictions(train: Sequence[Instruction], test: Sequence[Instruction]) -> list[str]:
    """The question-only baseline: majority training answer per (kind, class named in the question); ``refer``: the
    class's mean training box."""
    answers: dict[tuple, Counter] = defaultdict(Counter)
    boxes: dict[str, list] = defaultdict(list)
    asked = lambda item: item.target.get("class") if item.kind in _NAMES_CLASS else None  # noqa: E731
    for item in train:
        answers[(item.kind, asked(item))][item.answer] += 1
        answers[(item.kind, None)][item.answer] += 1
        if item.kind == "refer":
            boxes[item.target["class"]].append(quantize_box(item.target["box"], item.target["size"]))
    out = []
    for item in test:
        if item.kind == "refer" and boxes.get(item.target["class"]):
            mean_box = np.mean(boxes[item.target["class"]], axis=0)  # grid units
            out.append(box_to_text(dequantize_box(mean_box, item.target["size"]), item.target["size"]))
            continue
        counter = answers.get((item.kind, asked(item))) or answers.get((item.kind, None))
        out.append(counter.most_common(1)[0][0] if counter else "")
    return out


@torch.no_grad()
def evaluate_vlm(
    vlm: VisionLanguageModel,
    features: torch.Tensor,
    instructions: Sequence[Instruction],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    progress: bool = True,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[dict[str, float], list[str]]:
    """Greedy answers for every instruction on ``device`` (None: where the model is) in ``precision``, scored;
    returns (metrics, predictions)."""
    from tqdm.auto import tqdm

    where = _place(vlm, device, precision)
    vlm.eval()
    features = features.to(where)
    predictions: list[str] = []
    for start in tqdm(range(0, len(instructions), batch_size), desc="vlm eval", disable=not progress):
        batch = instructions[start : start + batch_size]
        index = torch.tensor([item.image_index for item in batch], device=where)
        with autocast(where, precision):
            answers = vlm.generate(features[index], [item.prompt for item in batch], max_new_tokens=max_new_tokens)
        predictions += answers
    return score(instructions, predictions), predictions


def parse_kinds(text: str) -> tuple[str, ...]:
    from potpourri.data.instructions import KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PotpourriError(f"unknown instruction kind '{(unknown or [text])[0]}'; choose from {', '.join(KINDS)}")
    return kinds


def instruction_data(cfg: dict[str, Any], split: str, n: int, offset_seed: int = 0):
    from potpourri.data.instructions import make_instructions
    from potpourri.data.synth import make_samples

    samples = []
    for category in cfg["categories"]:
        samples += make_samples(category, split, n, seed=cfg["seed"], size=cfg["image_size"])
    instructions = make_instructions(
        samples,
        kinds=parse_kinds(cfg["kinds"]),
        seed=cfg["seed"] + offset_seed,
        task_identifiers=cfg["task_identifiers"],
    )
    return samples, instructions
