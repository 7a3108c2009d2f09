"""Requests in plain language → one call of the inspection toolkit, by grammar-constrained decoding on a causal LM.

The calls form a small closed grammar::

    call := "find(kind=" KIND ")" | "worst(k=" N ", kind=" KIND ")" | "count(kind=" KIND ")"
          | "segment(kind=" KIND ")" | "describe(kind=" KIND ")" | "refuse()"
    KIND := scratch | crack | stain | hole | contamination | dent | any        N := 1 .. 10

Every sentence of the grammar is tokenised with the LM's own tokenizer into a trie of token ids. Decoding is
greedy, but at each step the logits of every token that leaves the trie are set to -inf, so the LM can only write a
prefix of a valid call and stops at a leaf: whatever the weights, the output parses (``constrained_greedy``).

``LMRouter`` wraps SmolLM2-135M-Instruct (or any HF causal LM) with a chat prompt that lists the verbs, the kind
synonyms and a few examples; ``KeywordRouter`` is the baseline: the same synonym table and verb keywords, first
match wins. Both are scored on ``requests_heldout.jsonl`` (105 phrasings, committed before this file; see
``reproduce request-routing``).

Example:
    >>> KeywordRouter().route("how many holes are in this part?").text()
    'count(kind=hole)'
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "HELDOUT_REQUESTS",
    "KINDS",
    "KIND_SYNONYMS",
    "MAX_K",
    "VERBS",
    "ByteTokenizer",
    "Call",
    "KeywordRouter",
    "LMRouter",
    "TokenTrie",
    "all_calls",
    "constrained_greedy",
    "load_heldout_requests",
    "routing_accuracy",
]

VERBS = ("find", "worst", "count", "segment", "describe", "refuse")
KINDS = ("scratch", "crack", "stain", "hole", "contamination", "dent", "any")
MAX_K = 10
HELDOUT_REQUESTS = Path(__file__).with_name("requests_heldout.jsonl")
# words (stems) that name each kind; shared by the keyword baseline and the LM's prompt, so both know the same words
KIND_SYNONYMS = {
    "scratch": ("scratch", "scuff", "scrape"),
    "crack": ("crack", "fractur", "fissure"),
    "stain": ("stain", "discolo", "smudge", "blot"),
    "hole": ("hole", "punctur", "perforat"),
    "contamination": ("contamin", "dirt", "debris", "speck", "particle", "dust"),
    "dent": ("dent", "ding"),
}
VERB_HELP = {
    "find": "which images have defects of a kind",
    "worst": "the k images with the most of a kind (k = 1 when one is asked for)",
    "count": "how many defect regions of a kind",
    "segment": "a mask of the defects of a kind",
    "describe": "one sentence describing the defect of a kind",
    "refuse": "anything else: not about finding, ranking, counting, segmenting or describing these defects",
}


@dataclass(frozen=True)
class Call:
    """One toolkit call: a verb and its arguments (``kind`` for all verbs but refuse, ``k`` for worst)."""

    verb: str
    kind: str | None = None
    k: int | None = None

    def text(self) -> str:
        if self.verb == "refuse":
            return "refuse()"
        if self.verb == "worst":
            return f"worst(k={self.k}, kind={self.kind})"
        return f"{self.verb}(kind={self.kind})"

    @classmethod
    def parse(cls, text: str) -> Call | None:
        """The call written in ``text`` (exactly one call of the grammar, spaces allowed), else None."""
        text = (text or "").strip()
        if re.fullmatch(r"refuse\(\s*\)", text):
            return cls("refuse")
        kinds = "|".join(KINDS)
        match = re.fullmatch(rf"worst\(\s*k\s*=\s*(\d+)\s*,\s*kind\s*=\s*({kinds})\s*\)", text)
        if match:
            k = int(match.group(1))
            return cls("worst", match.group(2), k) if 1 <= k <= MAX_K else None
        match = re.fullmatch(rf"(find|count|segment|describe)\(\s*kind\s*=\s*({kinds})\s*\)", text)
        return cls(match.group(1), match.group(2)) if match else None


def all_calls() -> list[Call]:
    """Every sentence of the grammar (106 calls)."""
    calls = [Call(verb, kind) for verb in ("find", "count", "segment", "describe") for kind in KINDS]
    calls += [Call("worst", kind, k) for k in range(1, MAX_K + 1) for kind in KINDS]
    return [*calls, Call("refuse")]


def load_heldout_requests(path: str | Path = HELDOUT_REQUESTS) -> list[tuple[str, Call]]:
    """The held-out phrasings as ``(request, expected call)``."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            call = Call.parse(row["call"])
            if call is None:
                raise ValueError(f"{path}: '{row['call']}' is not a call of the grammar")
            rows.append((row["text"], call))
    return rows


