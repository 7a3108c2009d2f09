"""``tune --augment``: each training image under one of the 8 symmetries of the square, drawn from a generator the
trainer checkpoints, so an augmented run still resumes bitwise after a kill."""

from __future__ import annotations

import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, augment_batch, fit, train
from tests.resume import assert_resumes_bitwise
from tests.tune.tune_testkit import colour_data, tiny_model

pytestmark = pytest.mark.one_thread


def symmetries(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def test_every_augmented_image_is_a_symmetry_of_its_own_and_all_eight_occur():
    images = torch.arange(64 * 2 * 5 * 5, dtype=torch.float32).view(64, 2, 5, 5)  # all 8 symmetries distinct
    out = augment_batch(images, torch.Generator().manual_seed(0))
    seen = set()
    for x, y in zip(images, out, strict=True):
        match = [i for i, s in enumerate(symmetries(x)) if torch.equal(s, y)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))
    again = augment_batch(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(PotpourriError, match="square inputs"):
        augment_batch(torch.zeros(2, 3, 4, 5), torch.Generator())


def test_augment_cannot_use_cached_features():
    with pytest.raises(PotpourriError, match="cannot be combined with cache_features"):
        fit(tiny_model(), colour_data(16), strategy="linear", cache_features=True, augment=True, progress=False)


def augment_job(out: str, resume: bool) -> None:
    """Full fine-tuning with --augment, checkpoints every 2 steps (a kill-and-resume job)."""
    model = tiny_model()
    plan = get_strategy("full-adamw").prepare(model, lr=0.01)
    cfg = TuneConfig(epochs=2, batch_size=8, lr=0.01, augment=True, checkpoint_every=2, progress=False, device="cpu")
    train(model, colour_data(32), None, plan, cfg, run=out, resume=resume)


@pytest.mark.slow
def test_an_augmented_run_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise("tests.tune.test_augment:augment_job", tmp_path, kill_at=5,
                           outputs=["model.safetensors"], checkpoints="checkpoints")  # fmt: skip
