"""``deep_prompt_hook``: the one hook both AnomalyCLIP tower pairs use to write deep prompt tokens into text layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from potpourri.inspect.towers import deep_prompt_hook


class Echo(nn.Module):
    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return hidden_states * scale


def test_hook_overwrites_positions_1_to_n_positionally_and_by_keyword_and_none_is_a_no_op() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # (B, T, W)
    tokens = torch.full((2, 3), -1.0)
    active = {"on": True}
    layer = Echo()
    layer.register_forward_pre_hook(deep_prompt_hook(lambda: tokens if active["on"] else None), with_kwargs=True)
    expected = x.clone()
    expected[:, 1:3] = -1.0  # the first token (BOS / CLS) and the tail are kept
    for out in (layer(x), layer(hidden_states=x), layer(x, scale=1.0)):
        torch.testing.assert_close(out, expected)
    active["on"] = False
    torch.testing.assert_close(layer(x), x)
    assert x[0, 1, 0] == 3.0  # the input was not written in place
