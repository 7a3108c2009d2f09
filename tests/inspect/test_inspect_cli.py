"""``potpourri inspect fit`` / ``predict`` end to end on the planted folder, and one-line errors on bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from potpourri.cli import main
from potpourri.inspect.patchcore import PatchCoreConfig
from tests.inprocess import run_main

potpourri = run_main  # the CLI in-process; the kill and peak-memory cases below start their own processes


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("potpourri: error:"), lines
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.slow
def test_fit_then_predict_writes_metrics_csv_overlays_masks_report(mvtec_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit = potpourri("inspect", "fit", "--method", "patchcore", "--data", str(mvtec_folder), "--out", str(run),
                    "--image-size", "96", "--coreset-ratio", "0.25", "--threads", "1")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["image_auroc"] == 1.0  # the planted squares are easy: any regression shows here
    assert summary["metrics"]["aupro"] > 0.8 and summary["thresholds"]["source"] == "f1-max on validation"
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["thresholds"]["image"] == summary["thresholds"]["image"]
    assert (run / "model.safetensors").is_file() and (run / "report.html").is_file()

    # a differently sized image (a 120x80 crop) is resized for the model, its outputs keep its own size
    odd = tmp_path / "odd.png"
    Image.open(mvtec_folder / "test/square/000.png").convert("RGB").resize((120, 80)).save(odd)
    predict = potpourri("inspect", "predict", str(run), str(mvtec_folder / "test"), str(odd), "--threads", "1")
    assert predict.returncode == 0, predict.stderr
    assert "resized to 96x96" in predict.stdout
    out = run / "predict" / "v0"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 7
    labels = {Path(r["image"]).parent.name + "/" + Path(r["image"]).name: r["label"] for r in rows}
    assert all(v == "good" for k, v in labels.items() if k.startswith("good/"))
    assert all(v == "defect" for k, v in labels.items() if k.startswith("square/"))
    odd_row = next(r for r in rows if r["image"].endswith("odd.png"))
    with Image.open(out / odd_row["mask"]) as mask:
        assert mask.size == (120, 80)
    overlays = json.loads((out / "summary.json").read_text())["overlays"]
    assert len(overlays) == 7 and all((out / o).is_file() for o in overlays)  # 7 < the default --top-k 16
    report = (out / "report.html").read_text()
    assert "odd.png" in report and report.count("<img") == 7


def test_test_set_without_defects_reports_nan_and_note(tmp_path: Path, mvtec_folder: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(mvtec_folder / "train", data / "train")
    shutil.copytree(mvtec_folder / "test" / "good", data / "test" / "good")
    with Image.open(data / "train/good/000.png") as image:
        image.resize((80, 64)).save(data / "train/good/odd.png")  # one training image of another size
    argv = ["inspect", "fit", "--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "96"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AUROC is undefined: the test set has no defect image" in out
    assert "training images were resized to 96x96 (found 80x64 (1), 96x96 (8))" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isnan(summary["metrics"]["image_auroc"])
    # no labelled defects: the threshold comes from good training images held out of the fit
    assert summary["thresholds"]["source"] == "0.99 quantile of held-out normal scores"
    assert summary["normal_holdout_images"] == 2


def test_predict_on_a_folder_that_is_not_a_run(tmp_path: Path, mvtec_folder: Path, capsys) -> None:
    one_line_error(capsys, ["inspect", "predict", str(tmp_path), str(mvtec_folder / "test")], "not an inspection run")
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "potpourri.inspect", "format_version": 1,
                                                         "method": "padim"}))  # fmt: skip
    one_line_error(capsys, ["inspect", "predict", str(tmp_path), str(mvtec_folder / "test")], "unknown method 'padim'")


def test_bad_data_specs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    one_line_error(capsys, ["inspect", "fit", "--data", "ds-synth:bottle"], "unknown DS-Synth category 'bottle'")
    one_line_error(capsys, ["inspect", "fit", "--data", str(tmp_path / "nope")], "is not a folder")
    one_line_error(capsys, ["inspect", "fit", "--data", str(tmp_path)], "no images")


def test_ds_synth_category_is_generated_once_as_an_mvtec_folder() -> None:
    from potpourri.data.folders import read_folder

    data = read_folder("ds-synth:brick")
    assert data.layout == "mvtec" and len(data.train) == 20  # 2 x per_class good training images
    assert sum(data.labels) == 70 and len(data.test) == 80  # 10 per defect class and "multi", 10 good
    assert all(m is not None and m.is_file() for m, y in zip(data.mask_paths, data.labels, strict=True) if y)
    first = data.train[0].stat().st_mtime_ns
    assert read_folder("ds-synth:brick").train[0].stat().st_mtime_ns == first  # cached, not regenerated


def predict_job(out: str, resume: bool) -> None:
    """``inspect predict`` over 26 planted images in the method's batches (a kill test job, see tests/resume.py)."""
    import os

    from potpourri.cli import main

    root = Path(os.environ["PREDICT_FIXTURE"])
    argv = ["inspect", "predict", "--run", str(root / "run"), str(root / "images"), "--out", out, "--no-progress"]
    assert main([*argv, "--top-k", "2", *(["--resume"] if resume else [])]) == 0


