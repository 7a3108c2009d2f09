"""Instruction data for the vision-language model, generated from DS-Synth ground truth (masks + generator words).

Per image, the kinds of question (MiniGPT-v2's task identifier in brackets):

| kind | identifier | instruction (one of several phrasings) | answer |
|---|---|---|---|
| `refer` | `[refer]` | where is the scratch? | `{<x1><y1><x2><y2>}` (box of its mask) |
| `where` | `[vqa]` | where is the scratch? | in the upper left (words) |
| `yesno` | `[vqa]` | is there a crack on this surface? | yes / no |
| `list` | `[vqa]` | what defects are on this surface? | scratch, crack / none |
| `identify` | `[identify]` | what is in {<..>}? | a long dark scratch |
| `caption` | `[caption]` | describe this surface | the generator's caption |
| `grounding` | `[grounding]` | describe this surface | caption with `<p>phrase</p> {<..>}` boxes |
| `detection` | `[detection]` | detect every defect | `<p>scratch</p> {<..>}<delim>...` / none |

`refer` and `where` share their phrasings, and so do `caption` and `grounding`: without the identifier the same words
ask for a box or for words, which is what the with/without-identifier ablation measures.

Example:
    >>> from potpourri.data.synth import make_samples
    >>> items = make_instructions(make_samples("brick", "train", 3, size=64), kinds=("yesno",), seed=0)
    >>> items[0].prompt.startswith("[vqa] ")
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError
from potpourri.core.textgeo import box_to_text, mask_to_box, phrase_to_text
from potpourri.data.synth import CLASSES, DEFECTS, SynthSample

__all__ = ["IDENTIFIERS", "KINDS", "TEMPLATES", "Instruction", "location_words", "make_instructions"]

IDENTIFIERS = ("vqa", "caption", "grounding", "refer", "identify", "detection")
KIND_TASK = {
    "refer": "refer",
    "where": "vqa",
    "yesno": "vqa",
    "list": "vqa",
    "identify": "identify",
    "caption": "caption",
    "grounding": "grounding",
    "detection": "detection",
}
KINDS = tuple(KIND_TASK)

_WHERE = ("where is the {}?", "give me the location of the {}", "where can I find the {}?", "locate the {}")
_DESCRIBE = ("describe this surface", "briefly describe the image", "what does this surface look like?")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "refer": _WHERE,
    "where": _WHERE,
    "yesno": ("is there a {} on this surface?", "is there a {}?", "does this surface have a {}?", "can you see a {}?"),
    "list": ("what defects are on this surface?", "which defects can you see?", "list the defects on this surface"),
    "identify": ("what is in {}?", "what defect is at {}?", "name the defect in {}"),
    "caption": _DESCRIBE,
    "grounding": _DESCRIBE,
    "detection": ("detect every defect", "find all defects and their boxes", "where are the defects?"),
}
_LOCATION_RE = re.compile(
    r"\b((?:in|at|on) the (?:upper left|upper right|lower left|lower right|top|bottom|left|right|center))$"
)


@dataclass(frozen=True)
class Instruction:
    """One question about one image, its answer text, and the ground truth an evaluator needs."""

    kind: str  # one of KINDS
    task: str  # the MiniGPT-v2 identifier without brackets
    prompt: str  # "[task] instruction" or just the instruction (ablation)
    answer: str
    image_index: int  # index into the sample list the instruction was made from
    target: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def location_words(phrase: str) -> str:
    """The location at the end of a DS-Synth defect phrase (``"in the upper left"``); ``""`` if there is none."""
    match = _LOCATION_RE.search(phrase)
    return match.group(1) if match else ""


def _class_list(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def _sample_items(sample: SynthSample, index: int, kinds: Sequence[str], rng: np.random.Generator) -> list[tuple]:
    """(kind, instruction, answer, target) for one image; kinds that do not apply (no defect) are left out."""
    size = (sample.image.shape[1], sample.image.shape[0])
    visible = [d for d in sample.defects if (sample.mask == CLASSES.index(d.name)).any()]
    present = sorted({d.name for d in visible}, key=CLASSES.index)
    boxes = {d.name: mask_to_box(sample.mask == CLASSES.index(d.name)) for d in visible}
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    items = []
    for kind in kinds:
        template = pick(TEMPLATES[kind])
        if kind in ("refer", "where", "identify") and visible:
            defect = visible[int(rng.integers(len(visible)))]
            box = boxes[defect.name]
            target = {"class": defect.name, "box": box, "size": size, "location": location_words(defect.phrase)}
            if kind == "refer":
                items.append((kind, template.format(defect.name), box_to_text(box, size), target))
            elif kind == "where":
                items.append((kind, template.format(defect.name), target["location"], target))
            else:  # the phrase without its location: the box already says where
                what = defect.phrase[: -len(target["location"])].strip() if target["location"] else defect.phrase
                items.append((kind, template.format(box_to_text(box, size)), what, target))
        elif kind == "yesno":
            # balanced: ask about a present class or an absent one with equal probability
            absent = [c for c in DEFECTS if c not in present]
            ask_present = bool(present) and (not absent or rng.random() < 0.5)
            name = pick(present) if ask_present else pick(absent)
            items.append(
                (kind, template.format(name), "yes" if ask_present else "no", {"class": name, "present": ask_present})
            )
        elif kind == "list":
            items.append((kind, template, _class_list(present), {"classes": tuple(present)}))
        elif kind == "caption":
            items.append((kind, template, sample.caption, {"classes": tuple(present)}))
        elif kind == "grounding":
            text = (
                f"a {sample.category} surface with "
                + " and ".join(phrase_to_text(d.phrase, [boxes[d.name]], size) for d in visible)
                if visible
                else sample.caption
            )
            items.append((kind, template, text, {"classes": tuple(present), "boxes": boxes, "size": size}))
        elif kind == "detection":
            text = "<delim>".join(phrase_to_text(n, [boxes[n]], size) for n in present) or "none"
            items.append((kind, template, text, {"classes": tuple(present), "boxes": boxes, "size": size}))
    return items


def make_instructions(
    samples: Sequence[SynthSample],
    *,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    task_identifiers: bool = True,
) -> list[Instruction]:
    """Instructions for every sample and kind (seeded phrasings); ``task_identifiers=False`` drops ``[task]``.

    Example:
        make_instructions(make_samples("brick", "train", 70, size=128), kinds=("refer", "yesno"))
    """
    unknown = [k for k in kinds if k not in KIND_TASK]
    if unknown:
        raise PotpourriError(f"unknown instruction kind '{unknown[0]}'; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    out = []
    for index, sample in enumerate(samples):
        for kind, text, answer, target in _sample_items(sample, index, kinds, rng):
            task = KIND_TASK[kind]
            prompt = f"[{task}] {text}" if task_identifiers else text
            out.append(Instruction(kind, task, prompt, answer, index, target))
    return out
