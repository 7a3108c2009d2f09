"""The non-LLM VLM baseline: answers from masks/presences are graded by the VLM's own scorer against planted truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potpourri import PotpourriError
from potpourri.core.textgeo import parse_boxes
from potpourri.data.instructions import make_instructions
from potpourri.data.synth import CLASSES, DEFECTS, make_samples
from potpourri.papers.vlm_baseline import answer_texts, component_boxes
from potpourri.vlm.train import score

ALL_KINDS = ("refer", "where", "yesno", "list", "identify", "caption", "grounding", "detection")


@pytest.fixture(scope="module")
def data():
    samples = make_samples("brick", "test", 14, size=64)  # good + 6 defect kinds, twice
    return samples, make_instructions(samples, kinds=ALL_KINDS, seed=0)


def _truth(samples) -> tuple[np.ndarray, np.ndarray]:
    masks = np.stack([s.mask for s in samples]).astype(np.int64)
    presence = np.array([[float((s.mask == CLASSES.index(n)).any()) for n in DEFECTS] for s in samples])
    return masks, presence


def test_true_masks_and_presences_score_perfectly(data) -> None:
    samples, items = data
    masks, presence = _truth(samples)
    metrics = score(items, answer_texts(items, samples, masks, presence, min_pixels=1))
    for name in ("refer_acc", "yesno_acc", "list_f1", "caption_recall", "identify_acc"):
        assert metrics[name] == 1.0, (name, metrics)
    assert metrics["grounding_recall"] == 1.0 and metrics["detection_recall"] == 1.0
    # location words come from the mask box's centre, the generator's from its own centre: nearly always the same cell
    assert metrics["where_acc"] >= 0.75


def test_flipped_presences_answer_every_yes_no_wrongly_and_empty_masks_give_no_boxes(data) -> None:
    samples, items = data
    masks, presence = _truth(samples)
    metrics = score(items, answer_texts(items, samples, np.zeros_like(masks), 1.0 - presence))
    assert metrics["yesno_acc"] == 0.0
    assert metrics["refer_acc"] == 0.0 and metrics["refer_format"] == 0.0  # nothing segmented: no box at all
    assert metrics["list_f1"] < 0.2  # good images now list all six classes, defect images the five wrong ones


def test_component_boxes_drop_specks_and_join_the_kept_parts_of_a_class() -> None:
    mask = np.zeros((32, 32), np.int64)
    crack = CLASSES.index("crack")
    mask[2:6, 3:9] = crack  # 24 px
    mask[20:23, 10:12] = crack  # 6 px, kept
    mask[30, 30] = crack  # 1 px speck
    mask[10, 20] = CLASSES.index("hole")  # a class made only of a speck disappears
    found = component_boxes(mask, min_pixels=4)
    assert set(found) == {"crack"}
    assert found["crack"] == ((3.0, 2.0, 12.0, 23.0), 30)  # (x1, y1, x2+1, y2+1) of both kept parts
    assert set(component_boxes(mask, min_pixels=1)) == {"crack", "hole"}


def test_refer_falls_back_to_the_largest_region_when_the_asked_class_is_missing(data) -> None:
    samples, items = data
    masks, presence = _truth(samples)
    item = next(i for i in items if i.kind == "refer")
    relabelled = masks.copy()
    relabelled[item.image_index][relabelled[item.image_index] > 0] = 1 if item.target["class"] != "scratch" else 2
    (answer,) = answer_texts([item], samples, relabelled, presence, min_pixels=1)
    assert score([item], [answer])["refer_acc"] == 1.0  # same pixels under another class name: the same box
    assert len(parse_boxes(answer)) == 1


def test_answer_texts_rejects_mismatched_inputs(data) -> None:
    samples, items = data
    masks, presence = _truth(samples)
    with pytest.raises(PotpourriError, match="masks"):
        answer_texts(items, samples, masks[:3], presence)


def test_cli_baseline_fits_and_writes_a_scored_summary(tmp_path, capsys) -> None:
    from potpourri.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "base"
        args = ["vlm", "baseline", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
                "--n-train", "14", "--n-test", "7", "--seg-size", "64", "--seg-steps", "2",
                "--kinds", "yesno,refer,list", "--out", str(out)]  # fmt: skip
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    assert {"model", "segmenter_answers", "question_only_baseline"} <= set(summary)
    assert summary["model"]["n_yesno"] == 7 and 0.0 <= summary["model"]["yesno_acc"] <= 1.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["classifier"] in ("yes", "no") for r in rows if r["kind"] == "yesno")
    assert "segmenter-only answers" in capsys.readouterr().out