@pytest.mark.slow
def test_predict_killed_after_a_batch_resumes_to_the_same_csv(mvtec_folder: Path, tmp_path: Path, monkeypatch) -> None:
    from tests.resume import run_job

    run = tmp_path / "run"
    fit = potpourri("inspect", "fit", "--data", str(mvtec_folder), "--out", str(run), "--image-size", "64",
                    "--coreset-ratio", "0.5", "--threads", "1")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(mvtec_folder.glob("test/*/*.png"))
    for i in range(26):  # not a multiple of the batch size: the last batch is short
        Image.open(sources[i % len(sources)]).rotate(90 * (i // len(sources))).save(images / f"{i:02d}.png")
    monkeypatch.setenv("PREDICT_FIXTURE", str(tmp_path))
    job = "tests.inspect.test_inspect_cli:predict_job"
    assert run_job(job, tmp_path / "straight", "fresh", in_process=True).returncode == 0
    killed = run_job(job, tmp_path / "killed", "fresh", kill_at=2)  # after the second batch is on disk
    assert killed.returncode == -9, killed.stderr[-2000:]
    with open(tmp_path / "killed" / "predictions.csv", "a") as fh:
        fh.write("/a/torn/row.png,0.1")  # a row cut by the kill: dropped on resume
    batch = PatchCoreConfig().batch_size  # predict writes one batch of the method's size at a time
    assert len(list(csv.DictReader((tmp_path / "killed" / "predictions.csv").open()))) == 2 * batch + 1
    resumed = run_job(job, tmp_path / "killed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = (tmp_path / "straight" / "predictions.csv").read_text()
    assert (tmp_path / "killed" / "predictions.csv").read_text() == straight
    assert len(straight.splitlines()) == 27


@pytest.mark.slow
def test_predict_over_2000_images_stays_under_1_5_gb(mvtec_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit = potpourri("inspect", "fit", "--data", str(mvtec_folder), "--out", str(run), "--image-size", "32",
                    "--coreset-ratio", "0.5", "--threads", "1")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2000):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    # the peak of the predict process itself, from /proc (VmHWM restarts at exec): RUSAGE_CHILDREN reports the
    # largest child the session ever waited for, and a child's ru_maxrss keeps the forking pytest's size
    measure = (
        "import sys; from pathlib import Path; from potpourri.cli import main; rc = main(sys.argv[1:]); "
        "hwm = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')); "
        "print('peak_kib', hwm.split()[1], file=sys.stderr); sys.exit(rc)"
    )
    predict = subprocess.run([sys.executable, "-c", measure, "inspect", "predict", "--run", str(run), str(images),
                              "--out", str(tmp_path / "p"), "--threads", "1", "--no-progress"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-2000:]
    peak_kib = int(predict.stderr.strip().splitlines()[-1].split()[-1])
    assert len((tmp_path / "p" / "predictions.csv").read_text().splitlines()) == 2001
    assert peak_kib < 1.5 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
