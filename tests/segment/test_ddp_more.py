"""More loops sharded across processes: Defect-Gen-lite (noise, timesteps, flips and crops drawn for the global batch;
defect pixels weighted by the global batch's mean weight), SLiMe one-shot (a class-weighted CE whose normaliser
counts every support image), SAM-CLIP distillation (a mixed batch whose sources split unevenly between processes;
sync BN) and AnomalyCLIP's prompt training (the glocal loss; a last batch too short to split): two gloo processes,
each on its slice of every batch, compute what one process does on the whole.

One ``torchrun --nproc_per_node 2`` launch runs the four jobs; the one-process references run in the test's process.
All four loops use Adam or AdamW, whose normalised steps turn the rounding of a near-zero gradient (a sum of two
halves vs one whole) into up to ±lr: the logged losses of the global batch are compared within 1e-5 and the weights
within 1e-3 (tests/core/test_ddp_loops.py measured 4.7e-4 between 1 and 2 threads of one process).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from potpourri.core.training import TrainOptions
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from potpourri.core.distributed import process_group
from tests.segment.test_ddp_more import anomalyclip_job, defectgen_job, oneshot_job, sam_clip_job
with process_group("cpu"):
    defectgen_job(sys.argv[1])
    oneshot_job(sys.argv[1])
    sam_clip_job(sys.argv[1])
    anomalyclip_job(sys.argv[1])
"""


def _main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def defectgen_job(out: str) -> None:
    """4 steps per net on batches of 4; flips, turns and 14 px crops for the local net; defect weight 5."""
    from potpourri.segment.defectgen import DefectGenLite
    from tests.segment.test_defectgen import planted, tiny_config

    images, masks = planted(6)
    gen = DefectGenLite(tiny_config(train_steps=4, local_crop=14, lr=1e-2))
    gen.fit(images, masks, options=TrainOptions(device="cpu", progress=False, checkpoint_every=3),
            checkpoints=Path(out) / "defectgen")  # fmt: skip
    if _main():
        history = torch.tensor([row["loss"] for row in gen.history], dtype=torch.float64)
        save_file({**gen.state_tensors(), "history": history}, f"{out}/defectgen.safetensors")


def oneshot_supports() -> tuple[list, list]:
    """4 support images whose rectangles differ in size, so the slices' class-weight totals differ."""
    from tests.segment.test_oneshot import planted_image

    pairs = [planted_image(seed) for seed in range(4)]
    return [image for image, _ in pairs], [mask for _, mask in pairs]


def oneshot_job(out: str) -> None:
    """SLiMe embeddings from 4 support images (Adam), 6 steps."""
    from potpourri.segment.oneshot import DenseFeatureSource, OneShotSegmenter
    from tests.segment.test_oneshot import ColourFeatures, _config

    images, masks = oneshot_supports()
    model = OneShotSegmenter(_config(steps=6), source=DenseFeatureSource(ColourFeatures(), temperature=0.1))
    model.fit(images, masks, options=TrainOptions(device="cpu", progress=False))
    if _main():
        history = torch.tensor([[row[k] for k in ("loss", "ce", "was")] for row in model.history], dtype=torch.float64)
        save_file({"embeddings": model.embeddings, "history": history}, f"{out}/oneshot.safetensors")


def sam_clip_job(out: str) -> None:
    """4 steps of the tiny student on batches of 1 SAM + 3 CLIP rows (AdamW): rank 1 sees no SAM row; sync BN."""
    from potpourri.segment.sam_clip import PARTS, StageConfig, build_student, train_stage
    from tests.segment.test_sam_clip import tiny_data

    data = tiny_data(8)
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    stage = StageConfig("both", PARTS, {"sam": 0.25, "clip": 0.75}, steps=4, batch_size=4, lr=1e-2)
    losses = train_stage(student, data, stage, options=TrainOptions(device="cpu", progress=False, sync_bn=True))
    if _main():
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file({**state, "losses": torch.tensor(losses, dtype=torch.float64)}, f"{out}/sam_clip.safetensors")


def anomalyclip_job(out: str) -> None:
    """2 epochs of prompt training on 5 planted images in batches of 4 (split) and 1 (too short: whole everywhere);
    under torchrun each process embeds one of the 2 batches of frozen features and gets the other's."""
    from potpourri.inspect.anomalyclip import ClipTowers, build_clip_from_config, train_prompts
    from tests.inspect.test_anomalyclip import TINY, planted

    torch.manual_seed(0)
    towers = ClipTowers(copy.deepcopy(build_clip_from_config(TINY)), n_ctx=12, depth=3, deep_length=4)
    images, masks, labels = planted(5)
    history = train_prompts(towers, images, masks, labels, epochs=2, batch_size=4, lr=3e-3)
    if _main():
        logged = torch.tensor([[row[k] for k in ("loss", "local", "image")] for row in history], dtype=torch.float64)
        prompts = {f"trainable.{i}": p.detach().contiguous() for i, p in enumerate(towers.trainable)}
        save_file({**prompts, "history": logged}, f"{out}/anomalyclip.safetensors")


