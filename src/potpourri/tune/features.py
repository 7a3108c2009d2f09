"""Linear-probe feature caching: run the frozen backbone once, then train the head on stored features.

With every backbone parameter frozen and BN in eval mode, the head's input for an image never changes, so the
naive probe recomputes the same forward pass every epoch. Caching is exact for deterministic inputs; random
augmentation (a new view per epoch) and dropout before the head are what it gives up.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["extract_features", "head_module"]


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
