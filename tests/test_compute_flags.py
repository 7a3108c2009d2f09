"""``--device`` and ``--precision`` exist on every verb that computes (one helper: ``cli.flags.add_compute``), and a
CUDA device on a machine without one is refused at parse time in one line, before anything is written."""

from __future__ import annotations

import argparse

import pytest
import torch

from potpourri.cli import build_parser, main

# verbs that run no model, or whose point is the CPU (each with the reason)
EXEMPT = {
    "list": "reads the registry",
    "info": "reads the registry",
    "fetch": "converts weight files",
    "synth": "generates images with NumPy",
    "corrupt": "applies NumPy corruptions",
    "export": "ONNX export with an ONNX Runtime CPU parity check",
    "bench": "CPU latency by backend (--backend, --threads)",
    "auto-replace": "a search driven by CPU latency",
    "merge-tasks": "a parity check of two forward passes",
}


def leaf_verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix.strip(): parser}
    out = {}
    for name, child in subs[0].choices.items():
        out.update(leaf_verbs(child, f"{prefix} {name}"))
    return out


VERBS = leaf_verbs(build_parser())


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_the_exemptions_name_real_verbs():
    assert set(EXEMPT) <= set(VERBS)


@pytest.mark.parametrize("verb", sorted(set(VERBS) - set(EXEMPT)))
def test_every_computing_verb_has_device_and_precision(verb):
    assert {"--device", "--precision"} <= options(VERBS[verb]), f"`potpourri {verb}` lacks --device/--precision"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("verb", sorted(set(VERBS) - set(EXEMPT)))
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(verb, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*verb.split(), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err, err
    assert list(tmp_path.iterdir()) == []
