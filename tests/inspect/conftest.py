"""Fixtures of these tests: tiny planted inspection data (tests/planted.py), on one torch thread."""

from tests.planted import fitted, lite0, mvtec_folder, one_torch_thread, planted, small_config  # noqa: F401 (fixtures)
