"""Paired ours − anomalib differences over every seed found in ``benchmarks/anomalib_patchcore.py --out`` files.

Each argument is ``FILE[:VARIANT]``: the rows of one ``--out`` JSON and which of its variants is ours (default
``ours``; older files name today's default differently, e.g. ``no_pool``). A (set, seed) found in two files counts
once, and only if both files agree on its metrics (same code and seed: a determinism check); otherwise it is
refused. Prints one markdown row per set and metric (mean ± sample std over seeds of each method and of the paired
difference) and the mean over sets.

Example (issue 21, DS-Synth over six seeds):
    python benchmarks/anomalib_paired_table.py docs/data/anomalib_i21_dssynth.json:no_pool \
        docs/data/anomalib_i21_dssynth_s345.json docs/data/anomalib_i21_moon6.json
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def load_pairs(specs: list[str]) -> dict[str, dict[int, tuple[dict, dict]]]:
    """``{set: {seed: (anomalib metrics, our metrics)}}`` from ``FILE[:VARIANT]`` specs (a repeated seed must agree)."""
    pairs: dict[str, dict[int, tuple[dict, dict]]] = {}
    for spec in specs:
        path, _, variant = spec.partition(":")
        data = json.loads(Path(path).read_text())
        for row in data["rows"] if isinstance(data, dict) else data:
            name, seed = row["set"], int(row["seed"])
            pair = ({m: row["anomalib"][m] for m in METRICS}, {m: row[variant or "ours"][m] for m in METRICS})
            if pairs.get(name, {}).get(seed, pair) != pair:
                raise SystemExit(f"error: {name} seed {seed} has different metrics in two files")
            pairs.setdefault(name, {})[seed] = pair
    return pairs


def table(pairs: dict[str, dict[int, tuple[dict, dict]]]) -> str:
    """Markdown rows: per set and metric, both methods' mean ± std and the paired difference; then set means."""
    lines = ["| set (seeds) | metric | anomalib | ours | paired difference |", "|---|---|---|---|---|"]
    means: dict[str, list[tuple[float, float]]] = {}
    for name in sorted(pairs):
        for metric in METRICS:
            theirs = [a[metric] for a, _ in pairs[name].values()]
            ours = [o[metric] for _, o in pairs[name].values()]
            diff = [o - a for a, o in zip(theirs, ours, strict=True)]
            means.setdefault(metric, []).append((st.fmean(theirs), st.fmean(ours)))
            cells = [f"{st.fmean(v):.3f} ± {st.stdev(v):.3f}" for v in (theirs, ours)]
            cells.append(f"{st.fmean(diff):+.3f} ± {st.stdev(diff):.3f}")
            lines.append(f"| {name} ({len(diff)}) | {metric} | " + " | ".join(cells) + " |")
    for metric, values in means.items():
        a, o = st.fmean(x for x, _ in values), st.fmean(y for _, y in values)
        lines.append(f"| mean over sets | {metric} | {a:.3f} | {o:.3f} | {o - a:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the files; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="FILE[:VARIANT] (VARIANT: our variant's key in that file)")
    args = parser.parse_args(argv)
    print(table(load_pairs(args.files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
