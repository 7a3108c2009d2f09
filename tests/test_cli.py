"""The ``potpourri`` command: verbs, help, and one-line errors on bad input.

Most cases call the CLI's ``main(argv)`` in this process (``potpourri`` below: the same code the console script runs,
without paying torch's import per case); ``console`` runs the installed console script in a subprocess for the cases
that are about the process itself (exit status without a verb, ``--debug`` tracebacks).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from tests.inprocess import run_main


def _verbs() -> list[str]:
    import argparse

    from potpourri.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


VERBS = _verbs()  # every verb, including those added by area modules
POTPOURRI = str(Path(sys.executable).with_name("potpourri"))  # the console script of the environment under test


def console(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([POTPOURRI, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


potpourri = run_main  # in-process


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("potpourri: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def cat_jpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path)
    return path


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture) -> None:
    assert {"list", "info", "fetch", "predict", "demo"} <= set(VERBS)
    from potpourri.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0 and f"usage: potpourri {verb}" in capsys.readouterr().out


def test_no_verb_prints_help() -> None:
    result = console()
    assert result.returncode == 2 and "usage: potpourri" in result.stdout


def test_list_shows_pretrained_models() -> None:
    result = potpourri("list", "--pretrained")
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "pretrained" in rows["efficientnet_lite0"] and "pretrained" in rows["minilm_l6"]


def test_info_json() -> None:
    info = json.loads(potpourri("info", "efficientnet_lite0", "--json").stdout)
    assert info["name"] == "efficientnet_lite0" and info["input_size"] == [3, 224, 224]


def test_fetch_into_a_cache_dir(tmp_path: Path) -> None:
    result = potpourri("fetch", "efficientnet_lite0", "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "weights" / "efficientnet_lite0.safetensors").is_file()


def test_predict_a_cat_writes_a_run(cat_jpg: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = potpourri("predict", "efficientnet_lite0", str(cat_jpg), "--topk", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "cat" in first.split(":", 1)[1].split(",")[0]  # the top class is a cat class
    summary = json.loads((out / "summary.json").read_text())
    assert 281 <= summary["predictions"][0]["top"][0]["index"] <= 285
    for name in ("config.yaml", "env.json", "metrics.csv", "report.html"):
        assert (out / name).is_file()
    header, row = csv.reader((out / "predictions.csv").read_text().splitlines())
    assert header == ["image", "label1", "prob1", "label2", "prob2", "label3", "prob3"]
    assert row[1] == summary["predictions"][0]["top"][0]["label"]


def test_runs_are_numbered(cat_jpg: Path, tmp_path: Path) -> None:
    for _ in range(2):
        assert potpourri("predict", "efficientnet_lite0", str(cat_jpg), cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "predict").iterdir()) == ["v0", "v1"]


def test_unknown_model_suggests(cat_jpg: Path) -> None:
    assert_one_line_error(potpourri("predict", "efficientnet_lit0", str(cat_jpg)), "did you mean 'efficientnet_lite0'")
    assert_one_line_error(potpourri("info", "minilm"), "did you mean 'minilm_l6'")


def test_missing_image(tmp_path: Path) -> None:
    assert_one_line_error(potpourri("predict", "efficientnet_lite0", str(tmp_path / "nope.jpg")), "nope.jpg")


def test_non_image_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(potpourri("predict", "efficientnet_lite0", str(text)), "notes.png", "cannot read image")


def test_empty_folder(tmp_path: Path) -> None:
    assert_one_line_error(potpourri("predict", "efficientnet_lite0", str(tmp_path)), "no images")


def test_corrupt_weight_file(cat_jpg: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_bytes(b"definitely not safetensors")
    result = potpourri("predict", "efficientnet_lite0", str(cat_jpg), "--weights", str(corrupt))
    assert_one_line_error(result, str(corrupt), "--weights PATH")


def test_text_model_cannot_predict_images(cat_jpg: Path) -> None:
    assert_one_line_error(potpourri("predict", "minilm_l6", str(cat_jpg)), "encodes text")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = console("--debug", "predict", "efficientnet_lite0", str(tmp_path / "nope.jpg"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_one_flag_vocabulary_with_hidden_old_spellings() -> None:
    from potpourri.cli import build_parser, flags

    parser = build_parser()
    assert parser.parse_args(["tune", "--data", "d", "--image-size", "96"]).image_size == 96
    assert parser.parse_args(["tune", "--data", "d", "--img-size", "96"]).image_size == 96  # old spelling
    assert parser.parse_args(["export", "efficientnet_lite0", "--size", "128"]).image_size == 128
    tune_help = parser._subparsers._group_actions[0].choices["tune"].format_help()
    assert "--image-size" in tune_help and "--img-size" not in tune_help  # the alias is hidden

    args = parser.parse_args(["inspect", "predict", "--run", "R", "a.png", "b.png"])
    flags.normalise_run(args)
    assert args.run == "R" and args.images == ["a.png", "b.png"]
    args = parser.parse_args(["inspect", "predict", "R", "a.png"])  # the old positional run
    flags.normalise_run(args)
    assert args.run == "R" and args.images == ["a.png"]


def test_run_flag_errors_are_one_line(capsys) -> None:
    from potpourri.cli import main

    assert main(["detect", "eval", "--data", "ds-synth:brick"]) == 2
    assert "give the run folder: --run RUN" in capsys.readouterr().err
    assert main(["detect", "eval", "--run", "R", "extra", "--data", "ds-synth:brick"]) == 2
    assert "unexpected argument 'extra'" in capsys.readouterr().err
