"""``--device`` / ``--precision`` reach the inspection feature pass: bf16 on the CPU scores like fp32, a method
without a device path refuses it in one line, and CUDA runs for real when a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potpourri.cli import main
from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import image_auroc as roc_auc
from potpourri.inspect.patchcore import PatchCore
from potpourri.inspect.winclip import WinCLIP

pytestmark = pytest.mark.one_thread


def fitted(planted, small_config, lite0, device, precision):
    return PatchCore(small_config, backbone=lite0).to(device, precision).fit(planted.train)


def test_bf16_on_the_cpu_runs_in_bf16_and_ranks_the_planted_defects_like_fp32(planted, small_config, lite0):
    fp32 = fitted(planted, small_config, lite0, "cpu", "fp32")
    bf16 = fitted(planted, small_config, lite0, "cpu", "bf16")
    s32, _ = fp32.score(planted.test)
    s16, _ = bf16.score(planted.test)
    assert fp32.memory_bank.shape == bf16.memory_bank.shape
    assert not torch.equal(fp32.memory_bank, bf16.memory_bank)  # bf16 really ran: the features moved a little
    assert roc_auc(planted.labels, s16) == roc_auc(planted.labels, s32) == 1.0
    assert np.corrcoef(s32, s16)[0, 1] > 0.95


def test_a_method_without_a_device_path_refuses_it_in_one_line():
    with pytest.raises(PotpourriError, match="--precision bf16: method 'winclip' runs in fp32 only"):
        WinCLIP().to("cpu", "bf16")
    assert WinCLIP().to("auto").device.type == "cpu"  # auto falls back to what the method can run on


def test_inspect_fit_cli_passes_precision_and_refuses_before_writing(mvtec_folder, tmp_path, capsys):
    out = tmp_path / "wc"
    argv = ["inspect", "fit", "--method", "winclip", "--data", str(mvtec_folder), "--out", str(out)]
    assert main([*argv, "--precision", "bf16"]) == 2
    assert "runs in fp32 only" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_patchcore_on_cuda_scores_like_the_cpu(planted, small_config, lite0, precision):
    cpu = fitted(planted, small_config, lite0, "cpu", "fp32")
    gpu = fitted(planted, small_config, lite0, "cuda", precision)
    assert roc_auc(planted.labels, gpu.score(planted.test)[0]) == roc_auc(planted.labels, cpu.score(planted.test)[0])
