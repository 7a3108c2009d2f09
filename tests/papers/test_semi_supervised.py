"""Semi- vs self-supervised harness: NT-Xent against its formula, the FixMatch mask and pseudo-labels, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.papers.semi_supervised import (
    SemiSupConfig,
    fixmatch_loss,
    fixmatch_targets,
    nt_xent,
    reproduce_semisup,
    strong_augment,
    summarise,
    train_fixmatch,
    train_simclr,
    weak_augment,
)

pytestmark = pytest.mark.one_thread  # moved out of a one-thread folder: keep its thread count (tests/conftest.py)


def _nt_xent_loops(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """The SimCLR paper's l(i, j) written as loops: -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), averaged over 2N."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        cos = [float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) for k in range(n2)]
        denominator = sum(math.exp(cos[k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(cos[j] / tau) / denominator)
    return total / n2


def test_nt_xent_hand_case() -> None:
    # two pairs of identical unit vectors, the pairs orthogonal: every view has cos 1 to its positive, 0 to the rest
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])  # scale must not matter (cosine)
    tau = 0.5
    loss = nt_xent(torch.stack([e1, e2]), torch.stack([2 * e1, e2]), tau)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0.0)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_matches_the_loop_formula_on_random_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for tau in (0.1, 0.5, 1.0):
        assert nt_xent(z1, z2, tau).item() == pytest.approx(_nt_xent_loops(z1, z2, tau), rel=1e-5)
    with pytest.raises(PotpourriError):
        nt_xent(z1, z2[:3], 0.5)


def test_fixmatch_mask_is_exactly_max_probability_at_least_threshold() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 5, generator=g) * 3
    probs = logits.softmax(1)
    tau = float(probs.max(1).values[7])  # a threshold equal to one sample's confidence: that sample must be kept
    pseudo, mask = fixmatch_targets(logits, tau)
    assert mask[7]
    assert torch.equal(mask, probs.max(1).values >= tau)
    assert torch.equal(pseudo, probs.argmax(1))
    assert 0 < mask.sum() < 200


def test_pseudo_label_comes_from_the_weak_view_and_carries_no_gradient() -> None:
    weak = torch.tensor([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    strong = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
    labelled, labels = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    loss, stats = fixmatch_loss(labelled, labels, weak, strong, threshold=0.9, lambda_u=2.0)
    # rows 0 and 1 are confident with weak argmax 2 and 0; row 2 (p_max ~ 0.36) is masked out; mean over all 3 rows
    ce = F.cross_entropy(strong[:2], torch.tensor([2, 0]), reduction="sum") / 3
    expected = F.cross_entropy(labelled, labels) + 2.0 * ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["mask_rate"] == pytest.approx(2 / 3)
    loss.backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0  # the target is a constant
    assert torch.count_nonzero(strong.grad[2]) == 0 and torch.count_nonzero(strong.grad[0]) > 0


def test_augmentations_are_seeded_and_keep_range_and_shape() -> None:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for augment in (weak_augment, strong_augment):
        a = augment(x, torch.Generator().manual_seed(3))
        b = augment(x, torch.Generator().manual_seed(3))
        assert a.shape == x.shape and torch.equal(a, b)
        assert a.min() >= 0 and a.max() <= 1
        assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))
    # the weak view is a flip + shift: its pixel values are a permutation-with-repeats of the input's
    w = weak_augment(x, torch.Generator().manual_seed(5))
    assert set(w[0].flatten().tolist()) <= set(x[0].flatten().tolist())


class _Planted(nn.Module):
    """A linear classifier over 2-D points; ``forward_features`` for SimCLR."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 8)
        self.head = nn.Linear(8, 2)
        self.num_features = 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.4 + torch.stack([(2 * y - 1) * 2.0, torch.zeros(n)], 1)
    return x, y


def test_fixmatch_and_simclr_losses_decrease_on_a_planted_separable_problem() -> None:
    torch.manual_seed(0)
    x_l, y_l = _blobs(4, 0)
    x_u, y_u = _blobs(200, 1)

    def jitter(scale: float):
        return lambda x, g: x + scale * torch.randn(x.shape, generator=g)

    model = _Planted()
    history = train_fixmatch(
        model,
        x_l,
        y_l,
        x_u,
        steps=150,
        batch_size=4,
        mu=8,
        threshold=0.9,
        lr=0.05,
        weak=jitter(0.05),
        strong=jitter(0.3),
    )
    first = sum(h["loss_x"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < 0.5 * first
    assert history[-1]["mask_rate"] > 0.9  # the unlabelled blobs became confident
    assert (model(x_u).argmax(1) == y_u).float().mean() > 0.95

    losses = train_simclr(_Planted(), x_u, steps=100, batch_size=32, temperature=0.5, lr=0.05, augment=jitter(0.1))
    assert sum(losses[-10:]) < sum(losses[:10])


def test_summary_pairs_deltas_by_seed() -> None:
    def row(arm, seed, acc):
        return {"arm": arm, "seed": seed, "clean_acc": acc, "corrupt_acc": acc / 2, "seconds": 1.0}

    rows = [row("supervised", 0, 0.4), row("supervised", 1, 0.6), row("fixmatch", 0, 0.6), row("fixmatch", 1, 0.6)]
    table = {e["arm"]: e for e in summarise(rows, ("supervised", "fixmatch", "simclr"))}
    assert table["fixmatch"]["clean_acc_delta"] == "+0.100" and table["fixmatch"]["corrupt_acc_delta"] == "+0.050"
    assert table["supervised"]["clean_acc"] == "0.500±0.141" and "simclr" not in table


@pytest.mark.slow
def test_smoke_run_writes_a_table_with_every_arm(tmp_path) -> None:
    cfg = SemiSupConfig().quick()
    cfg.n_unlabelled, cfg.n_test, cfg.steps = 40, 20, 4
    run = reproduce_semisup(cfg, out=str(tmp_path / "run"))
    text = (run.path / "results.md").read_text()
    for arm in ("supervised", "fixmatch", "fixmatch-lowtau", "simclr"):
        assert f"| {arm} |" in text
    assert (run.path / "report.html").exists() and (run.path / "summary.json").exists()
