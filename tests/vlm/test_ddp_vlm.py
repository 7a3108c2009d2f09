"""The vision-language loops sharded across processes: two gloo processes, each on its slice ``batch[rank::world]`` of
every batch, compute what one process does on the whole batch.

* the differentiable all-gather (``Trainer.unshard``): a contrastive loss on gathered embeddings has one process's
  gradients once the trainer averages them, on a batch the processes split unequally (4 + 3 rows);
* the contrastive loops (CLIP, the All-Seeing region-text head): negatives of the whole batch;
* the token losses (the MiniGPT-v2-style VLM, the SEED image writer): normalised by the global batch's token count;
* the SEED tokenizer (codebook usage, EMA sums, dead-code restarts of the global batch) and the V2L tokenizer.

One ``torchrun --nproc_per_node 2`` launch runs every job; the one-process references run in the test's process.
A fast test checks ``Trainer.unshard``'s order and gradient routing on a stand-in group (rank 1 of 3).
Every loop here steps with AdamW (none lets the test choose): losses are compared within 1e-5, weights within 1e-3,
since AdamW divides by sqrt(v) and turns the rounding of a near-zero gradient (two halves summed vs one whole) into a
step of up to ±lr (tests/core/test_ddp_loops.py measures it).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from potpourri.core.distributed import ProcessGroup
from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
JOBS = ("gather", "clip", "head", "vlm", "writer", "tokenizer", "tokenizer_text", "v2l")
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from potpourri.core.distributed import process_group
from tests.vlm import test_ddp_vlm as jobs
with process_group("cpu"):
    for name in jobs.JOBS:
        getattr(jobs, name + "_job")(sys.argv[1])
"""
OPTIONS = TrainOptions(device="cpu", progress=False)
VLM_TRAIN = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
             "--n-train", "4", "--n-test", "2", "--kinds", "yesno,list", "--max-new-tokens", "2", "--batch-size", "5",
             "--steps", "4", "--lora-steps", "0", "--device", "cpu"]  # fmt: skip


def _write(out: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f"{out}/{name}.safetensors")


def gather_job(out: str) -> None:
    """One backward of CLIP's loss on ``Trainer.unshard``-ed embeddings of a batch of 7; the averaged gradients."""
    from potpourri.vlm.clip import contrastive_loss

    torch.manual_seed(0)
    images, texts = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    scale = torch.nn.Parameter(torch.tensor(1.5))
    params = [*images.parameters(), *texts.parameters(), scale]
    trainer = Trainer(torch.nn.ModuleList([images, texts]), torch.optim.SGD(params, lr=0.0), total_steps=1,
                      options=OPTIONS, params=params)  # fmt: skip
    x, t = torch.randn(7, 6), torch.randn(7, 5)
    captions = torch.tensor([0, 1, 0, 2, 3, 1, 4])  # positives in both slices
    local, _ = trainer.shard(list(range(7)))
    loss = contrastive_loss(trainer.unshard(images(x[local])), trainer.unshard(texts(t[local])), captions, scale)
    trainer.update(loss)  # backward, gradients averaged over processes; SGD at lr 0 leaves them in .grad
    _write(out, "gather", {"loss": loss, **{f"grad{i}": p.grad for i, p in enumerate(params)}})


def clip_job(out: str) -> None:
    """4 steps of the tiny CLIP (last text layer tuned) on batches of 8 of 16 coloured squares, 4 captions."""
    import numpy as np

    from potpourri.data.captions import CaptionPairs
    from potpourri.vlm.clip import ClipTrainConfig, train_small_clip
    from tests.vlm.test_clip import tiny_clip

    colours = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 220], [128, 128, 128]])
    noise = np.random.default_rng(0).normal(0, 20, (16, 32, 32, 3))
    images = np.clip(colours[np.arange(16) % 4][:, None, None] + noise, 0, 255).astype(np.uint8)
    names = ["red", "green", "blue", "grey"]
    pairs = CaptionPairs(images, [f"a {names[i % 4]} square" for i in range(16)], ["image"] * 16)
    model = tiny_clip(1)
    for module in model.modules():  # the tuned MiniLM layer's dropout: slices draw other masks than one batch does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = ClipTrainConfig(steps=4, batch_size=8, lr=3e-3, warmup=1)
    losses = train_small_clip(model, pairs, cfg, options=OPTIONS)
    _write(out, "clip", {**model.trained_state(), "losses": torch.tensor(losses, dtype=torch.float64)})


