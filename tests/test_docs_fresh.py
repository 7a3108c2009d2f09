"""The docs cite only what exists: every ``benchmarks/*.py`` a doc names is a file, and every ``potpourri ...``
command in README and docs/ uses a real verb and only flags that verb accepts (hidden old spellings included)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from potpourri.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/results.md", "docs/datasets.md", "docs/architecture.md"]


def _commands(text: str) -> list[str]:
    """``potpourri ...`` commands: inline code spans, and lines of code blocks (comments cut)."""
    found = re.findall(r"`(?:\.venv/bin/)?(potpourri [^`]+)`", text)
    for line in text.splitlines():
        match = re.match(r"\s*(?:\.venv/bin/)?(potpourri [a-z].*)", line)
        if match:
            found.append(match.group(1).split("#")[0])
    return found


def stale_references(text: str, root: Path = ROOT) -> list[str]:
    """Every cited script that is missing, verb that does not exist or flag that its verb does not accept."""
    verbs = build_parser()._subparsers._group_actions[0].choices
    problems = [f"missing {path}" for path in re.findall(r"benchmarks/[\w/]+\.py", text) if not (root / path).is_file()]
    for command in _commands(text):
        try:
            tokens = shlex.split(command)
        except ValueError:  # an unbalanced quote in prose: not a command
            continue
        if len(tokens) < 2:
            continue
        if "/" in tokens[1]:  # "potpourri export/bench/auto-replace": a list of verbs
            problems += [f"unknown verb '{v}'" for v in tokens[1].split("/") if v not in verbs]
            continue
        if tokens[1] not in verbs:
            problems.append(f"unknown verb '{tokens[1]}' in `{command}`")
            continue
        parser = verbs[tokens[1]]
        nested = parser._subparsers._group_actions[0].choices if parser._subparsers is not None else {}
        if len(tokens) > 2 and tokens[2] in nested:
            parser = nested[tokens[2]]
        known = set(parser._option_string_actions)
        problems += [f"`{command}` uses unknown flag {t}" for t in tokens if t.startswith("--") and t not in known]
    return problems


def test_the_checker_finds_planted_stale_references(tmp_path: Path) -> None:
    planted = (
        "run `benchmarks/no_such_bench.py` then `potpourri tune --data d --no-such-flag 3`, and\n"
        "    potpourri frobnicate --x 1\n"
        "while `potpourri tune --data d --img-size 96` (a hidden old spelling) is fine"
    )
    problems = stale_references(planted, root=tmp_path)
    assert len(problems) == 3, problems
    assert any("no_such_bench" in p for p in problems) and any("--no-such-flag" in p for p in problems)
    assert any("frobnicate" in p for p in problems)


@pytest.mark.parametrize("doc", DOCS)
def test_docs_cite_only_existing_scripts_verbs_and_flags(doc: str) -> None:
    assert stale_references((ROOT / doc).read_text()) == []
