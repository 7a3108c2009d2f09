"""``potpourri synth`` and ``potpourri corrupt`` through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from potpourri.cli import main
from potpourri.data.corruptions import corrupt
from potpourri.data.layouts import DefectSpectrum, MVTecAD


def test_synth_twice_gives_identical_hashes_and_readable_layouts(tmp_path, capsys) -> None:
    args = ["synth", "--seed", "0", "--size", "40", "--per-class", "1", "--categories", "moon", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "images/s" in capsys.readouterr().out
    first = json.loads((tmp_path / "a/manifest.json").read_text())
    second = json.loads((tmp_path / "b/manifest.json").read_text())
    assert first["files"] == second["files"] and first["seed"] == 0
    assert len(DefectSpectrum(tmp_path / "a/DS-Synth", "moon")) == 7
    assert len(MVTecAD(tmp_path / "a/MVTec-Synth", "moon", "train")) == 2


def test_synth_unknown_category_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path), "--categories", "bottle"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown DS-Synth category 'bottle'" in err and "brick" in err


def test_corrupt_writes_each_name_and_severity(write_png, tmp_path, rng) -> None:
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "in/x.png", image)
    assert main(["corrupt", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--name", "fog,contrast",
                 "--severity", "1,5", "--seed", "0"]) == 0  # fmt: skip
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["contrast/1/x.png", "contrast/5/x.png", "fog/1/x.png", "fog/5/x.png"]
    written_contrast = np.asarray(Image.open(tmp_path / "out/contrast/5/x.png"))
    np.testing.assert_array_equal(written_contrast, corrupt(image, "contrast", 5))
    assert main(["corrupt", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--severity", "9x"]) == 2
