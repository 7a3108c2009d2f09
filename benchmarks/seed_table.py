"""Mean ± std over seeds of values read from run folders' ``summary.json``: one markdown table, one row per arm.

Each arm is ``LABEL=RUN[,RUN...]`` (one run folder per seed); each ``--key`` is ``[HEADER=]PATH``, a dotted path into
``summary.json`` (integers index lists, ``-1`` the last stage) with an optional column header. Missing keys are
refused (exit 2), so a table never mixes runs of different shapes silently. The std is the sample std (n - 1), as
in every ``reproduce`` table.

Example (MiniGPT arms after their last stage):
    .venv/bin/python benchmarks/seed_table.py "MiniGPT-4=runs/vlm/mg4_s30_seed1,runs/vlm/mg4_s30_seed2" \
        --key "yes/no=stages.-1.model.yesno_acc" --key stages.-1.model.list_f1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from potpourri.core.results import mean_std


def lookup(summary: Any, path: str) -> float:
    """The number at a dotted ``path`` (list indices as integers) in a parsed ``summary.json``."""
    node = summary
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(path)
    if not isinstance(node, int | float):
        raise KeyError(path)
    return float(node)


def table(arms: dict[str, list[Path]], keys: list[str], per_seed: bool = True) -> str:
    """A markdown table: per arm, ``mean±std`` of each key over its runs (and the per-seed values)."""
    header = ["arm", "seeds", *(key.partition("=")[0] if "=" in key else key for key in keys)]
    paths = [key.partition("=")[2] if "=" in key else key for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in arms.items():
        summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
        cells = []
        for path in paths:
            values = [lookup(s, path) for s in summaries]
            shown = mean_std(values, sep=" ± ")
            cells.append(
                f"{shown} ({', '.join(f'{v:.3f}' for v in values)})" if per_seed and len(values) > 1 else shown
            )
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse ``LABEL=RUN,...`` arms and ``--key`` paths; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="LABEL=RUN[,RUN...] (one run folder per seed)")
    parser.add_argument(
        "--key", action="append", required=True, help="[HEADER=]dotted.path in summary.json (repeatable)"
    )
    parser.add_argument("--no-per-seed", action="store_true", help="only mean ± std, not each seed's value")
    args = parser.parse_args(argv)
    arms: dict[str, list[Path]] = {}
    for spec in args.arms:
        label, sep, runs = spec.partition("=")
        if not sep or not runs:
            parser.error(f"arm {spec!r}: expected LABEL=RUN[,RUN...]")
        arms[label] = [Path(r) for r in runs.split(",")]
        missing = [str(r) for r in arms[label] if not (r / "summary.json").is_file()]
        if missing:
            parser.error(f"no summary.json in {', '.join(missing)}")
    try:
        print(table(arms, args.key, per_seed=not args.no_per_seed))
    except (KeyError, IndexError, ValueError) as err:
        print(f"error: key {err} missing or not a number in one of the runs", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