def head_job(out: str) -> None:
    """6 steps of the All-Seeing head on batches of 7 of 24 regions in 6 caption groups."""
    from potpourri.models.allseeing import RegionTextHead
    from potpourri.vlm.allseeing import train_head

    torch.manual_seed(0)
    caption_ids = torch.arange(6).repeat_interleave(4)
    text = F.normalize(torch.randn(6, 16), dim=-1)[caption_ids]
    pooled = F.one_hot(caption_ids, 6).float() + 0.1 * torch.randn(24, 6)
    boxes = torch.rand(24, 4).sort(-1).values
    head = RegionTextHead(6, 16, embed_dim=8, hidden=32)
    losses = train_head(head, pooled, boxes, text, caption_ids, steps=6, batch_size=7, lr=3e-3, options=OPTIONS)
    _write(out, "head", {**head.state_dict(), "losses": torch.tensor(losses, dtype=torch.float64)})


def vlm_data():
    """A tiny random VLM (stage 1: the projection trains), its cached features and yes/no + list instructions."""
    from potpourri.data.instructions import make_instructions
    from potpourri.data.synth import make_samples
    from potpourri.models.vlm import build_vlm
    from potpourri.vlm.train import encode_samples

    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False)
    samples = make_samples("brick", "train", 4, seed=0, size=64)
    instructions = make_instructions(samples, kinds=("yesno", "list"), seed=0)  # answers of different lengths
    return vlm, encode_samples(vlm, samples), instructions


def vlm_job(out: str) -> None:
    """``vlm train`` on a tiny random VLM: 4 steps of stage 1 on batches of 5 (slices of 3 and 2 instructions)."""
    from potpourri.cli import main

    assert main([*VLM_TRAIN, "--out", f"{out}/vlm"]) == 0
    assert main([*VLM_TRAIN, "--eval-each-stage", "--out", f"{out}/phased"]) == 0  # run_phased: the staged path


def writer_job(out: str) -> None:
    """5 steps of the SEED image writer (new vocabulary rows + LoRA) on batches of 3 of 4 captions."""
    from potpourri.vlm.seed import ImageWriterTrainConfig, train_image_writer
    from tests.vlm.test_resume import _writer

    writer = _writer()
    captions = ["a brick with a scratch", "a moss surface, clean", "a dent", "two holes"]  # prompts of 4 lengths
    codes = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4], [1, 1, 2, 2], [3, 0, 3, 0]])
    cfg = ImageWriterTrainConfig(steps=5, batch_size=3, warmup_steps=2, log_every=1, progress=False)
    history = train_image_writer(writer, captions, codes, cfg, options=OPTIONS)
    trained = {n: p for n, p in writer.named_parameters() if p.requires_grad}
    _write(out, "writer", {**trained, "losses": torch.tensor([r["loss"] for r in history], dtype=torch.float64)})


