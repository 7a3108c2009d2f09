"""A loop other than tune's under torchrun: SSPrompt's ``learn_prompt`` steps through ``core.training.Trainer``,
which makes it data-parallel (rank 0's weights, gradients averaged, rank-0 checkpoints); 2 gloo processes, each on
half of every batch, reach the prompt of 1 process on the whole batch — even when the job is killed mid-run (torchrun
ends the whole group) and launched again with resume: every rank restarts from rank 0's last checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from potpourri.core.training import TrainOptions
from potpourri.segment.sam_prompt import PromptConfig, image_embeddings, learn_prompt
from tests.segment.test_sam_resume import planted, tiny_sam
from tests.torchrun import standalone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.segment.test_ddp_prompt import prompt_job
prompt_job(sys.argv[1], resume=sys.argv[2] == "resume")
"""


def prompt_job(out: str, resume: bool = False) -> None:
    """6 steps of prompt learning on batches of 4 (2 per process under torchrun), a checkpoint every 3 steps."""
    sam = tiny_sam()
    images, masks = planted(6)
    options = TrainOptions(device="cpu", checkpoint_every=3, progress=False, resume=resume)
    prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks, PromptConfig(steps=6, batch_size=4),
                                  options=options, checkpoints=Path(out) / "checkpoints")  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({**prompt.state_dict(), "losses": torch.tensor(losses)}, f"{out}/final.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_killed_and_relaunched_learn_the_prompt_of_one(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    two = str(tmp_path / "two")
    killed = standalone(script, two, "fresh", timeout=150, POTPOURRI_KILL_AT_STEP="5")
    assert killed.returncode != 0  # both processes SIGKILL themselves after step 5: torchrun ends the job
    last = json.loads((tmp_path / "two" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 3 and not (tmp_path / "two" / "final.safetensors").exists()  # steps 4-5 are lost
    # a relaunch that started over would die at step 2; one that resumes from step 3 never reaches it
    resumed = standalone(script, two, "resume", timeout=150, POTPOURRI_KILL_AT_STEP="2")
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    prompt_job(str(tmp_path / "one"))

    one = load_file(str(tmp_path / "one" / "final.safetensors"))
    double = load_file(str(tmp_path / "two" / "final.safetensors"))
    assert set(one) == set(double)
    assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3  # it learned: the comparison is not of two idle runs
    for key, value in one.items():
        torch.testing.assert_close(double[key], value, rtol=0, atol=1e-5, msg=f"'{key}' differs between 1 and 2")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoints").iterdir()
    )  # rank 0's checkpoints, as one process writes them