# ----------------------------------------------------------------------------------------------- constrained decoding
class TokenTrie:
    """A trie over the token-id sequences of a finite set of strings; a node is a dict ``{token: node}``."""

    END = -1  # key of a node that completes a string

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root: dict[int, Any] = {}
        for seq in sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(int(token), {})
            node[self.END] = {}

    def walk(self, prefix: Sequence[int]) -> dict[int, Any] | None:
        """The node after ``prefix``, or None if ``prefix`` leaves the trie."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return None
        return node


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for tiny test models that have no tokenizer)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


def _encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


class _Stream:
    """One LM continuation: feeds tokens, keeps the KV cache and the last log-probabilities."""

    def __init__(self, model: Any, prompt_ids: Sequence[int], prefix: tuple[list[int], Any] | None = None) -> None:
        self.model, self.device = model, next(model.parameters()).device
        ids, cache = list(prompt_ids), None
        if prefix is not None and ids[: len(prefix[0])] == prefix[0] and len(ids) > len(prefix[0]):
            ids, cache = ids[len(prefix[0]) :], copy.deepcopy(prefix[1])  # reuse the shared prompt's KV cache
        self.cache = cache
        self.feed(ids)

    def feed(self, ids: Sequence[int]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers renames past_key_values; both work here
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device), past_key_values=self.cache,
                             use_cache=True)  # fmt: skip
        self.cache = out.past_key_values
        self.logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)  # (vocab,)


@torch.no_grad()
def constrained_greedy(
    lm: Any,
    prompt_ids: Sequence[int],
    trie: TokenTrie,
    *,
    null_ids: Sequence[int] | None = None,
    prefix: tuple[list[int], Any] | None = None,
    max_steps: int = 64,
) -> list[int]:
    """Greedy decoding of a Hugging Face causal LM after ``prompt_ids``, restricted at every step to the tokens that
    keep the output inside ``trie``; returns the generated ids (a complete sequence of the trie).

    With ``null_ids`` (the same prompt with a content-free request), each step scores log p(token | request) -
    log p(token | content-free), the contextual calibration of Zhao et al. (2021): a small LM's preference for
    some calls whatever the request cancels out. ``prefix`` = (ids, KV cache) of a shared prompt start to reuse.
    Stops at a node that completes a string and has no children, or, where a complete string is also a prefix of
    another, when the LM puts more mass on stopping than on any allowed token."""
    model = getattr(lm, "lm", lm)  # our CausalLM wrapper or a bare HF model
    streams = [_Stream(model, prompt_ids, prefix)] + ([_Stream(model, null_ids, prefix)] if null_ids else [])
    generated: list[int] = []
    node = trie.root
    for _ in range(max_steps):
        allowed = [t for t in node if t != TokenTrie.END]
        if not allowed:
            break
        index = torch.tensor(allowed, device=streams[0].logprobs.device)
        score = streams[0].logprobs[index] - (streams[1].logprobs[index] if null_ids else 0.0)
        token = allowed[int(score.argmax())]
        if TokenTrie.END in node and streams[0].logprobs[token] < streams[0].logprobs.max():
            break
        generated.append(token)
        node = node[token]
        for stream in streams:
            stream.feed([token])
    return generated


def _system_prompt() -> str:
    verbs = "\n".join(f"- {v}: {h}" for v, h in VERB_HELP.items())
    synonyms = "; ".join(f"{kind}: {', '.join(words)}" for kind, words in KIND_SYNONYMS.items())
    return (
        "You turn a request about images of manufactured parts into exactly one call.\n"
        f"Calls: find(kind=K), worst(k=N, kind=K), count(kind=K), segment(kind=K), describe(kind=K), refuse().\n"
        f"{verbs}\nK is one of {', '.join(KINDS)} (any: every kind of defect). Words for each kind: {synonyms}.\n"
        "A request about anything else, or about another kind of defect, is refuse()."
    )


# few-shot examples: written for the prompt, none of them is in requests_heldout.jsonl (a test checks)
PROMPT_EXAMPLES = (
    ("Do any of these parts have cracks?", "find(kind=crack)"),
    ("Is the surface clean or is there dust?", "find(kind=contamination)"),
    ("Is something off with this piece?", "find(kind=any)"),
    ("Show the 4 pictures with the most stains", "worst(k=4, kind=stain)"),
    ("Which image is the most damaged?", "worst(k=1, kind=any)"),
    ("Rank by holes, give me the top two", "worst(k=2, kind=hole)"),
    ("How many dents are on this one?", "count(kind=dent)"),
    ("Count every defect you find", "count(kind=any)"),
    ("What number of scuffs does it show?", "count(kind=scratch)"),
    ("Draw a mask over the holes", "segment(kind=hole)"),
    ("Colour in the cracked area", "segment(kind=crack)"),
    ("Show exactly which pixels are defective", "segment(kind=any)"),
    ("Put the scratch into words", "describe(kind=scratch)"),
    ("Say what the smudge looks like", "describe(kind=stain)"),
    ("Give a one-line summary of the defect", "describe(kind=any)"),
    ("What time is it?", "refuse()"),
    ("Book a meeting room for tomorrow", "refuse()"),
    ("Are there any bubbles in the paint?", "refuse()"),
)


class LMRouter:
    """Grammar-constrained greedy routing on a causal LM (``CausalLM`` or a bare HF model) and its tokenizer.

    Example:
        LMRouter(create_model("smollm2_135m", pretrained=True)).route("count the holes")  # Call('count', 'hole')
    """

    NULL_REQUEST = "N/A"  # the content-free request of contextual calibration

    def __init__(
        self, lm: Any, tokenizer: Any = None, *, chat_template: bool | None = None, calibrate: bool = False
    ) -> None:
        self.lm = lm.eval()
        self.calibrate = calibrate
        self._prefix: tuple[list[int], Any] | None = None
        self.tokenizer = tokenizer if tokenizer is not None else lm.tokenizer
        self.calls = all_calls()
        self.trie = TokenTrie([_encode(self.tokenizer, call.text()) for call in self.calls])
        self.by_ids = {tuple(_encode(self.tokenizer, call.text())): call for call in self.calls}
        self.chat_template = (
            chat_template if chat_template is not None else hasattr(self.tokenizer, "apply_chat_template")
        )

    def prompt_ids(self, request: str) -> list[int]:
        """The prompt the LM continues: system message, the few-shot turns, the request, the assistant's turn."""
        if self.chat_template:
            messages = [{"role": "system", "content": _system_prompt()}]
            for text, call in PROMPT_EXAMPLES:
                messages += [{"role": "user", "content": text}, {"role": "assistant", "content": call}]
            messages.append({"role": "user", "content": request})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return _encode(self.tokenizer, text)
        shots = "".join(f"request: {t}\ncall: {c}\n" for t, c in PROMPT_EXAMPLES)
        return _encode(self.tokenizer, f"{shots}request: {request}\ncall: ")

    @torch.no_grad()
    def route(self, request: str) -> Call:
        """The call the LM writes for ``request`` (always a call of the grammar)."""
        ids, null = self.prompt_ids(request), self.prompt_ids(self.NULL_REQUEST) if self.calibrate else None
        if self._prefix is None:  # the prompt up to the request is the same for every request: encode it once
            other = self.prompt_ids(self.NULL_REQUEST + " x")
            shared = next((i for i, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b), 0)
            shared = min(shared, len(null or ids)) - 1
            if shared > 0:
                self._prefix = (ids[:shared], _Stream(getattr(self.lm, "lm", self.lm), ids[:shared]).cache)
        generated = constrained_greedy(self.lm, ids, self.trie, null_ids=null, prefix=self._prefix)
        return self.by_ids[tuple(generated)]


