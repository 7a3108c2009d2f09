"""Model-level structural re-parameterisation: fuse every multi-branch block into its inference form.

Handles our ``RepConv`` blocks and timm's re-parameterisable models (``repvgg_*``, ``mobileone_*``, ``fastvit_*``
through their ``reparameterize``/``fuse``/``switch_to_deploy`` API).
"""

from __future__ import annotations

import copy

import torch.nn as nn

from potpourri.models.rep import RepConv

__all__ = ["is_reparameterized", "reparameterize"]


def reparameterize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fuse every re-parameterisable block and return the eval-mode model (a copy unless ``inplace``).

    Example:
        fast = reparameterize(model)  # same eval outputs, one conv per RepConv block
    """
    from timm.utils.model import reparameterize_model

    model = model if inplace else copy.deepcopy(model)
    model.eval()  # fusion is exact only with BN running statistics
    if hasattr(model, "reparameterize"):
        model.reparameterize()  # the root itself (timm's walker only visits children)
    return reparameterize_model(model, inplace=True)


def is_reparameterized(model: nn.Module) -> bool:
    """True when no un-fused ``RepConv`` remains."""
    return all(m.reparam_conv is not None for m in model.modules() if isinstance(m, RepConv))
