"""The kill-and-resume check every trainable kind runs: an uninterrupted run, a run SIGKILLed after step ``kill_at``
(``POTPOURRI_KILL_AT_STEP``, read by ``core.training.Trainer``), its resumption, and a bitwise comparison.

A job is ``"tests.<module>:<function>"`` called as ``function(out: str, resume: bool)``; it trains a tiny model into
``out`` with checkpoints and writes its final weights there. All runs use one thread; the killed run and its
resumption are fresh processes, the uninterrupted one runs in the test's own process (``in_process=True``: it only
has to be a correct reference, and a new interpreter costs seconds of imports).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import importlib
module, name = sys.argv[1].split(":")
getattr(importlib.import_module(module), name)(sys.argv[2], sys.argv[3] == "resume")
"""


def run_in_process(job: str, out: Path, mode: str) -> subprocess.CompletedProcess:
    """Run ``job`` here on one thread (restored afterwards); an exception becomes exit status 1 and its traceback."""
    if "POTPOURRI_KILL_AT_STEP" in os.environ:
        raise RuntimeError("POTPOURRI_KILL_AT_STEP is set in the test process")
    module, name = job.split(":")
    threads, err, code = torch.get_num_threads(), io.StringIO(), 0
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            getattr(importlib.import_module(module), name)(str(out), mode == "resume")
    except Exception:
        err.write(traceback.format_exc())
        code = 1
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([job, str(out), mode], code, "", err.getvalue())


def run_job(
    job: str, out: Path, mode: str, *, kill_at: int | None = None, in_process: bool = False
) -> subprocess.CompletedProcess:
    """Run ``job`` in a fresh one-thread process (``mode``: fresh | resume); with ``kill_at`` it SIGKILLs itself;
    ``in_process`` runs it in this process instead (no kill)."""
    if in_process:
        if kill_at is not None:
            raise ValueError("a job that kills itself needs its own process")
        return run_in_process(job, out, mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("POTPOURRI_KILL_AT_STEP", None)
    if kill_at is not None:
        env["POTPOURRI_KILL_AT_STEP"] = str(kill_at)
    code = SCRIPT.format(root=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, job, str(out), mode], env=env, capture_output=True, text=True)


def tensors_of(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the named safetensors files under ``folder``, keyed ``file/tensor``."""
    out = {}
    for name in names:
        for key, value in load_file(str(folder / name)).items():
            out[f"{name}/{key}"] = value
    return out


def assert_resumes_bitwise(job: str, tmp: Path, *, kill_at: int, outputs: list[str], checkpoints: str) -> None:
    """Uninterrupted vs killed-after-step-``kill_at``-then-resumed: the ``outputs`` files hold identical tensors.

    ``checkpoints`` is the checkpoint folder relative to the run folder; the killed run must have left a checkpoint
    from before ``kill_at`` (so the resumption really redoes lost steps) and none of the ``outputs``.
    """
    straight = run_job(job, tmp / "straight", "fresh", in_process=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_job(job, tmp / "killed", "fresh", kill_at=kill_at)
    assert killed.returncode == -9, f"not SIGKILLed (rc {killed.returncode}): {killed.stderr[-3000:]}"
    last = json.loads((tmp / "killed" / checkpoints / "last.json").read_text())
    assert 0 < last["step"] <= kill_at, last["step"]
    for name in outputs:
        assert not (tmp / "killed" / name).exists(), f"the killed run already wrote {name}"
    resumed = run_job(job, tmp / "killed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = tensors_of(tmp / "straight", outputs), tensors_of(tmp / "killed", outputs)
    assert set(got) == set(expected)
    different = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
