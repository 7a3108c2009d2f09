"""``potpourri tune`` / ``select-layers`` end to end on a tiny ImageFolder, and their one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from potpourri.cli import main

TINY = ["--model", "tf_efficientnet_lite0", "--no-pretrained", "--img-size", "32", "--no-progress", "--threads", "1"]


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label, colour in (("red", 0), ("blue", 2)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            pixels[..., colour] = 230
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    return tmp_path / "data"


def test_tune_linear_writes_a_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["tune", *TINY, "--data", str(image_folder), "--strategy", "linear", "--epochs", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 2 and 0.0 <= float(rows[-1]["val_acc"]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear" and summary["trainable_params"] == 1280 * 2 + 2
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert "linear: 2,562 of" in capsys.readouterr().out


def test_tune_subtuning_trains_the_named_block(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["tune", *TINY, "--data", str(image_folder), "--strategy", "subtuning", "--blocks", "blocks.6.0"]
    assert main([*args, "--epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["trainable_entries"] == ["blocks.6.0", "head"]


def test_tune_visual_prompt_keeps_the_imagenet_head_and_trains_prompt_and_mapping(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["tune", *TINY, "--data", str(image_folder), "--strategy", "visual-prompt", "--epochs", "1"]
    assert main([*args, "--batch-size", "4", "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # border prompt delta (3 x 32 x 32) + the resize scale + FullyMap 1000 ImageNet logits -> 2 classes (+ bias)
    assert summary["trainable_params"] == 3 * 32 * 32 + 1 + 1000 * 2 + 2
    assert summary["trainable_entries"] == ["prompt", "mapping"]


def test_select_layers_proxy_only(image_folder, tmp_path, capsys):
    out = tmp_path / "sel"
    assert main(["select-layers", *TINY, "--data", str(image_folder), "--proxy-only", "--out", str(out)]) == 0
    proxy = json.loads((out / "summary.json").read_text())["proxy"]
    assert len(proxy["ranking"]) == 18 and proxy["ranking"][0] in proxy["scores"]  # stem, 16 blocks, neck


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "lora-xl"], "unknown strategy 'lora-xl'; choose one of linear, full-adamw"),
        (["--strategy", "subtuning", "--blocks", "blocks.99"], "unknown block 'blocks.99'; valid blocks: stem,"),
        (["--workers", "4096"], "--workers 4096 is more than the"),
        (["--resume"], "--resume needs --out DIR"),
    ],
)
def test_tune_bad_input_is_one_line(image_folder, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", *TINY, "--data", str(image_folder), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # rejected before a run folder was made


def test_tune_bad_data_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
    assert main(["tune", *TINY, "--data", str(tmp_path / "one")]) == 2
    assert "has a single class (only)" in capsys.readouterr().err
    assert main(["tune", *TINY, "--data", "ds-synth:scratches"]) == 2
    assert "unknown DS-Synth task 'scratches'" in capsys.readouterr().err


def test_tune_uses_train_and_val_folders_when_present(image_folder, tmp_path, capsys):
    root = tmp_path / "split"
    for part, names in (("train", ["0", "1", "2", "3"]), ("val", ["4", "5"])):
        for label in ("red", "blue"):
            (root / part / label).mkdir(parents=True)
            for name in names:
                (root / part / label / f"{name}.png").write_bytes((image_folder / label / f"{name}.png").read_bytes())
    out = tmp_path / "run"
    assert main(["tune", *TINY, "--data", str(root), "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1  # 8 training images in one batch of 32: the val folder was not trained on