# ----------------------------------------------------------------------------------------------- keyword baseline
_NUMBERS = {w: i for i, w in enumerate(("one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                        "ten"), start=1)}  # fmt: skip
_DESCRIBE_WORDS = ("describe", "description", "look like", "tell me about", "sentence", "characteri", "shape",
                  "in words", "explain")  # fmt: skip
_FIND_WORDS = ("find", "check", "look for", "any", "is there", "are there", "does", "has", "which", "search", "flag",
               "locate", "spot", "scan", "inspect", "see", "defective", "wrong", "contain")  # fmt: skip
_VERB_KEYWORDS = (  # first match wins, in this order
    ("worst", ("worst", "most", "top", "rank", "biggest", "largest")),
    ("count", ("how many", "count", "number of")),
    ("describe", _DESCRIBE_WORDS),
    ("segment", ("segment", "mask", "outline", "highlight", "mark", "paint", "pixels", "show me where")),
    ("find", _FIND_WORDS),
)
_GENERIC = ("defect", "wrong", "part", "image", "picture", "anything", "sample")


class KeywordRouter:
    """The baseline: verb keywords (first match wins), kind synonyms, a number word or digit for ``k``; refuse when
    no verb matches, or when neither a kind nor a generic word (defect, part, image, ...) is named."""

    def route(self, request: str) -> Call:
        text = f" {(request or '').lower()} "
        verb = next((v for v, words in _VERB_KEYWORDS if any(w in text for w in words)), None)
        kinds = [k for k, stems in KIND_SYNONYMS.items() if any(re.search(rf"\b{s}", text) for s in stems)]
        if verb is None or (not kinds and not any(g in text for g in _GENERIC)):
            return Call("refuse")
        kind = kinds[0] if kinds else "any"
        if verb != "worst":
            return Call(verb, kind)
        digits = re.search(r"\b(\d+)\b", text)
        words = [n for w, n in _NUMBERS.items() if re.search(rf"\b{w}\b", text)]
        k = int(digits.group(1)) if digits else (words[0] if words else 1)
        return Call("worst", kind, min(max(k, 1), MAX_K))


def routing_accuracy(router: Callable[[str], Call], rows: Sequence[tuple[str, Call]]) -> dict[str, Any]:
    """Exact-call accuracy (verb and every argument), verb accuracy, and accuracy per expected verb."""
    got = [router(text) for text, _ in rows]
    exact = [g == want for g, (_, want) in zip(got, rows, strict=True)]
    per_verb = {v: [e for e, (_, want) in zip(exact, rows, strict=True) if want.verb == v] for v in VERBS}
    return {
        "exact": sum(exact) / len(rows),
        "verb": sum(g.verb == want.verb for g, (_, want) in zip(got, rows, strict=True)) / len(rows),
        "per_verb": {v: sum(e) / len(e) for v, e in per_verb.items() if e},
        "calls": [g.text() for g in got],
    }
