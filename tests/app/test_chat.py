"""``potpourri chat`` on a tiny planted VLM run: answers, boxes drawn at the parsed pixels, REPL, errors, inspection."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch

from potpourri.app.assistant import answer_mask, answer_regions, draw_answer
from potpourri.cli import main
from potpourri.core.imaging import read_rgb
from tests.app.conftest import BOX_ANSWER, GRID_BOX, HEIGHT, QUESTION, WIDTH, WORD_ANSWER

RED = (255, 0, 0)  # the first region's colour


pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _expected_pixel_box() -> tuple[int, int, int, int]:
    """The planted grid box on the 100 x 50 image: pixels x1..x2-1, y1..y2-1 (x = g / 100 * W, y = g / 100 * H)."""
    gx1, gy1, gx2, gy2 = GRID_BOX
    return gx1 * WIDTH // 100, gy1 * HEIGHT // 100, gx2 * WIDTH // 100, gy2 * HEIGHT // 100


def test_question_mode_answers_and_draws_the_box_on_the_image_pixels(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "chat"
    assert main(["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "-q", QUESTION, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"answer: {BOX_ANSWER}\n" in printed
    saved = re.search(r"boxes: 1; drawn on (\S+)", printed)
    assert saved, printed
    drawn, original = read_rgb(saved.group(1)), read_rgb(tiny_run.box_image)
    assert drawn.shape == original.shape == (HEIGHT, WIDTH, 3)
    x1, y1, x2, y2 = _expected_pixel_box()  # (10, 10, 60, 40)
    outline = np.zeros((HEIGHT, WIDTH), dtype=bool)
    outline[y1:y2, x1:x2] = True
    outline[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] = False  # a 2-pixel frame along the box's own pixels
    assert (drawn[outline] == RED).all()
    assert (drawn[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] == original[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]).all()
    untouched = ~outline
    untouched[:y1, x1:] = False  # the phrase label sits above the box
    assert (drawn[untouched] == original[untouched]).all()
    record = json.loads((out / "transcript.jsonl").read_text())
    assert record["boxes"] == [{"phrase": "crack", "box": [float(v) for v in (x1, y1, x2, y2)]}]


def test_word_answer_saves_no_drawing(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "chat"
    assert main(["chat", str(tiny_run.word_image), "--run", str(tiny_run.path), "-q", QUESTION, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"answer: {WORD_ANSWER}\n" in printed and "drawn on" not in printed
    assert not (out / "images").exists()


def test_repl_answers_each_question_until_quit_and_switches_images(tiny_run, tmp_path, monkeypatch, capsys) -> None:
    lines = f"{QUESTION}\n\n:image {tiny_run.word_image}\n{QUESTION}\nquit\n{QUESTION}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    out = tmp_path / "chat"
    assert main(["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "--out", str(out)]) == 0
    answers = re.findall(r"^answer: (.*)$", capsys.readouterr().out, flags=re.MULTILINE)
    assert answers == [BOX_ANSWER, WORD_ANSWER]  # nothing after 'quit'
    assert len((out / "transcript.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("case", ["missing run", "not a vlm run", "corrupt image", "missing image"])
def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys, case: str) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "other" / "run").mkdir(parents=True)
    (tmp_path / "other" / "run" / "metadata.json").write_text("{}")
    image, run, expect = str(tiny_run.box_image), str(tiny_run.path), ""
    if case == "missing run":
        run, expect = str(tmp_path / "nowhere"), "does not exist; train one with `potpourri vlm train"
    elif case == "not a vlm run":
        run, expect = str(tmp_path / "other" / "run"), "is not a `potpourri vlm train` run (no config.yaml"
    elif case == "corrupt image":
        image, expect = str(tmp_path / "corrupt.png"), "cannot read image (corrupt or truncated"
    else:
        image, expect = str(tmp_path / "nothing.png"), "image file not found"
    assert main(["chat", image, "--run", run, "-q", QUESTION, "--out", str(tmp_path / "chat")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("potpourri: error:") and expect in err, err


def test_inspect_run_adds_the_patchcore_verdict(tiny_run, patchcore_run, tmp_path, capsys) -> None:
    folder, fitted = patchcore_run
    expected = fitted.predict([read_rgb(tiny_run.box_image)])[0].score  # the in-memory model, not the loaded run
    args = ["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "-q", QUESTION,
            "--inspect", str(folder), "--out", str(tmp_path / "chat")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    verdict = re.search(r"inspection: patchcore: score (\S+); overlay (\S+)", printed)
    assert verdict, printed
    assert float(verdict.group(1)) == pytest.approx(expected, rel=1e-2)
    assert read_rgb(verdict.group(2)).shape == (HEIGHT, WIDTH, 3)
    assert main([*args[:-4], "--inspect", str(tmp_path / "chat"), *args[-2:]]) == 2  # neither kind of run


def test_inspect_segmenter_run_tints_its_defect_classes(tiny_run, tmp_path) -> None:
    from potpourri.app.assistant import Assistant
    from potpourri.core.registry import create_model
    from potpourri.segment.segmenter import Segmenter, SegmenterConfig, colour_mask

    images = np.full((2, 32, 32, 3), 40, dtype=np.uint8)
    masks = np.zeros((2, 32, 32), dtype=np.int64)
    images[:, 8:24, 8:24], masks[:, 8:24, 8:24] = 230, 1  # a bright square is a scratch
    config = SegmenterConfig(pretrained=False, class_names=("background", "scratch", "crack"), image_size=32, steps=30,
                             batch_size=2, augment=False)  # fmt: skip
    trained = Segmenter(config, backbone=create_model("efficientnet_lite0", pretrained=False)).fit(images, masks)
    trained.save(tmp_path / "segmenter")
    image = images[0]
    classes = trained.predict(image[None])[0]  # the in-memory segmenter's answer
    view = Assistant(tiny_run.path, inspect=tmp_path / "segmenter").ask(image, QUESTION).inspection
    assert view.method == "segmenter" and view.score == pytest.approx((classes > 0).mean())
    for k, name in ((1, "scratch"), (2, "crack")):
        found = f"{name} {(classes == k).sum()} px ({(classes == k).mean():.1%})"
        assert (found in view.summary) == bool((classes == k).any()), view.summary
    defect = classes > 0
    assert 0 < defect.mean() < 1  # both branches of the overlay are exercised
    assert (view.overlay[~defect] == image[~defect]).all()
    tinted = (0.5 * image[defect] + 0.5 * colour_mask(classes)[defect]).astype(np.uint8)
    assert (view.overlay[defect] == tinted).all()


# ---------------------------------------------------------------------------------------------------- no model
def test_the_planted_run_config_is_what_vlm_train_writes() -> None:
    """The fixture writes its run by hand; `vlm train` with the same flags must give the same values for every key
    ``load_vlm_run`` reads, so a change to the run format fails here."""
    from potpourri.cli import build_parser
    from tests.app.conftest import RUN_CONFIG

    args = build_parser().parse_args(["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random",
                                      "--image-size", "64", "--kinds", "refer"])  # fmt: skip
    written = {k: v for k, v in vars(args).items() if k not in ("func", "out", "threads", "vlm_command")}
    keys = ("encoder", "lm", "pretrained", "merge", "image_size", "seed", "lora_rank", "lora_alpha", "task_identifiers")
    assert {k: written[k] for k in keys} == {k: RUN_CONFIG[k] for k in keys}


def test_regions_keep_phrases_and_unlabelled_boxes() -> None:
    text = "{<0><0><50><50>} and <p>scratch</p> {<50><50><100><100>}<delim>{ <1> <2><3><4>} <p>dent</p> {<9><9>"
    regions = answer_regions(text, (200, 100))
    assert regions == [("", (0.0, 0.0, 100.0, 50.0)), ("scratch", (100.0, 50.0, 200.0, 100.0)),
                       ("scratch", (2.0, 2.0, 6.0, 4.0))]  # fmt: skip
    assert answer_regions(None, (10, 10)) == [] and answer_regions("<p>x</p>", (10, 10)) == []


def test_polygon_answer_is_tinted_in_and_boxes_clip_to_the_image() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    mask = answer_mask("the dent: <poly><0><0><50><0><50><50><0><50></poly>", (40, 40))
    assert mask is not None and mask[:20, :20].all() and not mask[20:].any() and not mask[:, 20:].any()
    drawn = draw_answer(image, [("", (-5.0, -5.0, 400.0, 400.0))], mask)  # a box past the border: clipped, drawn
    assert (drawn[5:18, 5:18] == (128, 0, 128)).all()  # 50 % of the mask colour over black
    assert (drawn[0, :] == RED).all() and (drawn[:, 39] == RED).all() and (drawn[25, 25] == 0).all()
    assert answer_mask("no mask here", (4, 4)) is None


def test_serve_without_gradio_names_the_extra(tiny_run, monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # `import gradio` now raises ImportError
    assert main(["serve", "--run", str(tiny_run.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'potpourri[app]'" in err


def test_chat_precision_reaches_the_vlm(tiny_run, tmp_path, monkeypatch) -> None:
    from tests.vlm.test_resume import spy_image_token_dtypes

    seen = spy_image_token_dtypes(monkeypatch)
    args = ["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "-q", QUESTION, "--device", "cpu"]
    assert main([*args, "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert seen == [torch.bfloat16]
    assert main([*args, "--out", str(tmp_path / "fp32")]) == 0
    assert seen == [torch.bfloat16, torch.float32]
    assert main([*args, "--precision", "fp16", "--out", str(tmp_path / "fp16")]) == 2  # fp16 needs CUDA: one line
