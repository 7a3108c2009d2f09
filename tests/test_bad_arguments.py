"""Every verb refuses bad arguments before any work: exit code 2, one line naming the flag, no traceback, no run.

Each case runs the CLI's ``main(argv)`` in-process from an empty folder, so a default ``runs/`` folder would show up
there if a run were created.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from potpourri.cli import main

MISSING = "no/such/folder"
CASES = [
    # (argv, text the one line must contain)
    (["predict", "efficientnet_lite0", "x.png", "--topk", "0"], "--topk"),
    (["predict", "efficientnet_lite0", "x.png", "--weights", MISSING], "does not exist"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--threads", "two"], "not an integer"),
    (["reproduce", "no-such-paper", "--quick"], "invalid choice"),
    (["reproduce", "smr", "--threads", "-2"], "--threads"),
    (["synth", "--out", "ds", "--image-size", "8"], "at least 16 pixels"),
    (["synth", "--out", "ds", "--per-class", "0"], "--per-class"),
    (["synth", "--out", "ds", "--severity", "1.5"], "--severity"),
    (["corrupt", "x.png", "--out", "c", "--seed", "-3"], "--seed"),
    (["tune", "--data", "ds-synth:classification", "--epochs", "-1"], "--epochs"),
    (["tune", "--data", "ds-synth:classification", "--batch-size", "0"], "--batch-size"),
    (["tune", "--data", "ds-synth:classification", "--lr", "0"], "--lr"),
    (["tune", "--data", "ds-synth:classification", "--lr", "nan"], "--lr"),
    (["tune", "--data", "ds-synth:classification", "--img-size", "7"], "--img-size"),
    (["tune", "--data", "ds-synth:classification", "--label-smoothing", "1.5"], "--label-smoothing"),
    (["tune", "--data", "ds-synth:classification", "--workers", "-1"], "--workers"),
    (["tune", "--data", "ds-synth:classification", "--strategy", "lnear"], "lnear"),
    (["select-layers", "--data", "ds-synth:classification", "--folds", "0"], "--folds"),
    (["merge-tasks", "a=b", "--image-size", "3"], "--image-size"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--image-size", "7"], "--image-size"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--coreset-ratio", "2"], "--coreset-ratio"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--coreset-ratio", "0"], "--coreset-ratio"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--k-shot", "0"], "--k-shot"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--embed-dim", "0"], "--embed-dim"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--sigma", "-1"], "--sigma"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--map-upsample", "cubic"], "--map-upsample"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--bank-dtype", "int8"], "--bank-dtype"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--val-fraction", "-0.1"], "--val-fraction"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--method", "padim"], "invalid choice"),
    (["inspect", "predict", "x.png"], "--run"),
    (["inspect", "segment-train", "--data", "ds-synth:brick", "--steps", "0"], "--steps"),
    (["inspect", "segment-train", "--data", "ds-synth:brick", "--epochs", "-2"], "--epochs"),
    (["inspect", "oneshot", "q.png", "--steps", "0"], "--steps"),
    (["export", "efficientnet_lite0", "--image-size", "2"], "--image-size"),
    (["export", "efficientnet_lite0", "--weights", MISSING], "does not exist"),
    (["bench", "efficientnet_lite0", "--rounds", "0"], "--rounds"),
    (["bench", "efficientnet_lite0", "--batch", "0"], "--batch"),
    (["bench", "efficentmod_xxs", "--roofline"], "did you mean 'efficientmod_xxs'"),
    (["bench", "efficientmod_xxs", "--allocator", "tcmalloc"], "invalid choice"),
    (["bench", "efficientmod_xxs", "--backend", "tensorrt"], "invalid choice"),
    (["bench", "efficientmod_xxs", "--roofline", "--per-layer", "0"], "--per-layer"),
    (["bench", "efficientmod_xxs", "--threads", "0"], "--threads"),
    (["auto-replace", "deit_tiny_patch16_224", "--speedup", "-1"], "--speedup"),
    (["vlm", "train", "--steps", "-5"], "--steps"),
    (["vlm", "train", "--batch-size", "0"], "--batch-size"),
    (["vlm", "train", "--lora-rank", "0"], "--lora-rank"),
    (["vlm", "eval", "--n-test", "0", "--run", "r"], "--n-test"),
    (["vlm", "baseline", "--seg-steps", "0"], "--seg-steps"),
    (["detect", "train", "--data", "ds-synth:brick", "--epochs", "0"], "--epochs"),
    (["detect", "train", "--data", "ds-synth:brick", "--image-size", "4"], "--image-size"),
    (["detect", "train", "--data", "ds-synth:brick", "--assigner", "simota"], "invalid choice"),
    (["detect", "predict", "--run", "r", "x.png", "--conf", "1.5"], "--conf"),
    (["detect", "eval", "--data", "ds-synth:brick"], "--run"),
    (["detect", "mask-train", "--run", "r", "--data", "ds-synth:brick", "--steps", "0"], "--steps"),
    (["annotate", "x.png", "--out", "m.png", "--class-id", "0"], "--class-id"),
    (["sam-train", "--steps", "0"], "--steps"),
    (["ssprompt", "--sam-steps", "-1"], "--sam-steps"),
    (["sam-clip", "--rehearsal", "2"], "--rehearsal"),
    (["sam-clip", "--held-out", "marble"], "--held-out"),
    (["sam-clip", "--clip", MISSING], "--clip"),
    (["sam-clip", "--teacher-b", "bert"], "invalid choice"),
    (["chat", "x.png", "--run", MISSING, "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["serve", "--run", MISSING], "does not exist"),
    (["serve", "--run", ".", "--port", "0"], "--port"),
    (["tune", "--data", "ds-synth:classification", "--device", "tpu"], "--device"),
    (["tune", "--data", "ds-synth:classification", "--precision", "fp8"], "--precision"),
    (["tune", "--data", "ds-synth:classification", "--config", MISSING], "--config"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--layers", "2,-1"], "--layers"),
    (["inspect", "fit", "--data", "ds-synth:brick", "--layers", "a,b"], "--layers"),
    (["inspect", "predict", "--run", "r", "x.png", "--top-k", "-1"], "--top-k"),
    (["predict", "x.png", "--run", MISSING], "does not exist"),
    (["export", "--run", MISSING], "does not exist"),
    (["serve", "--run", ".", "--max-megapixels", "0"], "--max-megapixels"),
]


def test_cases_cover_every_verb() -> None:
    from potpourri.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices) - {"list", "info", "fetch"}  # no numbers
    covered = {argv[0] for argv, _ in CASES}
    assert verbs <= covered, verbs - covered
    assert len(CASES) >= 40


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_argument_is_one_line_and_writes_nothing(argv, needle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("potpourri: error:"), err
    assert "Traceback" not in err and needle in lines[0]
    assert list(Path(tmp_path).iterdir()) == []  # no run folder, no output file
