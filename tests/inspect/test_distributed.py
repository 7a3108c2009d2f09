"""PatchCore and ``inspect predict`` under torchrun (2 gloo processes on the CPU, as two "machines": two launches
with ``--nnodes 2`` on this host) against one process.

One torchrun job does the distributed work (a PatchCore fit over slices that cut images in half, ``inspect fit``
and ``inspect predict`` through the CLI); the test process computes the one-process answers and compares.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.planted import make_planted
from tests.torchrun import job_env

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # an 8 x 8 patch grid: 64 rows per image
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in"),
]

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.inspect.test_distributed import {job}
{job}(*sys.argv[1:])
"""


def sliced_patchcore():
    """A seeded random Lite0 PatchCore whose 100-row coreset slices cut through images and batches."""
    from potpourri import create_model
    from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

    torch.manual_seed(0)
    config = PatchCoreConfig(image_size=SIZE, coreset_ratio=0.25, coreset_max_patches=100, batch_size=4, seed=3)
    return PatchCore(config, backbone=create_model("efficientnet_lite0", pretrained=False).eval())


def fit_job(out: str, data: str, images: str) -> None:
    """Under torchrun: the sliced PatchCore bank, then ``inspect fit`` and ``inspect predict`` by the CLI."""
    from potpourri.cli import main
    from potpourri.core.distributed import process_group

    # one group for the three steps: the verbs reuse it, so rank 1 waits in predict while rank 0 still evaluates
    with process_group("cpu") as group:
        bank = sliced_patchcore().fit(make_planted(n_train=10).train).memory_bank
        if group.is_main:
            save_file({"bank": bank}, f"{out}/bank.safetensors")
        assert main(["inspect", "fit", "--data", data, "--out", f"{out}/run", "--image-size", str(SIZE),
                     "--coreset-ratio", "0.5", "--threads", "1"]) == 0  # fmt: skip
        predict_job(f"{out}/run", images, f"{out}/two")


def predict_job(run: str, images: str, out: str) -> None:
    from potpourri.cli import main

    assert main(["inspect", "predict", "--run", run, images, "--out", out, "--no-progress", "--top-k", "1"]) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def torchrun(tmp: Path, job: str, *args: str) -> list[subprocess.CompletedProcess]:
    """``job`` as a two-machine torchrun job: two launches on this host with ``--nnodes 2``, one process each."""
    script = tmp / f"{job}.py"
    script.write_text(SCRIPT.format(root=str(ROOT), job=job))
    env = job_env(HF_HUB_OFFLINE="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{free_port()}", f"--rdzv_id={tmp.name}"]  # fmt: skip
    nodes = [subprocess.Popen([*launcher, str(script), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=150)
            done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    finally:
        for node in nodes:
            if node.poll() is None:  # a hung job: leave no process behind
                node.kill()
                node.wait()
    return done


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, mvtec_folder: Path) -> Path:
    """The torchrun job's folder: bank.safetensors, run/ (inspect fit), two/ (inspect predict)."""
    tmp = tmp_path_factory.mktemp("two_processes")
    images = tmp / "images"
    images.mkdir()
    sources = sorted(mvtec_folder.glob("test/*/*.png"))
    for i in range(11):  # 11 images, batches of 4: blocks of 6 and 5 images, short last batches
        Image.open(sources[i % len(sources)]).rotate(90 * (i // len(sources))).save(images / f"{i:02d}.png")
    for node in torchrun(tmp, "fit_job", str(tmp), str(mvtec_folder), str(images)):
        assert node.returncode == 0, node.stderr[-3000:]
    return tmp


def test_two_process_bank_equals_the_one_process_partitioned_coreset_row_for_row(two: Path) -> None:
    one = sliced_patchcore().fit(make_planted(n_train=10).train).memory_bank  # 640 rows in 7 slices of 91-92
    bank = load_file(str(two / "bank.safetensors"))["bank"]
    assert bank.shape == (7 * 23, 152)  # ceil(0.25 * 91) = ceil(0.25 * 92) = 23 rows kept per slice
    assert torch.equal(bank, one)


def test_the_fitted_run_records_two_processes_and_only_rank_0_wrote(two: Path) -> None:
    summary = json.loads((two / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("run")) == ["run"]


def test_two_process_predictions_csv_equals_one_process_csv(two: Path, tmp_path: Path) -> None:
    predict_job(str(two / "run"), str(two / "images"), str(tmp_path / "one"))
    assert (two / "two" / "predictions.csv").read_text() == (tmp_path / "one" / "predictions.csv").read_text()
    assert len((two / "two" / "predictions.csv").read_text().splitlines()) == 12
    assert not list((two / "two").glob("predictions.part*"))  # merged, then the parts went
