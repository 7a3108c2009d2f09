"""Launch a test's job under torchrun on this host: a fresh job's environment, one thread per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# torchrun sets these for its workers; one left over from an outer job (or a kill from a resume test) must not leak in
_JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "POTPOURRI_KILL_AT_STEP")


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's and the kill variables, one thread per process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def standalone(
    script: str | Path, *args: str | Path, nproc: int = 2, timeout: float = 300, **extra_env: str
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC script args`` on this host; output captured as bytes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, str(script), *map(str, args)], env=job_env(**extra_env), capture_output=True,
                          timeout=timeout)  # fmt: skip
