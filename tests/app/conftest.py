"""A tiny VLM run with a planted answer: image A answers the question with a phrase and a box, image B with words.

The run folder is what ``potpourri vlm train`` writes and ``load_vlm_run`` reads (``config.yaml`` +
``trainable.safetensors``), trained here in seconds on the two images so the answers are known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

QUESTION = "[refer] where is the crack?"
GRID_BOX = (10, 20, 60, 80)  # on MiniGPT-v2's 0-100 grid
BOX_ANSWER = "<p>crack</p> {<10><20><60><80>}"
WORD_ANSWER = "no crack"
WIDTH, HEIGHT = 100, 50  # not square and not the model size: boxes must land on the image's own pixels
IMAGE_SIZE = 64
RUN_CONFIG = {
    "verb": "vlm", "encoder": "test_efficientnet", "lm": "tiny", "pretrained": False, "merge": "1x4",
    "image_size": IMAGE_SIZE, "seed": 0, "lora_rank": 8, "lora_alpha": 16.0, "task_identifiers": True,
    "kinds": "refer", "categories": ["brick"],
}  # fmt: skip


@dataclass
class TinyRun:
    path: Path
    vlm: torch.nn.Module  # the trained model, in memory (an independent route to the expected answers)
    box_image: Path
    word_image: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    from potpourri.core.runs import new_run
    from potpourri.data.instructions import Instruction
    from potpourri.models.vlm import build_vlm
    from potpourri.vlm.train import VLMTrainConfig, encode_samples, train_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-vlm")
    rng = np.random.default_rng(0)
    box_pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    word_pixels = 255 - box_pixels
    paths = []
    for name, pixels in (("box.png", box_pixels), ("words.png", word_pixels)):
        Image.fromarray(pixels).save(root / name)
        paths.append(root / name)

    class Sample:  # what encode_samples reads: the image at the model's size, resized as the assistant does
        def __init__(self, pixels: np.ndarray) -> None:
            self.image = np.asarray(Image.fromarray(pixels).resize((IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC))

    torch.manual_seed(RUN_CONFIG["seed"])
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, merge="1x4")
    features = encode_samples(vlm, [Sample(box_pixels), Sample(word_pixels)])
    items = [
        Instruction("refer", "refer", QUESTION, BOX_ANSWER, 0),
        Instruction("refer", "refer", QUESTION, WORD_ANSWER, 1),
    ]
    common = dict(batch_size=2, warmup_steps=0, log_every=20, progress=False)
    train_vlm(vlm, features, items * 2, VLMTrainConfig(stage=1, steps=40, lr=1e-2, **common))
    train_vlm(vlm, features, items * 2, VLMTrainConfig(stage=2, steps=60, lr=1e-2, **common))
    run = new_run("vlm", root / "run")
    run.write_config(RUN_CONFIG)
    vlm.save_trainable(run.path / "trainable.safetensors")
    answers = vlm.generate(features, [QUESTION, QUESTION], max_new_tokens=48)
    assert answers == [BOX_ANSWER, WORD_ANSWER], f"the planted answers were not learnt: {answers}"
    torch.set_num_threads(threads)
    return TinyRun(run.path, vlm.eval(), paths[0], paths[1])


@pytest.fixture(scope="session")
def patchcore_run(tmp_path_factory: pytest.TempPathFactory):
    """A PatchCore fitted on three flat 64 px images, saved; returns (folder, the fitted in-memory model)."""
    from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    normal = [rng.integers(100, 140, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    fitted = PatchCore(PatchCoreConfig(image_size=64)).fit(normal)
    folder = tmp_path_factory.mktemp("patchcore")
    fitted.save(folder)
    torch.set_num_threads(threads)
    return folder, fitted
