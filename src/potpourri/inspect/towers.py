"""The image/text tower contract shared by AnomalyCLIP's CLIP path and its stand-in: ``Towers``, the object-agnostic
prompt learner and the prompt-prefix helper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError

OBJECT_PROMPTS = ("object.", "damaged object.")  # normal, anomalous: AnomalyCLIP's object-agnostic class names


# ----------------------------------------------------------------------------------------------- prompts
class PromptLearner(nn.Module):
    """Object-agnostic prompts: ``n_ctx`` vectors before "object." / "damaged object." and deep text tokens.

    ``deep`` holds ``depth - 1`` sets of ``deep_length`` tokens that replace positions 1..deep_length at the input
    of text layers 1..depth-1 (layer 0 sees the ``n_ctx`` context vectors instead).
    """

    def __init__(self, width: int, *, n_ctx: int = 12, depth: int = 9, deep_length: int = 4, seed: int = 0) -> None:
        super().__init__()
        if n_ctx < 1 or deep_length > n_ctx or depth < 1:
            raise PotpourriError(f"bad prompt shape: n_ctx={n_ctx}, deep_length={deep_length}, depth={depth}")
        g = torch.Generator().manual_seed(seed)
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)  # [V1..VE]
        self.ctx_anomalous = nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)  # [W1..WE]
        self.deep = nn.Parameter(torch.randn(depth - 1, deep_length, width, generator=g) * 0.02)
        self.n_ctx = n_ctx

    def insert(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Put the context vectors at positions 1..n_ctx of the (2, T, W) normal/anomalous template embeddings."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous])  # (2, n_ctx, W)
        return torch.cat([token_embeddings[:, :1], ctx, token_embeddings[:, 1 + self.n_ctx :]], dim=1)

    def deep_tokens(self, layer: int) -> torch.Tensor | None:
        """The (deep_length, W) tokens to write at the input of text layer ``layer`` (0-based), or None."""
        return self.deep[layer - 1] if 1 <= layer <= self.deep.shape[0] else None


def replace_prefix(x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """(B, T, W) with positions 1..len(tokens) replaced by ``tokens`` (same for every row); no in-place write."""
    if tokens is None:
        return x
    return torch.cat([x[:, :1], tokens.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + tokens.shape[0] :]], dim=1)


def deep_prompt_hook(tokens: Callable[[], torch.Tensor | None]) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) writing ``tokens()`` over a text layer's input prefix; None: no-op."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        deep = tokens()
        if deep is None:
            return None
        if args:
            return (replace_prefix(args[0], deep), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace_prefix(kwargs["hidden_states"], deep)}

    return hook


class DeepPromptSwitch:
    """Pre-hooks on text ``layers`` that write ``tokens(i)`` (layer i's deep prompt tokens) over each layer's input
    prefix, only inside ``with switch.on():``; every other text encoding runs the layers untouched."""

    def __init__(self, layers: Sequence[nn.Module], tokens: Callable[[int], torch.Tensor]) -> None:
        self.active = False
        for index, layer in enumerate(layers):
            hook = deep_prompt_hook(lambda i=index: tokens(i) if self.active else None)
            layer.register_forward_pre_hook(hook, with_kwargs=True)

    @contextmanager
    def on(self) -> Iterator[None]:
        """Deep prompts active for the enclosed forward passes."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


# ----------------------------------------------------------------------------------------------- open_clip towers
class Towers(nn.Module):
    """The contract both image/text tower pairs meet (open_clip here, Lite0 + MiniLM in the stand-in).

    ``frozen_image_features`` (cacheable, no grad) → ``project_image`` (global (B, D), per-layer (B, h, w, D));
    ``prompt_text_features`` (2, D) with grad on the prompts; ``encode_texts`` (N, D) frozen;
    ``window_embeddings`` (B, h', w', D) for WinCLIP; ``trainable`` lists what training may change.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def trainable(self) -> list[nn.Parameter]:
        return list(self.prompts.parameters())

    @property
    def bridge_parameters(self) -> list[nn.Parameter]:
        """Parameters that align the image tower to the text tower (none for a real CLIP)."""
        return []

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by their module path (the names saved in ``model.safetensors``)."""
        ids = {id(p) for p in self.trainable}
        return {name: p for name, p in self.named_parameters() if id(p) in ids}
