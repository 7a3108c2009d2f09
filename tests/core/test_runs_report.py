"""Run folders and the HTML report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from potpourri.core.runs import environment, new_run, seed_everything
from potpourri.report.html import Report
from potpourri.report.plots import confusion_matrix_png


def test_new_run_numbers_folders_and_writes_standard_files(tmp_path: Path) -> None:
    first, second = new_run("tune", root=tmp_path), new_run("tune", root=tmp_path)
    assert (first.path.name, second.path.name) == ("v0", "v1")
    first.write_config({"lr": 0.1, "path": tmp_path, "sizes": (1, 2)})
    first.write_env(seed=3)
    first.log_metrics({"epoch": 0, "loss": 1.5})
    first.log_metrics({"epoch": 1, "loss": 0.5})
    first.write_summary({"accuracy": np.float32(0.75)})
    with open(first.path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["loss"] for r in rows] == ["1.5", "0.5"]
    assert json.loads((first.path / "env.json").read_text())["seed"] == 3
    assert first.read_summary() == {"accuracy": 0.75}
    assert "sizes:\n- 1\n- 2" in (first.path / "config.yaml").read_text()


def test_explicit_out_folder(tmp_path: Path) -> None:
    assert new_run("demo", tmp_path / "mine").path == tmp_path / "mine"


def test_new_run_with_a_config_writes_config_and_env_at_once(tmp_path: Path) -> None:
    import yaml

    run = new_run("x", tmp_path / "r", config={"lr": 0.1, "name": "a"}, seed=3)
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == {"lr": 0.1, "name": "a"}
    assert json.loads((run.path / "env.json").read_text())["seed"] == 3
    assert not (new_run("x", tmp_path / "bare").path / "config.yaml").exists()


def test_environment_records_versions_and_threads() -> None:
    env = environment(seed=1)
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["seed"] == 1


def test_seed_everything_repeats_random_streams() -> None:
    seed_everything(5)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(5)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_report_links_pictures_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    png = confusion_matrix_png(np.array([[3, 1], [0, 4]]), ["good", "scratch"], tmp_path / "images" / "cm.png")
    report = Report("t <&>")
    report.section("Numbers", "a < b")
    report.table([{"metric": "accuracy", "value": 0.875}])
    report.image(png, "confusion")
    html = report.write(tmp_path / "report.html").read_text()
    assert 'src="images/cm.png"' in html and "<td>0.875</td>" in html
    assert "t &lt;&amp;&gt;" in html and "a &lt; b" in html  # text is escaped
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
