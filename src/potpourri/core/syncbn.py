"""Batch normalisation over the global batch of a torchrun job, on any device (torch's SyncBatchNorm is GPU-only).

Under ``torchrun`` with sharded batches each process sees ``B / world`` images, so a BatchNorm layer that trains would
normalise with its own slice's statistics and the job would no longer compute what one process does on the whole
batch. ``ProcessBatchNorm`` sums ``Σx``, ``Σx²`` and the count over processes (``torch.distributed.nn.all_reduce``,
differentiable, gloo or nccl) and normalises every slice with the global mean and biased variance, updating the
running statistics with the unbiased one, as ``nn.BatchNorm`` does on the whole batch. In eval mode, outside a
process group, or in a group of one it is ``nn.BatchNorm`` unchanged. One implementation for the CPU and CUDA
(torch's ``convert_sync_batchnorm`` would also turn timm's ``BatchNormAct2d`` into a norm without its activation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed
import torch.nn as nn

from potpourri.core.errors import PotpourriError

__all__ = ["ProcessBatchNorm", "ProcessBatchNormAct", "synchronise_batchnorm"]


class ProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm (1-D, 2-D or 3-D input) whose training statistics are those of every process's batch together."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = (
            self.training
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        if not synced:
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        totals = torch.distributed.nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ProcessBatchNormAct(ProcessBatchNorm):
    """``ProcessBatchNorm`` followed by the dropout and activation of a timm ``BatchNormAct2d`` it replaces (the
    same state-dict keys)."""

    def __init__(self, *args: Any, drop: nn.Module, act: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` (in place; the top module is returned, replaced if it is one) by
    ``ProcessBatchNorm`` with the same parameter objects, buffers and train/eval mode. timm's ``BatchNormAct2d``
    keeps its dropout and activation (``ProcessBatchNormAct``); any other BatchNorm subclass is refused, since
    swapping it would drop whatever it adds."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, ProcessBatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if type(module) in _PLAIN:
            synced: ProcessBatchNorm = ProcessBatchNorm(*args)
        elif type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act") and hasattr(module, "drop"):
            synced = ProcessBatchNormAct(*args, drop=module.drop, act=module.act)
        else:
            raise PotpourriError(
                f"cannot synchronise the batch norm {type(module).__name__}: only torch's BatchNorm1d/2d/3d and timm's "
                "BatchNormAct2d are known; train without sync_bn"
            )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        replaced = synchronise_batchnorm(child)
        if replaced is not child:
            module.add_module(name, replaced)
    return module
