"""Instruction data from DS-Synth: answers checked against the masks themselves, identifiers on and off."""

from __future__ import annotations

import re

import numpy as np
import pytest

from potpourri import PotpourriError
from potpourri.core.textgeo import parse_boxes, parse_phrases, quantize_box
from potpourri.data.instructions import KINDS, TEMPLATES, location_words, make_instructions
from potpourri.data.synth import CLASSES, make_samples

MINIGPT_RE = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


@pytest.fixture(scope="module")
def samples():
    kinds = (*CLASSES, "multi", "multi")
    return make_samples("brick", "train", 2 * len(kinds), size=64, kinds=kinds)


def _present(sample) -> list[str]:
    """Defect classes from the mask pixels alone, in class order."""
    return [CLASSES[i] for i in np.unique(sample.mask) if i > 0]


def _mask_box_grid(sample, name: str) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(sample.mask == CLASSES.index(name))
    w, h = sample.mask.shape[1], sample.mask.shape[0]
    return (
        int(xs.min() / w * 100),
        int(ys.min() / h * 100),
        int((xs.max() + 1) / w * 100),
        int((ys.max() + 1) / h * 100),
    )


def test_refer_answers_are_minigpt_boxes_of_the_named_defects_mask(samples) -> None:
    items = [i for i in make_instructions(samples, kinds=("refer",)) if i.kind == "refer"]
    assert len(items) == sum(bool(_present(s)) for s in samples)  # good images get no refer question
    for item in items:
        sample = samples[item.image_index]
        name = item.target["class"]
        assert name in _present(sample) and name in item.prompt and item.prompt.startswith("[refer] ")
        assert MINIGPT_RE.fullmatch(item.answer)
        assert parse_boxes(item.answer) == [_mask_box_grid(sample, name)]


def test_yes_no_answers_follow_the_mask_and_are_balanced(samples) -> None:
    items = make_instructions(samples * 4, kinds=("yesno",), seed=3)
    for item in items:
        present = item.target["class"] in _present(samples[item.image_index % len(samples)])
        assert item.answer == ("yes" if present else "no")
    share_yes = np.mean([item.answer == "yes" for item in items])
    assert 0.3 < share_yes < 0.6  # half asked about a present class, except on good images (always "no")


def test_list_caption_detection_and_grounding_answers(samples) -> None:
    items = make_instructions(samples, kinds=("list", "caption", "detection", "grounding"))
    for item in items:
        sample = samples[item.image_index]
        present = _present(sample)
        if item.kind == "list":
            assert item.answer == (", ".join(present) or "none")
        elif item.kind == "caption":
            assert item.answer == sample.caption
        elif item.kind == "detection":
            groups = parse_phrases(item.answer)
            assert [phrase for phrase, _ in groups] == present
            assert all(boxes == [_mask_box_grid(sample, phrase)] for phrase, boxes in groups)
        else:  # grounding: every visible defect's phrase with its box
            groups = parse_phrases(item.answer)
            assert len(groups) == len(present)
            for phrase, boxes in groups:
                name = next(n for n in present if n in phrase)
                assert boxes == [_mask_box_grid(sample, name)] and location_words(phrase)


def test_where_and_identify_answers(samples) -> None:
    items = make_instructions(samples, kinds=("where", "identify"))
    for item in items:
        sample = samples[item.image_index]
        defect = next(d for d in sample.defects if d.name == item.target["class"])
        if item.kind == "where":
            assert item.answer == location_words(defect.phrase) and defect.phrase.endswith(item.answer)
        else:
            assert parse_boxes(item.prompt) == [_mask_box_grid(sample, defect.name)]
            assert defect.name in item.answer and not location_words(item.answer)


def test_without_identifiers_only_the_prefix_goes_and_refer_and_where_read_alike(samples) -> None:
    with_ids = make_instructions(samples, seed=5)
    without = make_instructions(samples, seed=5, task_identifiers=False)
    assert [i.answer for i in with_ids] == [i.answer for i in without]
    for a, b in zip(with_ids, without, strict=True):
        assert a.prompt == f"[{a.task}] {b.prompt}" and not b.prompt.startswith("[")
    assert {i.kind for i in with_ids} == set(KINDS)
    assert TEMPLATES["refer"] == TEMPLATES["where"] and TEMPLATES["caption"] == TEMPLATES["grounding"]
    assert all(len(TEMPLATES[k]) >= 3 for k in KINDS)  # several phrasings per task


def test_unknown_kind_is_one_line() -> None:
    with pytest.raises(PotpourriError, match="unknown instruction kind 'boxes'"):
        make_instructions([], kinds=("boxes",))


def test_quantised_boxes_agree_with_textgeo(samples) -> None:
    sample = next(s for s in samples if _present(s))
    name = _present(sample)[0]
    ys, xs = np.nonzero(sample.mask == CLASSES.index(name))
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert quantize_box(box, (64, 64)) == _mask_box_grid(sample, name)
