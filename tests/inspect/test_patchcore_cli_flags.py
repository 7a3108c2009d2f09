"""``inspect fit``'s PatchCore flags reach the config; their defaults are the config's own."""

from __future__ import annotations

import argparse

from potpourri.cli import build_parser
from potpourri.inspect.patchcore import PatchCoreConfig, config_from_args


def _fit_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["inspect", "fit", "--data", "ds-synth:brick", *extra])


def test_defaults_are_the_config_defaults() -> None:
    assert config_from_args(_fit_args()) == PatchCoreConfig(layers=())


def test_flags_reach_the_config_and_zero_means_none() -> None:
    cfg = config_from_args(_fit_args("--embed-dim", "128", "--projection-dim", "0", "--num-neighbors", "1",
                                     "--sigma", "0", "--map-upsample", "nearest", "--bank-dtype", "float32",
                                     "--coreset-max-patches", "0"))  # fmt: skip
    assert (cfg.embed_dim, cfg.projection_dim, cfg.num_neighbors, cfg.sigma) == (128, None, 1, 0.0)
    assert (cfg.map_upsample, cfg.bank_dtype, cfg.coreset_max_patches) == ("nearest", "float32", None)