def tokenizer_job(out: str) -> None:
    """6 steps of the SEED tokenizer with EMA codes and dead-code restarts every 2 steps, batches of 7."""
    from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer
    from tests.vlm.test_resume import _tiny_tokenizer

    model = _tiny_tokenizer()
    model.config.ema = model.quantizer.ema = True  # the EMA sums of the global batch too
    model.quantizer.codebook.requires_grad_(False)
    features = torch.randn(24, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    cfg = TokenizerTrainConfig(steps=6, batch_size=7, lr=3e-3, restart_every=2, progress=False)
    history = train_tokenizer(model, features, cfg, options=OPTIONS)
    _write(out, "tokenizer", {**model.state_dict(), "losses": torch.tensor(history.loss, dtype=torch.float64),
                              "restarted": torch.tensor(history.restarted)})  # fmt: skip


def tokenizer_text_job(out: str) -> None:
    """6 steps of the SEED tokenizer with SEED's text alignment (captions shared by pairs of images), batches of 7."""
    from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer
    from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

    torch.manual_seed(0)
    model = SEEDTokenizer(SEEDConfig(feature_dim=16, num_queries=4, dim=32, heads=2, layers=1, codebook_size=8,
                                     code_dim=8, restart_dead=False, text_dim=6))  # fmt: skip
    g = torch.Generator().manual_seed(2)
    features, captions = torch.randn(24, 16, 2, 2, generator=g), torch.randn(12, 6, generator=g)
    ids = torch.arange(24) // 2  # every caption describes two images: positives beyond the diagonal
    cfg = TokenizerTrainConfig(steps=6, batch_size=7, lr=3e-3, progress=False)
    history = train_tokenizer(model, features, cfg, options=OPTIONS, captions=captions[ids], caption_ids=ids)
    _write(
        out, "tokenizer_text", {**model.state_dict(), "losses": torch.tensor(history.text_loss, dtype=torch.float64)}
    )


def v2l_job(out: str) -> None:
    """4 steps of the V2L tokenizer (projection + decoder, frozen codebook) on batches of 5."""
    from potpourri.models.v2l import V2LConfig, V2LTokenizer
    from potpourri.papers.v2l import V2LExperimentConfig, train_v2l_tokenizer

    torch.manual_seed(0)
    tok = V2LTokenizer(torch.randn(12, 8), torch.arange(12), V2LConfig(feature_dim=6, stride=2, decoder_width=16))
    maps, pixels = torch.randn(10, 6, 4, 4), torch.randn(10, 3, 8, 8)
    cfg = replace(V2LExperimentConfig(), steps=4, batch_size=5, lr=1e-2)
    result = train_v2l_tokenizer(tok, maps, pixels, cfg, None, OPTIONS)
    _write(out, "v2l", {**tok.state_dict(), "final_loss": torch.tensor(result["final_loss"], dtype=torch.float64)})


def _naive_vlm_loss() -> tuple[float, float]:
    """The first batch's loss as one process computes it, and the mean of the two slices' own token means (what a
    loop that kept each process's local normaliser would log and step on)."""
    vlm, features, instructions = vlm_data()
    vlm.set_stage(1)
    order = torch.randperm(len(instructions), generator=torch.Generator().manual_seed(0)).tolist()
    batch = [instructions[i] for i in order[:5]]

    def loss(items: list) -> float:
        index = torch.tensor([item.image_index for item in items])
        with torch.no_grad():
            return float(vlm(features[index], [i.prompt for i in items], [i.answer for i in items]))

    return loss(batch), (loss(batch[0::2]) + loss(batch[1::2])) / 2


class _Rank1Of3(ProcessGroup):
    """Rank 1 of 3 without a job: the other ranks' slices of ``BATCH`` stand in for a gather."""

    def all_gather_object(self, obj: int) -> list[int]:
        return [3, obj, 2]

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([BATCH[0::3], tensor, BATCH[2::3]])


BATCH = torch.arange(8.0)[:, None] * torch.tensor([[1.0, -1.0]])  # (8, 2): slices of 3, 3 and 2 rows


def test_unshard_puts_every_slice_back_in_batch_order_and_is_the_identity_in_one_process() -> None:
    trainer = Trainer(torch.nn.Linear(2, 2), None, total_steps=0, options=OPTIONS)
    local = BATCH[1::3].clone().requires_grad_(True)
    assert trainer.unshard(local) is local and trainer.shard(BATCH) == (BATCH, 1.0)  # one process: untouched
    trainer.group = _Rank1Of3(rank=1, world=3)
    whole = trainer.unshard(local)
    assert torch.equal(whole, BATCH)
    (whole * torch.arange(8.0)[:, None]).sum().backward()  # each row's gradient is its batch position
    assert torch.equal(local.grad, torch.tensor([[1.0, 1.0], [4.0, 4.0], [7.0, 7.0]]))
    with pytest.raises(PotpourriError, match="not batch"):
        trainer.unshard(BATCH[:4])  # 4 rows where rank 1 of 3 holds 3


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_the_vision_language_loops_as_one(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    done = standalone(script, two)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in JOBS:
            globals()[name + "_job"](str(one))
        whole, naive = _naive_vlm_loss()
    finally:
        torch.set_num_threads(threads)
    # ``vlm train``: rank 0 wrote one run (one metrics row per logged step, not one per process) with one process's
    # logged loss (a mean over the global batch's answer tokens) and weights
    runs = {n: (folder / "vlm").iterdir() for n, folder in (("one", one), ("two", two))}
    assert {p.name for p in runs["two"]} == {p.name for p in runs["one"]} >= {"summary.json", "trainable.safetensors"}
    rows = [(folder / "vlm" / "metrics.csv").read_text().splitlines() for folder in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 2 and rows[0][1].split(",")[:2] == rows[1][1].split(",")[:2] == ["1", "4"]
    assert float(rows[1][1].split(",")[2]) == pytest.approx(float(rows[0][1].split(",")[2]), rel=1e-5, abs=0)
    trained = [load_file(str(folder / "vlm" / "trainable.safetensors")) for folder in (one, two)]
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, rtol=0, atol=1e-3, msg=lambda m, key=key: f"vlm {key}: {m}")
    # the staged path (``--eval-each-stage``): one run by rank 0, evaluated after its stage, the same losses
    assert {p.name for p in (two / "phased").iterdir()} == {p.name for p in (one / "phased").iterdir()}
    staged = [json.loads((folder / "phased" / "summary.json").read_text())["stages"] for folder in (one, two)]
    assert [s["name"] for s in staged[1]] == [s["name"] for s in staged[0]] and len(staged[0]) == 1
    rows = [(folder / "phased" / "metrics.csv").read_text().splitlines() for folder in (one, two)]
    assert len(rows[0]) == len(rows[1])
    assert float(rows[1][-1].split(",")[2]) == pytest.approx(float(rows[0][-1].split(",")[2]), rel=1e-5, abs=0)

    got = {name: (load_file(str(one / f"{name}.safetensors")), load_file(str(two / f"{name}.safetensors")))
           for name in JOBS if name != "vlm"}  # fmt: skip

    # the all-gather: the same loss in every process, the averaged gradients one process's (also the logit scale's,
    # which every process differentiates in full)
    a, b = got.pop("gather")
    assert set(a) == set(b) and len(a) == 6
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"gather {key}: {m}")

    # the token loss: slices hold different numbers of answer tokens, so the mean of their own means is not the
    # batch's mean (what the sharded loop logs and steps on, above), by far more than the tolerance
    assert abs(naive - whole) > 1e-4, (naive, whole)

    for name, (a, b) in got.items():
        losses = "final_loss" if name == "v2l" else "losses"
        history_a, history_b = a.pop(losses), b.pop(losses)
        assert history_a.numel() and torch.isfinite(history_a).all()
        if name != "v2l":
            assert abs(float(history_a[-1] - history_a[0])) > 1e-4, name  # it trained: not two idle runs compared
        torch.testing.assert_close(history_b, history_a, rtol=1e-5, atol=0, msg=lambda m, n=name: f"{n} losses: {m}")
        if name == "tokenizer":  # the same codes restarted at the same steps, codebook statistics of the global batch
            assert a["restarted"].sum() > 0 and torch.equal(a.pop("restarted"), b.pop("restarted"))
            for key in [k for k in a if k.startswith("quantizer.")]:
                torch.testing.assert_close(b.pop(key), a.pop(key), rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        assert set(a) == set(b), name
        for key, value in a.items():
            other = b[key]
            if name.startswith("tokenizer") and "in_proj" in key:
                # query and key rows: the decoder's readout queries start within 0.02 of each other, so attention is
                # near uniform and these rows' gradients near float rounding, which AdamW steps by ±lr either way;
                # a key bias has no gradient at all (softmax ignores a shift shared by all keys). The value rows count
                value, other = value[2 * len(value) // 3 :], other[2 * len(value) // 3 :]
            if value.is_floating_point():
                torch.testing.assert_close(
                    other, value, rtol=0, atol=1e-3, msg=lambda m, k=f"{name} {key}": f"{k}: {m}"
                )
            else:
                assert torch.equal(other, value), f"{name} {key}"
