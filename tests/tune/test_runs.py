"""A tune run reloads: ``predict --run`` answers in the tuned classes with the run's transform, ``export --run``
gives an ONNX graph equal to eager within 1e-4 with the tuned labels, ``load_run`` is the same predictor in Python,
and a weight file that does not fit is one line — never a silent drop."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

from potpourri import load_run
from potpourri.cli import main
from potpourri.tune.predict import plain_state_dict

pytestmark = pytest.mark.one_thread


def colour_folder(root, n, seed):
    """Two classes told apart by colour ('blue', 'red'), textured by noise; 48 x 40 px, not square."""
    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 90, (40, 48, 3))
            img[..., channel] += 150
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuned")
    data = colour_folder(tmp / "data", 8, seed=0)
    run = tmp / "run"
    argv = ["tune", "--data", str(data), "--epochs", "4", "--lr", "0.05", "--image-size", "64", "--out", str(run)]
    assert main([*argv, "--no-progress", "--threads", "1"]) == 0
    return run, colour_folder(tmp / "held_out", 3, seed=1)


def test_the_run_records_what_rebuilds_it(tuned):
    run, _ = tuned
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["classes"] == ["blue", "red"] and meta["model"] == "efficientnet_lite0"
    assert meta["model_args"] == {"num_classes": 2} and meta["input"]["size"] == [3, 64, 64]
    assert meta["input"]["crop_pct"] == 1.0 and meta["versions"]["torch"] == torch.__version__


def test_predict_run_answers_in_the_tuned_classes(tuned, tmp_path):
    run, held_out = tuned
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), str(held_out), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6 and {r["label1"] for r in rows} <= {"blue", "red"}
    right = sum(r["label1"] == ("blue" if "/blue/" in r["image"] else "red") for r in rows)
    assert right == 6, rows  # colour is trivially separable by pretrained features
    predictor = load_run(run)
    again = predictor.predict([str(held_out / "red" / "0.png")])[0]
    assert predictor.kind == "classifier" and again["label"] == "red" and len(again["top"]) == 2


def test_export_run_equals_eager_within_1e_4_with_the_tuned_labels(tuned, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    run, held_out = tuned
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == ["blue", "red"] and meta["input_size"] == [3, 64, 64]
    assert meta["parity_max_abs_diff"] <= 1e-4
    predictor = load_run(run)
    x = predictor.transform()(Image.open(held_out / "blue" / "1.png").convert("RGB"))[None]
    session = ort.InferenceSession(str(next(out.glob("*.onnx"))), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        eager = predictor.model(x)
    assert np.abs(onnx_logits - eager.numpy()).max() <= 1e-4
    assert meta["class_names"][int(onnx_logits.argmax())] == "blue"


def test_a_weight_file_that_does_not_fit_is_one_line_naming_the_keys(tuned, tmp_path, capsys):
    run, held_out = tuned
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text((run / "metadata.json").read_text())
    state = load_file(str(run / "model.safetensors"))
    state["classifier.weight"] = torch.zeros(3, state["classifier.weight"].shape[1])  # a 3-class head
    save_file(state, str(broken / "model.safetensors"))
    assert main(["predict", "--run", str(broken), str(held_out), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shape of classifier.weight: (3, 1280) in the file, (2, 1280)" in err, err
    assert not (tmp_path / "p").exists()


def test_predict_run_refuses_weights_and_a_non_tune_folder(tuned, tmp_path, capsys):
    run, held_out = tuned
    weights = run / "model.safetensors"
    assert main(["predict", "--run", str(run), str(held_out), "--weights", str(weights)]) == 2
    assert main(["predict", "--run", str(tmp_path), str(held_out)]) == 2
    err = capsys.readouterr().err
    assert "--weights does not apply with --run" in err
    assert "holds no model potpourri can load" in err  # an empty folder: no run of any kind


def test_lora_merge_is_the_formula_and_keeps_the_outputs():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    adapted = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    adapted.load_state_dict(plain.state_dict())
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0"], lora_dropout=0.0), adapted)
    with torch.no_grad():
        for p in adapted.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() > 1 else None
    merged = plain_state_dict(adapted)
    assert set(merged) == set(plain.state_dict())
    a, b = adapted[0].lora_A["default"].weight, adapted[0].lora_B["default"].weight
    expected = adapted[0].base_layer.weight + (6 / 2) * b @ a  # W + (alpha / r) B A
    assert torch.allclose(merged["0.weight"], expected, atol=1e-6)
    plain.load_state_dict(merged)
    x = torch.randn(3, 6)
    assert torch.allclose(plain[0](x), adapted[0](x), atol=1e-5)


def test_config_of_a_run_reproduces_it_and_flags_on_the_command_line_win(tuned, tmp_path, capsys):
    import yaml

    run, _ = tuned
    config = run / "config.yaml"
    assert yaml.safe_load(config.read_text())["data"].endswith("data")
    again = tmp_path / "again"
    assert main(["tune", "--config", str(config), "--out", str(again), "--threads", "1", "--no-progress"]) == 0
    first, second = load_file(str(run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)  # same seed, same data, same settings
    shorter = tmp_path / "shorter"
    assert main(["tune", "--config", str(config), "--epochs", "1", "--out", str(shorter), "--no-progress"]) == 0
    recorded = yaml.safe_load((shorter / "config.yaml").read_text())
    assert recorded["epochs"] == 1 and recorded["lr"] == 0.05 and recorded["image_size"] == 64
    capsys.readouterr()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("[1, 2]", "not a mapping"), ("epochs: -3\n", "--epochs: must be at least 1")],
)
def test_a_bad_config_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["tune", "--data", "ds-synth:classification", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()
