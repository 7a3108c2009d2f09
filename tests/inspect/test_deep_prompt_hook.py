"""``deep_prompt_hook`` / ``DeepPromptSwitch``: how both AnomalyCLIP tower pairs write deep prompt tokens into text
layers, only while the learned prompts are encoded."""

from __future__ import annotations

import torch
import torch.nn as nn

from potpourri.inspect.towers import DeepPromptSwitch, deep_prompt_hook


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


def test_switch_writes_each_layers_own_tokens_only_inside_on_even_after_an_error() -> None:
    x = torch.zeros(1, 4, 2)
    layers = [Echo(), Echo()]
    switch = DeepPromptSwitch(layers, lambda i: torch.full((1, 2), float(i + 1)))
    torch.testing.assert_close(layers[1](x), x)  # off by default
    with switch.on():
        assert layers[0](x)[0, 1].tolist() == [1.0, 1.0] and layers[1](x)[0, 1].tolist() == [2.0, 2.0]
    try:
        with switch.on():
            raise RuntimeError("a failed encoding")
    except RuntimeError:
        pass
    assert not switch.active
    torch.testing.assert_close(layers[0](x), x)
