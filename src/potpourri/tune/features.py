"""Feature caching: run the frozen part of a model once, then train the rest on stored activations.

Linear probe: the head trains on the pooled features. SubTuning: the suffix from the first tuned block trains on
the activation that crosses into it (``SuffixModel`` on a traced ``BlockProgram``).

With every backbone parameter frozen and BN in eval mode, the head's input for an image never changes, so the
naive probe recomputes the same forward pass every epoch. Caching is exact for deterministic inputs; random
augmentation (a new view per epoch) and dropout before the head are what it gives up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.tune.multitask import BlockProgram

__all__ = ["SuffixModel", "cached_inputs", "extract_features", "head_module"]


def head_module(model: nn.Module, head_names: list[str]) -> nn.Module:
    """The classifier module named by a block map's ``head`` entry."""
    if len(head_names) != 1:
        raise ValueError(f"feature caching needs a single head module, got {head_names}")
    return model.get_submodule(head_names[0])


@torch.no_grad()
def extract_features(
    model: nn.Module, data: Dataset, head: nn.Module, *, batch_size: int = 64, device: str | torch.device = "cpu"
) -> TensorDataset:
    """``TensorDataset(features, labels)`` where features are what ``head`` receives, in eval mode.

    Example:
        cached = extract_features(model, train_set, model.get_classifier())
    """
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval().to(device)
    labels = []
    try:
        if isinstance(data, TensorDataset):
            images, targets = data.tensors[0], data.tensors[1]
            batches = [
                (images[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(data), batch_size)
            ]
        else:
            batches = DataLoader(data, batch_size=batch_size, shuffle=False)
        for images, targets in batches:
            model(images.to(device))  # (B, K); the hook keeps the head's input (B, D)
            labels.append(torch.as_tensor(targets))
    finally:
        hook.remove()
        model.train(was_training)
    return TensorDataset(torch.cat(captured), torch.cat(labels))


class SuffixModel(nn.Module):
    """Runs ``model``'s forward from node ``start`` of its traced program, fed the value that crosses the cut.

    The whole model is a submodule, so ``train()``'s BN policy and parameter handling see exactly what they see
    when the full model trains; only the frozen prefix is skipped.
    """

    def __init__(self, model: nn.Module, program: BlockProgram, start: int) -> None:
        super().__init__()
        crossing = program.crossing(start)
        if len(crossing) != 1:
            raise PotpourriError(
                f"the forward has {len(crossing)} values crossing node {start}; prefix caching needs a chain of blocks"
            )
        self.model, self.program, self.start, self.node = model, program, start, crossing[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) activation at the cut -> (B, K)
        env = {self.node: inputs}
        stop = len(self.program.nodes)
        return self.program.run(env, self.start, stop, self.model.get_submodule, _attribute_of(self.model))


def _attribute_of(model: nn.Module) -> Callable[[str], Any]:
    """Resolver for fx ``get_attr`` nodes: a parameter or buffer of ``model`` by dotted name."""

    def attribute(target: str) -> Any:
        owner, _, name = target.rpartition(".")
        return getattr(model.get_submodule(owner) if owner else model, name)

    return attribute


@torch.no_grad()
def cached_inputs(
    model: nn.Module,
    program: BlockProgram,
    images: torch.Tensor,
    starts: list[int],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[int, torch.Tensor]:
    """``{start: activation crossing into node start}`` for every image, from one eval-mode pass of the prefix on
    ``device`` (the cached activations come back to the CPU)."""
    model.to(device).eval()
    nodes = {start: program.crossing(start) for start in starts}
    if any(len(n) != 1 for n in nodes.values()):
        raise PotpourriError("prefix caching needs a chain of blocks (one value crossing each cut)")
    parts: dict[int, list[torch.Tensor]] = {start: [] for start in starts}
    for i in range(0, len(images), batch_size):
        env = {program.input_node: images[i : i + batch_size].to(device)}
        program.run(env, 0, max(starts), model.get_submodule, _attribute_of(model))
        for start in starts:
            parts[start].append(env[nodes[start][0]].cpu())
    return {start: torch.cat(chunks) for start, chunks in parts.items()}
