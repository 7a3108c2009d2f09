"""Run the CLI's ``main(argv)`` in the test process as the console script would, without a new interpreter."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path


def run_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``main(args)`` from ``cwd``: stdout, stderr and the exit status as a subprocess would give them; torch's thread
    count, the environment and the working folder are restored afterwards."""
    import torch

    from potpourri.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads, environ, here = torch.get_num_threads(), dict(os.environ), Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help and usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
