"""The plain-language router (``vlm/router.py``): grammar-constrained decoding always yields a call of the grammar,
even from a tiny random LLaMA; the keyword baseline gets planted requests right; the held-out phrasings were
committed before the router's prompt and grammar."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from potpourri.vlm.router import (
    HELDOUT_REQUESTS,
    KINDS,
    MAX_K,
    PROMPT_EXAMPLES,
    ByteTokenizer,
    Call,
    KeywordRouter,
    LMRouter,
    TokenTrie,
    all_calls,
    constrained_greedy,
    load_heldout_requests,
)

ROUTER_FILE = Path(__file__).parents[2] / "src" / "potpourri" / "vlm" / "router.py"


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_the_grammar_has_every_call_once_and_parses_its_own_text() -> None:
    calls = all_calls()
    assert len(calls) == 4 * len(KINDS) + MAX_K * len(KINDS) + 1 == len(set(calls))
    assert all(Call.parse(c.text()) == c for c in calls)
    for bad in ("worst(k=0, kind=any)", "worst(k=11, kind=dent)", "find(kind=rust)", "refuse", "count(kind=hole) x"):
        assert Call.parse(bad) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_decoding_of_a_random_llama_always_writes_a_call(seed: int) -> None:
    router = LMRouter(_tiny_llama(seed), ByteTokenizer(), calibrate=seed == 2)
    grammar = {c.text() for c in all_calls()}
    for request in ("count the holes", "", "zzzz ###", "show me the worst 3 scratches"):
        call = router.route(request)
        assert call.text() in grammar  # the trie, not the weights, guarantees this


def test_greedy_under_the_mask_picks_the_best_allowed_token_each_step() -> None:
    """A fake LM that always ranks token ids by value: greedy under the trie must write the byte-wise largest call
    (no call is a prefix of another), an expectation computed without the decoder."""

    class Ranked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, past_key_values=None, use_cache=True):
            logits = torch.arange(256, dtype=torch.float32).expand(1, input_ids.shape[1], 256)
            return type("Out", (), {"logits": logits, "past_key_values": None})()

    tokenizer = ByteTokenizer()
    texts = [c.text() for c in all_calls()]
    trie = TokenTrie([tokenizer.encode(t) for t in texts])
    generated = constrained_greedy(Ranked(), tokenizer.encode("anything"), trie)
    assert tokenizer.decode(generated) == max(texts, key=lambda t: t.encode())


@pytest.mark.parametrize(
    ("request_text", "expected"),
    [("check these parts for cracks", "find(kind=crack)"), ("how many dents?", "count(kind=dent)"),
     ("show me the worst four scratches", "worst(k=4, kind=scratch)"), ("outline the stain", "segment(kind=stain)"),
     ("describe the hole", "describe(kind=hole)"), ("top 12 most damaged parts", f"worst(k={MAX_K}, kind=any)"),
     ("sing a song", "refuse()"), ("count the screws", "refuse()")],
)  # fmt: skip
def test_keyword_baseline_on_planted_requests(request_text: str, expected: str) -> None:
    assert KeywordRouter().route(request_text).text() == expected


def test_heldout_file_is_well_formed_and_disjoint_from_the_prompt() -> None:
    rows = load_heldout_requests()
    assert len(rows) >= 100 and sum(call.verb == "refuse" for _, call in rows) >= 10
    assert not {t.lower() for t, _ in rows} & {t.lower() for t, _ in PROMPT_EXAMPLES}


def test_heldout_phrasings_were_committed_before_the_router() -> None:
    git = shutil.which("git")
    root = ROUTER_FILE.parents[3]
    if git is None or subprocess.run([git, "-C", str(root), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")

    def first_commit(path: Path) -> str:
        out = subprocess.run([git, "-C", str(root), "log", "--diff-filter=A", "--format=%H", "--", str(path)],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        return out[-1] if out else ""

    phrasings, router = first_commit(HELDOUT_REQUESTS), first_commit(ROUTER_FILE)
    if not phrasings or not router:
        pytest.skip("the phrasings or the router are not committed yet (or the history is shallow)")
    assert phrasings != router
    ancestor = subprocess.run([git, "-C", str(root), "merge-base", "--is-ancestor", phrasings, router])
    assert ancestor.returncode == 0, "requests_heldout.jsonl must be committed before vlm/router.py"
