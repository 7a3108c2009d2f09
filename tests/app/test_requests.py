"""Plain-language requests run on planted class maps (``app/requests.py``), and reached from ``potpourri chat``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from potpourri.app.requests import MIN_PIXELS, REFUSAL, run_call
from potpourri.data.describe import describe_mask
from potpourri.vlm.router import Call

NAMES = ("background", "scratch", "crack", "stain", "hole", "contamination", "dent")


def _maps() -> dict[str, np.ndarray]:
    a = np.zeros((40, 40), np.int64)
    a[5:10, 5:10] = 4  # 25 px hole
    a[20:30, 20:30] = 4  # 100 px hole
    a[35, 0:10] = 1  # 10 px scratch: below MIN_PIXELS
    b = np.zeros((40, 40), np.int64)
    b[0:2, 0:30] = 1  # 60 px scratch
    c = np.zeros((40, 40), np.int64)
    c[10:20, 10:14] = 1  # 40 px scratch
    return {"a.png": a, "b.png": b, "c.png": c}


def test_calls_answer_from_the_planted_maps() -> None:
    maps = _maps()
    assert run_call(Call("count", "hole"), maps, NAMES, "a.png").text == "2 hole region(s) in a.png"
    assert run_call(Call("count", "scratch"), maps, NAMES, "a.png").text.startswith("0 ")  # 10 px < MIN_PIXELS
    assert MIN_PIXELS > 10
    found = run_call(Call("find", "scratch"), maps, NAMES, "a.png").text
    assert found == "scratch found in 2 of 3 image(s): b.png, c.png"
    worst = run_call(Call("worst", "scratch", 3), maps, NAMES, "a.png").text
    assert worst.startswith("worst 3 by scratch (only 2 have any): b.png (3.8% of its pixels), c.png (2.5%")
    segment = run_call(Call("segment", "hole"), maps, NAMES, "a.png")
    assert segment.mask.sum() == 125 and "125 px" in segment.text
    described = run_call(Call("describe", "any"), maps, NAMES, "a.png")
    largest = np.zeros((40, 40), bool)
    largest[20:30, 20:30] = True  # the larger of the two holes, named by its class
    assert described.text == describe_mask(largest, "hole") and (described.mask == largest).all()
    assert run_call(Call("describe", "dent"), maps, NAMES, "a.png").text == "no dent found in a.png"
    assert run_call(Call("refuse"), maps, NAMES, "a.png").text == REFUSAL


def test_chat_routes_slash_requests_to_the_segmenter(tiny_run, tmp_path, capsys) -> None:
    from potpourri.cli import main
    from potpourri.core.imaging import read_rgb
    from potpourri.core.registry import create_model
    from potpourri.segment.segmenter import Segmenter, SegmenterConfig

    images = np.full((2, 32, 32, 3), 40, dtype=np.uint8)
    masks = np.zeros((2, 32, 32), dtype=np.int64)
    images[:, 8:24, 8:24], masks[:, 8:24, 8:24] = 230, 4  # a bright square is a hole
    config = SegmenterConfig(pretrained=False, class_names=NAMES, image_size=32, steps=30, batch_size=2, augment=False)
    trained = Segmenter(config, backbone=create_model("efficientnet_lite0", pretrained=False)).fit(images, masks)
    trained.save(tmp_path / "segmenter")
    predicted = trained.predict(read_rgb(tiny_run.box_image)[None])[0]
    base = ["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "--inspect", str(tmp_path / "segmenter")]
    assert main([*base, "-q", "/how many holes are in this part?", "--out", str(tmp_path / "c1")]) == 0
    printed = capsys.readouterr().out
    assert "call: count(kind=hole)" in printed
    expected = run_call(Call("count", "hole"), {str(tiny_run.box_image): predicted}, NAMES, str(tiny_run.box_image))
    assert f"answer: {expected.text}" in printed  # the in-memory segmenter, through run_call, says the same
    assert main([*base, "-q", "/order pizza for the team", "--out", str(tmp_path / "c2")]) == 0
    assert "call: refuse()" in capsys.readouterr().out
    assert main([*base, "-q", "/describe rust", "--out", str(tmp_path / "c3")]) == 2
    assert "unknown kind 'rust'" in capsys.readouterr().err
    assert main([*base, "-q", "/describe", "--out", str(tmp_path / "c4")]) == 0
    record = json.loads((tmp_path / "c4" / "transcript.jsonl").read_text())
    assert record["call"] == "describe(kind=any)"
    assert re.match(r"(an? .* in the .* of the image|no defect)", record["answer"]), record["answer"]
    no_seg = main(["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "-q", "/count holes"])
    assert no_seg == 2 and "need a segmenter run" in capsys.readouterr().err
    # no VLM run: '/' requests alone, the same answer; a plain question or no run at all is a one-line error
    alone = ["chat", str(tiny_run.box_image), "--inspect", str(tmp_path / "segmenter")]
    assert main([*alone, "-q", "/how many holes are in this part?", "--out", str(tmp_path / "c5")]) == 0
    assert f"answer: {expected.text}" in capsys.readouterr().out
    assert main([*alone, "-q", "what is this?", "--out", str(tmp_path / "c6")]) == 2
    assert "questions need a VLM run" in capsys.readouterr().err and not (tmp_path / "c6").exists()
    assert main(["chat", str(tiny_run.box_image), "-q", "/count holes"]) == 2
    assert "chat needs a VLM run (--run)" in capsys.readouterr().err


def test_chat_router_flag_is_validated_at_parse_time(tiny_run, capsys) -> None:
    from potpourri.cli import main

    assert main(["chat", str(tiny_run.box_image), "--run", str(tiny_run.path), "--router", "gpt9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'gpt9'" in err


class _PlantedSegmenter:
    """What RequestRunner reads from a segmenter: its class names and a class map per image (a planted one)."""

    class config:
        class_names = NAMES

    def predict(self, images: np.ndarray) -> np.ndarray:
        maps = np.zeros(images.shape[:3], np.int64)
        maps[:, 4:12, 4:12] = 4  # one 64 px hole
        return maps


def test_web_request_field_routes_runs_and_draws() -> None:
    from potpourri.app.requests import RequestRunner
    from potpourri.app.serve import answer_request
    from potpourri.vlm.router import KeywordRouter

    runner = RequestRunner(KeywordRouter().route, _PlantedSegmenter())
    image = np.full((20, 20, 3), 100, np.uint8)
    assert answer_request(runner, image, "how many holes are in this part?")[:2] == (
        "count(kind=hole)", "1 hole region(s) in upload")  # fmt: skip
    call, text, drawn = answer_request(runner, image, "outline the holes")
    assert call == "segment(kind=hole)" and text == "hole: 64 px (16.0%) in upload"
    assert (drawn[4:12, 4:12] != image[4:12, 4:12]).all() and (drawn[15:, 15:] == image[15:, 15:]).all()
    assert answer_request(runner, image, "tell me a joke")[0] == "refuse()"


def test_web_page_has_the_request_field_only_with_a_runner(tiny_run) -> None:
    pytest.importorskip("gradio")
    from potpourri.app.assistant import Assistant
    from potpourri.app.requests import RequestRunner
    from potpourri.app.serve import build_app
    from potpourri.vlm.router import KeywordRouter

    assistant = Assistant(tiny_run.path)
    ids = lambda app: {c.get("props", {}).get("elem_id") for c in app.config["components"]}  # noqa: E731
    assert "request" not in ids(build_app(assistant))
    runner = RequestRunner(KeywordRouter().route, _PlantedSegmenter())
    assert {"request", "call", "request-answer"} <= ids(build_app(assistant, runner))
