"""``detect predict`` under torchrun: 2 gloo processes split the files (several boxes per image, or none), rank 0
merges one ``predictions.csv``; a job SIGKILLed after each process's second image and launched again with
``--resume`` ends with the CSV of one uninterrupted process (the reference runs in the test's process)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
CONF = 0.28  # between the per-image top scores of the detector below: some images get several boxes, some none
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from potpourri.cli import main
sys.exit(main(sys.argv[1:]))
"""


def random_detector(folder: Path) -> None:
    """A registered detector with random weights and a spread-out class head, saved as a ``detect train`` run."""
    from potpourri.core.registry import create_model
    from potpourri.detect.train import save_detector
    from potpourri.models import yolo  # noqa: F401  (registers the detector variants)

    torch.manual_seed(0)
    model = create_model("yolo_rep_n", num_classes=2, reg_max=8).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("head.cls_preds"):
                param.normal_(0.0, 1.0) if name.endswith("weight") else param.fill_(-1.0)
    save_detector(folder, model, {"model": "yolo_rep_n", "class_names": ["red", "blue"], "image_size": 64})


def predict(run: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["detect", "predict", str(run), str(images), "--conf", str(CONF), "--out", str(out), "--threads", "1",
            "--device", "cpu", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_killed_and_resumed_write_the_one_process_csv(tmp_path: Path) -> None:
    from potpourri.cli import main

    run, images = tmp_path / "run", tmp_path / "images"
    random_detector(run)
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):  # blocks of 4 and 3 images
        noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise if i % 2 else np.full((64, 64, 3), 40 * (i % 4), np.uint8)).save(images / f"{i}.png")
    assert main(predict(run, images, tmp_path / "one")) == 0
    one = (tmp_path / "one" / "predictions.csv").read_text()
    boxes = Counter(row["image"] for row in csv.DictReader(one.splitlines()))
    assert len(boxes) < 7 and max(boxes.values()) >= 2  # images without a box and images with several

    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    killed = standalone(script, *predict(run, images, tmp_path / "two"), timeout=150, POTPOURRI_KILL_AT_STEP="2")
    assert killed.returncode != 0  # each process SIGKILLs itself after its second image: torchrun ends the job
    assert not (tmp_path / "two" / "predictions.csv").exists() and list((tmp_path / "two").glob("predictions.part*"))
    resumed = standalone(script, *predict(run, images, tmp_path / "two", "--resume"), timeout=150)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert (tmp_path / "two" / "predictions.csv").read_text() == one
    assert resumed.stdout.decode().count(" boxes") <= 5  # rank 0's first two images were not predicted again
    assert not list((tmp_path / "two").glob("predictions.part*"))  # merged, then the parts went
    drawn = sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    assert drawn == sorted(p.name for p in (tmp_path / "one" / "images").iterdir()) and len(drawn) == 7
    # a resume of another predict (here: another --conf, or a number of processes) is one clear error
    config = (tmp_path / "two" / "config.yaml").read_text()
    assert main([*predict(run, images, tmp_path / "two", "--resume"), "--conf", "0.5"]) == 2
    assert main(predict(run, images, tmp_path / "two", "--resume")) == 2  # 1 process, the job had 2
    assert (tmp_path / "two" / "config.yaml").read_text() == config
    assert (tmp_path / "two" / "predictions.csv").read_text() == one


def test_resume_without_out_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from potpourri.cli import main

    assert main(["detect", "predict", str(tmp_path), str(tmp_path / "x.png"), "--resume"]) == 2
    assert "--resume continues the predict in --out" in capsys.readouterr().err
