"""A fitted PatchCore exports whole (search in the graph) and runs without torch: ONNX Runtime and OpenVINO (f32)
scores equal eager within a relative 1e-4, with the same verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from potpourri.cli import main
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig
from potpourri.inspect.patchcore_graph import PatchCoreGraph

pytestmark = pytest.mark.one_thread
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(("upsample", "embed_dim"), [("bilinear", 152), ("nearest", 152), ("bilinear", 128)])
def test_the_graph_module_equals_the_method(planted, small_config, lite0, upsample, embed_dim):
    config = PatchCoreConfig(**{**vars(small_config), "map_upsample": upsample, "embed_dim": embed_dim})
    method = PatchCore(config, backbone=lite0).fit(planted.train)
    scores, maps = method.score(planted.test)
    x = torch.stack([method._tensor(i) for i in planted.test])
    with torch.no_grad():
        g_scores, g_maps = PatchCoreGraph(method)(x)
    assert np.allclose(g_scores.numpy(), scores, rtol=1e-5, atol=1e-6)
    assert np.allclose(g_maps.numpy(), maps, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def exported(mvtec_folder, tmp_path_factory):
    """An `inspect fit` run on the planted folder and its `export --run` bundle."""
    tmp = tmp_path_factory.mktemp("export")
    run = tmp / "run"
    fit = ["inspect", "fit", "--data", str(mvtec_folder), "--image-size", "64", "--coreset-ratio", "0.5"]
    assert main([*fit, "--out", str(run), "--threads", "1"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp / "export")]) == 0
    return run, tmp / "export" / "bundle"


def test_export_run_bundle_matches_eager_in_onnxruntime_and_openvino(exported):
    _, bundle = exported
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["nearest_neighbour_search"].startswith("in the graph") and meta["thresholds"]["image"] is not None
    import importlib.util
    import os

    if os.environ.get("CI") or importlib.util.find_spec("openvino"):  # CI installs the dev extra: never skip there
        assert "openvino" in meta["parity"], "OpenVINO parity was not measured"
    backends = ["onnxruntime"] + (["openvino"] if "openvino" in meta["parity"] else [])
    for backend in backends:
        parity = meta["parity"][backend]
        assert parity["score_rel_diff"] <= 1e-4 and parity["map_rel_diff"] <= 1e-4, (backend, parity)
        assert parity["same_verdicts"] is True


def test_the_bundle_runs_without_torch(exported, mvtec_folder):
    run, bundle = exported
    images = sorted(str(p) for p in (mvtec_folder / "test").glob("*/*.png"))
    code = (
        "import sys, json; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]);"
        "from inspect_runtime import Inspector;"
        "r = Inspector(sys.argv[1]).predict(sys.argv[2:]);"
        "print(json.dumps([[x['score'], x['label'], x['normalised']] for x in r]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bundle), *images], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    from potpourri.inspect.base import load_method

    expected = load_method(run).predict(images)
    assert [label for _, label, _ in got] == [r.label for r in expected]
    assert np.allclose([s for s, _, _ in got], [r.score for r in expected], rtol=1e-4)
    assert np.allclose([n for _, _, n in got], [r.normalised for r in expected], atol=1e-4)