# ----------------------------------------------------------------------------------------------- normalisers
def test_sharded_defect_weighted_loss_adds_up_to_the_whole_batch_and_the_naive_one_does_not() -> None:
    """Each slice divided by the global batch's mean weight (what the loop does under torchrun) averages to the whole
    batch's loss; each divided by its own mean weight does not (the slices hold different defect areas)."""
    from potpourri.segment.defectgen import DefectGenLite
    from tests.segment.test_defectgen import planted, tiny_config

    images, masks = planted(4)
    masks[1] = 0  # slice [1, 3] holds one defect, slice [0, 2] two: their mean weights differ
    gen = DefectGenLite(tiny_config())
    x0 = gen.prepare(images, masks)[0]
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(1, 100, (4,), generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        whole = gen.x0_loss("global", x0, t, noise)
        mean_weight = gen.defect_weights(x0).mean()
        slices = [[0, 2], [1, 3]]
        sharded = sum(gen.x0_loss("global", x0[s], t[s], noise[s], weight_mean=mean_weight) for s in slices) / 2
        naive = sum(gen.x0_loss("global", x0[s], t[s], noise[s]) for s in slices) / 2
    torch.testing.assert_close(sharded, whole, rtol=1e-6, atol=0)
    assert abs(float(naive - whole)) > 1e-3 * float(whole)


def test_sharded_class_weighted_ce_adds_up_to_the_whole_batch_and_the_naive_one_does_not() -> None:
    """SLiMe's class-weighted CE: the weighted sum of a slice over the global Σ weights[targets] (per process)
    averages to the whole batch's CE; each slice's own weighted mean does not."""
    import torch.nn.functional as F

    from potpourri.segment.features import AttentionMaps
    from potpourri.segment.oneshot import OneShotSegmenter

    g = torch.Generator().manual_seed(0)
    targets = torch.zeros(4, 8, 8, dtype=torch.long)
    targets[0, :2], targets[1, :5], targets[2, :, :3], targets[3, 4:, 4:] = 1, 2, 1, 2  # uneven class areas
    logits = torch.randn(4, 3, 8, 8, generator=g)
    self_attention = torch.softmax(torch.randn(4, 64, 64, generator=g), -1)
    model = OneShotSegmenter()
    model.class_ids = [0, 1, 2]
    weights = model._class_weights(targets)
    whole = model.loss(AttentionMaps(logits, logits.softmax(1), self_attention), targets, weights)["loss"]
    normaliser = weights[targets].sum() / 2
    sharded, naive = 0.0, 0.0
    for s in ([0, 2], [1, 3]):
        maps = AttentionMaps(logits[s], logits[s].softmax(1), self_attention[s])
        sharded = sharded + model.loss(maps, targets[s], weights, share=1.0, ce_normaliser=normaliser)["loss"] / 2
        naive = naive + model.loss(maps, targets[s], weights)["loss"] / 2
    torch.testing.assert_close(sharded, whole, rtol=1e-6, atol=0)
    ce = F.cross_entropy(logits, targets, weight=weights)  # the naive error is in the CE term only
    assert abs(float(naive - whole)) > 1e-3 * float(ce)


def test_sd_source_rows_are_the_whole_batch_sliced_and_draw_the_whole_batch_noise() -> None:
    """SLiMe's SD source on a process's rows: the maps of those rows of the whole batch, the generator moved as for
    the whole batch, and the noise losses of two halves average to the whole batch's."""
    pytest.importorskip("diffusers")
    from tests.segment.test_oneshot import tiny_sd_source

    source = tiny_sd_source()
    prepared = source.prepare(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    tokens = source.init_tokens(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole_generator = torch.Generator().manual_seed(5)
        whole = source.attend(prepared, tokens, train=True, generator=whole_generator)
        halves = []
        for rows in ([0, 2], [1, 3]):
            generator = torch.Generator().manual_seed(5)
            halves.append(source.attend(prepared, tokens, train=True, generator=generator, rows=rows))
            assert torch.equal(generator.get_state(), whole_generator.get_state())
            torch.testing.assert_close(halves[-1].cross_logits, whole.cross_logits[rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(halves[-1].self_attention, whole.self_attention[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((halves[0].aux_loss + halves[1].aux_loss) / 2, whole.aux_loss, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- torchrun
def _compare(one: dict, two: dict, logged: str, name: str, skip: tuple[str, ...] = ()) -> None:
    assert set(one) == set(two), name
    first, last = one[logged][0], one[logged][-1]
    assert not torch.allclose(first, last), f"{name}: it did not learn, the comparison would be of idle runs"
    torch.testing.assert_close(two.pop(logged), one.pop(logged), rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")
    for key, value in one.items():
        if key in skip:
            continue
        if value.is_floating_point():
            torch.testing.assert_close(two[key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"{name} {key}: {m}")
        else:
            assert torch.equal(two[key], value), f"{name} {key}"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_defectgen_oneshot_sam_clip_and_anomalyclip_as_one(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    two = tmp_path / "two"
    two.mkdir()
    done = standalone(script, two)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    one = tmp_path / "one"
    one.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        defectgen_job(str(one))
        oneshot_job(str(one))
        sam_clip_job(str(one))
        anomalyclip_job(str(one))
    finally:
        torch.set_num_threads(threads)
    for name, logged in (("defectgen", "history"), ("oneshot", "history"), ("anomalyclip", "history")):
        _compare(load_file(str(one / f"{name}.safetensors")), load_file(str(two / f"{name}.safetensors")), logged, name)
    # the student's convolutions feed BatchNorm, which removes their bias: its gradient is zero up to rounding, and
    # AdamW turns that rounding into steps of ±lr, so those biases are left out, and the running means that carry
    # them (the running variances, shift-free, are compared; the losses show that BatchNorm used the global batch)
    skip = tuple(f"backbone.{i}.bias" for i in (0, 3, 6, 9)) + tuple(
        f"backbone.{i}.running_mean" for i in (1, 4, 7, 10)
    )
    one_student, two_student = (
        load_file(str(one / "sam_clip.safetensors")),
        load_file(str(two / "sam_clip.safetensors")),
    )
    _compare(one_student, two_student, "losses", "sam_clip", skip=skip)
