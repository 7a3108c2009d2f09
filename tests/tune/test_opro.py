"""OPRO loop: meta-prompt format, parsing messy text, budget accounting, a scripted proposer, the LM sampler."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.papers.opro import probe_space
from potpourri.tune.opro import LMProposer, Param, RandomProposer, SearchSpace, bucketize, meta_prompt, opro_search

SPACE = SearchSpace([Param("x", 0, 20, integer=True), Param("lr", 1e-4, 1.0, log=True, aliases=("learning rate",))])


def test_bucketize_rounds_and_clamps():
    assert [bucketize(s) for s in (0.5731, 0.005, 1.3, -0.2)] == [57, 0, 100, 0]
    assert bucketize(0.5731, num_buckets=10) == 6


def test_meta_prompt_keeps_the_top_pairs_sorted_ascending_with_bucketed_scores():
    history = [
        ({"x": 1, "lr": 0.1}, 0.401),
        ({"x": 2, "lr": 0.01}, 0.904),
        ({"x": 3, "lr": 0.001}, 0.2),  # the worst: dropped with max_pairs=3
        ({"x": 4, "lr": 0.5}, 0.655),
        ({"x": 2, "lr": 0.01}, 0.904),  # a duplicate is listed once
    ]
    prompt = meta_prompt(history, SPACE, task="TASK", max_pairs=3)
    pairs = re.findall(r"solution: (.*)\nscore: (\d+)", prompt)
    assert pairs == [("x=1, lr=0.1", "40"), ("x=4, lr=0.5", "66"), ("x=2, lr=0.01", "90")]
    assert prompt.startswith("TASK\n") and "x between 0 and 20 (integer)" in prompt
    assert prompt.rstrip().endswith("<sol>x=0, lr=0.0001</sol>.")  # the instruction comes after the best pair


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<sol>x=3, lr=0.001</sol>", {"x": 3, "lr": 0.001}),
        ("Sure! Here it is:\n<sol> lr: 3e-4 ; x = 7.0 </sol> hope it helps", {"x": 7, "lr": 3e-4}),
        ("I suggest a Learning Rate of 1.5 × 10^-3 and x: [12]", {"x": 12, "lr": 1.5e-3}),
        ("<sol>x=99, lr=0.1</sol> or maybe <sol>x=5, lr=0.1</sol>", {"x": 5, "lr": 0.1}),  # first in-range one
        ("<sol>x=4, lr=2E-2", {"x": 4, "lr": 0.02}),  # unclosed tag
        ("<sol>x=4.5, lr=0.1</sol>", None),  # not an integer
        ("<sol>x=4, lr=-0.1</sol>", None),  # out of range
        ("<sol>x=4</sol>", None),  # incomplete
        ("blr=0.1, x=3", None),  # 'lr' inside another word is not the parameter
        ("", None),
    ],
)
def test_parser_on_messy_text(text, expected):
    parsed = SPACE.parse(text)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None and parsed.keys() == expected.keys()
        for key, value in expected.items():
            assert parsed[key] == pytest.approx(value)


class HillClimber:
    """A scripted proposer that only sees the meta-prompt: it steps x by ±1 from the last (best) listed solution."""

    name = "scripted"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def propose(self, prompt: str, n: int, rng: np.random.Generator) -> list[str]:
        self.prompts.append(prompt)
        best = SPACE.parse(re.findall(r"solution: (.*)", prompt)[-1])
        return [f"<sol>x={int(best['x']) + d}, lr={best['lr']:g}</sol>" for d in (1, -1, 2)[:n]]


def test_loop_with_a_scripted_proposer_finds_the_planted_optimum():
    calls = []

    def objective(s):
        calls.append(s)
        return 1.0 - abs(s["x"] - 13) / 20  # planted optimum x = 13

    proposer = HillClimber()
    result = opro_search(objective, SPACE, proposer, budget=30, per_step=3, initial=[{"x": 2, "lr": 0.01}])
    assert result.best == {"x": 13, "lr": 0.01} and result.best_score == 1.0
    assert result.proposals == 30 and len(result.trace) == 30
    assert result.evaluations == len(calls) == len({(c["x"], c["lr"]) for c in calls})  # no re-evaluation
    # every prompt lists the history's best solution last
    for prompt in proposer.prompts[1:]:
        scores = [int(s) for s in re.findall(r"score: (\d+)", prompt)]
        assert scores == sorted(scores)


class Scripted:
    name = "scripted"

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)

    def propose(self, prompt, n, rng):
        out, self.texts = self.texts[:n], self.texts[n:]
        return out


def test_budget_counts_invalid_and_duplicate_proposals():
    calls = []
    texts = ["nonsense", "<sol>x=3, lr=0.1</sol>", "<sol>x=3, lr=0.1</sol>", "x=50, lr=0.1", "<sol>x=4, lr=0.1</sol>"]
    texts += ["still nothing"] * 10
    result = opro_search(lambda s: calls.append(s) or s["x"] / 20, SPACE, Scripted(texts), budget=7, per_step=2)
    assert result.proposals == 7  # stops exactly at the budget, mid-step
    assert result.invalid == 4 and result.duplicates == 1 and result.evaluations == 2 == len(calls)
    assert result.best == {"x": 4, "lr": 0.1}
    assert result.best_so_far() == [-np.inf, 0.15, 0.15, 0.15, 0.2, 0.2, 0.2]


def test_all_invalid_is_one_line_error():
    with pytest.raises(PotpourriError, match="no proposal"):
        opro_search(lambda s: 0.0, SPACE, Scripted(["junk"] * 5), budget=5)


def test_random_proposer_stays_in_bounds_and_samples_log_scale():
    space = probe_space()
    texts = RandomProposer(space).propose("", 400, np.random.default_rng(0))
    sols = [space.parse(t) for t in texts]
    assert all(s is not None for s in sols)
    lrs = np.log10([s["lr"] for s in sols])
    assert lrs.min() < -4 and lrs.max() > -0.5 and abs(np.median(lrs) + 2.5) < 0.5  # log-uniform on [1e-5, 1]


class _CharTokenizer:
    """A stand-in tokenizer over ids 0..63 (0 = EOS) for a tiny random LLaMA."""

    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "U:" + messages[0]["content"] + "\nA:"

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        return SimpleNamespace(input_ids=torch.tensor([[1 + ord(c) % 63 for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(str(int(i)) for i in ids if int(i) != 0)


def test_lm_proposer_with_cache_reuse_matches_greedy_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=0,
        bos_token_id=1,
    )
    lm = SimpleNamespace(lm=LlamaForCausalLM(config).eval(), tokenizer=_CharTokenizer())
    proposer = LMProposer(lm, temperature=1e-6, max_new_tokens=6, prefill="")  # ~argmax sampling
    texts = proposer.propose("hello", 3, np.random.default_rng(0))
    ids = lm.tokenizer(lm.tokenizer.apply_chat_template([{"content": "hello"}])).input_ids
    with torch.no_grad():
        greedy = lm.lm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=0, pad_token_id=0)
    expected = lm.tokenizer.decode(greedy[0, ids.shape[1] :])
    assert texts == [expected] * 3  # the repeated KV cache gives each sample the prompt's context
    sampled = LMProposer(lm, temperature=1.0, max_new_tokens=6, prefill="").propose(
        "hello", 4, np.random.default_rng(1)
    )
    assert len(set(sampled)) > 1  # temperature 1 samples differ
