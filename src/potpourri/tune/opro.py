"""OPRO (Yang et al., "Large Language Models as Optimizers", ICLR 2024): an optimisation loop driven by proposals.

Each step builds a *meta-prompt*: the task description, then the best ``max_pairs`` past (solution, score) pairs
sorted by score **ascending** (best last, as in ``opro/optimization/opt_utils.py``), scores bucketed to integers,
then the instruction to write a better solution. A *proposer* turns the meta-prompt into ``per_step`` texts; each is
parsed into a solution, scored by the objective and added to the history. Every proposal counts against the budget,
whether it parses or not; duplicates reuse their cached score (no second evaluation).

Proposers: ``LMProposer`` (a local causal LM, e.g. SmolLM2-135M-Instruct, sampled at temperature 1 as in OPRO) and
``RandomProposer`` (ignores the prompt: random search through the same loop and accounting).

Example:
    space = SearchSpace([Param("lr", 1e-5, 1.0, log=True), Param("epochs", 1, 60, integer=True)])
    result = opro_search(objective, space, RandomProposer(space), budget=40, seed=0)
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from potpourri.core.errors import PotpourriError

__all__ = [
    "LMProposer",
    "OproResult",
    "Param",
    "Proposer",
    "RandomProposer",
    "SearchSpace",
    "bucketize",
    "meta_prompt",
    "opro_search",
]

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*[eE]\s*[-+]?\s*\d+|\s*[x×*]\s*10\s*\^\s*[-+]?\d+)?"


# ----------------------------------------------------------------------------------------------------------------
# the solution space: format and parse


@dataclass
class Param:
    """One numeric knob: bounds, log scale for sampling, integer or not, and the names a text may call it."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    aliases: tuple[str, ...] = ()

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(round(value)) if self.integer else float(f"{value:.2g}")

    def format(self, value: float) -> str:
        return str(int(value)) if self.integer else f"{value:.2g}"

    def valid(self, value: float) -> bool:
        return math.isfinite(value) and self.low <= value <= self.high


def _to_float(text: str) -> float:
    text = re.sub(r"\s+", "", text)
    power = re.fullmatch(r"(.+?)[x×*]10\^([-+]?\d+)", text)
    if power:
        return float(power.group(1)) * 10.0 ** int(power.group(2))
    return float(text)


@dataclass
class SearchSpace:
    """Named numeric parameters; solutions are ``{name: value}`` written as ``name=value, name=value``."""

    params: list[Param]

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        return {p.name: p.sample(rng) for p in self.params}

    def format(self, solution: dict[str, float]) -> str:
        return ", ".join(f"{p.name}={p.format(solution[p.name])}" for p in self.params)

    def key(self, solution: dict[str, float]) -> tuple[float, ...]:
        """Duplicate detection at the precision solutions are written with."""
        return tuple(float(p.format(solution[p.name])) for p in self.params)

    def parse(self, text: str) -> dict[str, float] | None:
        """The first complete, in-range solution in ``text`` (``<sol>…</sol>`` first), else None.

        Tolerates ``lr: 3e-4``, ``learning rate = 0.001``, ``epochs=20.0``, ``1.5 x 10^-3``, brackets and prose.
        """
        chunks = [*re.findall(r"<sol>(.*?)(?:</sol>|$)", text, flags=re.S | re.I), text]
        for chunk in chunks:
            solution = {}
            for p in self.params:
                names = "|".join(re.escape(n).replace(r"\ ", r"[\s_-]?") for n in (p.name, *p.aliases))
                pattern = rf"(?<![a-z])(?:{names})\b(?:\s*(?:of|is|to|at|be)\b)?[\s:=\[(\"']*({_NUMBER})"
                match = re.search(pattern, chunk, flags=re.I)
                if not match:
                    break
                try:
                    value = _to_float(match.group(1))
                except ValueError:
                    break
                if p.integer:
                    if abs(value - round(value)) > 1e-6:
                        break
                    value = float(round(value))
                if not p.valid(value):
                    break
                solution[p.name] = value
            if len(solution) == len(self.params):
                return solution
        return None


# ----------------------------------------------------------------------------------------------------------------
# the meta-prompt


def bucketize(score: float, num_buckets: int = 100) -> int:
    """A score in [0, 1] as an integer in 0..num_buckets (OPRO shows accuracies as rounded percentages)."""
    return round(min(max(score, 0.0), 1.0) * num_buckets)


def meta_prompt(
    history: Sequence[tuple[dict[str, float], float]],
    space: SearchSpace,
    *,
    task: str,
    max_pairs: int = 20,
    num_buckets: int = 100,
) -> str:
    """OPRO's meta-prompt: task, then the top ``max_pairs`` (solution, bucketed score) pairs, ascending, then the ask.

    Pairs are deduplicated by their written form (the best score kept); ties in score keep the older pair first.
    """
    best: dict[str, tuple[float, int]] = {}
    for order, (solution, score) in enumerate(history):
        text = space.format(solution)
        if text not in best or score > best[text][0]:
            best[text] = (score, best.get(text, (score, order))[1])
    pairs = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:max_pairs]
    pairs.sort(key=lambda kv: (kv[1][0], -kv[1][1]))  # ascending: the best comes last, next to the instruction
    names = ", ".join(p.name for p in space.params)
    ranges = "; ".join(
        f"{p.name} between {p.format(p.low)} and {p.format(p.high)}{' (integer)' if p.integer else ''}"
        for p in space.params
    )
    lines = [
        task,
        f"Each solution sets {names} ({ranges}).",
        f"Below are previous solutions with their scores (0 to {num_buckets}, higher is better), "
        "in ascending order of score.",
        "",
    ]
    for text, (score, _) in pairs:
        lines += [f"solution: {text}", f"score: {bucketize(score, num_buckets)}", ""]
    example = space.format({p.name: p.low for p in space.params})
    lines.append(
        "Write a new solution that is different from all the solutions above and has a higher score than all of "
        f"them. Write it in the same form inside <sol> and </sol>, e.g. <sol>{example}</sol>."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# proposers


class Proposer(Protocol):
    """Turns a meta-prompt into ``n`` raw texts (parsed by the loop)."""

    name: str

    def propose(self, prompt: str, n: int, rng: np.random.Generator) -> list[str]: ...


@dataclass
class RandomProposer:
    """Random search through the same loop: ignores the prompt, samples the space (log-uniform where marked)."""

    space: SearchSpace
    name: str = "random"

    def propose(self, prompt: str, n: int, rng: np.random.Generator) -> list[str]:
        return [f"<sol>{self.space.format(self.space.sample(rng))}</sol>" for _ in range(n)]


class LMProposer:
    """Samples ``n`` answers from a local causal LM (``CausalLM``) through its chat template, temperature 1.

    The prompt is encoded once and its KV cache repeated for the ``n`` samples. ``prefill`` starts the assistant's
    answer (default ``<sol>``: a format nudge, not a value; OPRO's GPT models needed none); a row stops at EOS or
    once it contains ``stop``.
    """

    def __init__(
        self,
        lm: Any,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 40,
        prefill: str = "<sol>",
        stop: str | None = "</sol>",
        name: str = "",
    ) -> None:
        self.lm, self.temperature, self.max_new_tokens, self.prefill = lm, temperature, max_new_tokens, prefill
        self.stop = stop
        self.name = name or "lm"

    @torch.no_grad()
    def propose(self, prompt: str, n: int, rng: np.random.Generator) -> list[str]:
        tok = self.lm.tokenizer
        chat = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(chat + self.prefill, return_tensors="pt", add_special_tokens=False).input_ids  # (1, T)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        out = self.lm.lm(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        cache_arg = "cache" if "cache" in inspect.signature(self.lm.lm.forward).parameters else "past_key_values"
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat(n, 1)  # (n, V)
        eos = tok.eos_token_id
        tokens = torch.empty(n, 0, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for step in range(self.max_new_tokens):
            probs = torch.softmax(logits / max(self.temperature, 1e-6), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == eos
            if self.stop and step % 4 == 3:  # a row that closed its solution needs no more tokens
                done |= torch.tensor([self.stop in tok.decode(row, skip_special_tokens=True) for row in tokens])
            if done.all():
                break
            mask = torch.ones(n, ids.shape[1] + step + 1, dtype=torch.long)
            out = self.lm.lm(input_ids=nxt[:, None], attention_mask=mask, use_cache=True, **{cache_arg: cache})
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return [self.prefill + tok.decode(row, skip_special_tokens=True) for row in tokens]


# ----------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class OproResult:
    """Best solution, its score, and the full trace of proposals (valid or not) with the budget accounting."""

    best: dict[str, float]
    best_score: float
    trace: list[dict[str, Any]]
    proposals: int
    evaluations: int
    invalid: int
    duplicates: int
    seconds: dict[str, float] = field(default_factory=dict)

    def best_so_far(self) -> list[float]:
        """Best score after each proposal (invalid proposals repeat the previous best)."""
        best, curve = -math.inf, []
        for row in self.trace:
            if row["score"] is not None:
                best = max(best, row["score"])
            curve.append(best)
        return curve


def opro_search(
    objective: Callable[[dict[str, float]], float],
    space: SearchSpace,
    proposer: Proposer,
    *,
    budget: int,
    per_step: int = 8,
    max_pairs: int = 20,
    num_buckets: int = 100,
    initial: Sequence[dict[str, float]] = (),
    task: str = "Find a solution with a high score.",
    seed: int = 0,
    progress: bool = False,
) -> OproResult:
    """Run OPRO for ``budget`` proposals (``initial`` solutions count too); higher objective is better.

    Example:
        result = opro_search(lambda s: -abs(s["x"] - 3), SearchSpace([Param("x", 0, 10)]), proposer, budget=16)
    """
    if budget < 1 or per_step < 1:
        raise PotpourriError(f"budget and per_step must be >= 1, got {budget} and {per_step}")
    rng = np.random.default_rng(seed)
    history: list[tuple[dict[str, float], float]] = []
    cache: dict[tuple[float, ...], float] = {}
    trace: list[dict[str, Any]] = []
    timing = {"propose": 0.0, "evaluate": 0.0}
    from tqdm.auto import tqdm

    bar = tqdm(total=budget, desc=f"opro/{proposer.name}", unit="proposal", disable=not progress)

    def consider(text: str, step: int) -> None:
        solution = space.parse(text)
        row: dict[str, Any] = {"step": step, "text": text, "solution": solution, "score": None, "duplicate": False}
        if solution is not None:
            key = space.key(solution)
            row["duplicate"] = key in cache
            if key not in cache:
                started = time.perf_counter()
                cache[key] = float(objective(solution))
                timing["evaluate"] += time.perf_counter() - started
            row["score"] = cache[key]
            history.append((solution, cache[key]))
        trace.append(row)
        bar.update(1)

    for solution in list(initial)[:budget]:
        consider(f"<sol>{space.format(solution)}</sol>", 0)
    step = 0
    while len(trace) < budget:
        step += 1
        prompt = meta_prompt(history, space, task=task, max_pairs=max_pairs, num_buckets=num_buckets)
        started = time.perf_counter()
        texts = proposer.propose(prompt, min(per_step, budget - len(trace)), rng)
        timing["propose"] += time.perf_counter() - started
        for text in texts[: budget - len(trace)]:
            consider(text, step)
    bar.close()
    valid = [(i, r) for i, r in enumerate(trace) if r["score"] is not None]
    if not valid:
        raise PotpourriError(f"no proposal of '{proposer.name}' parsed into a solution in {budget} tries")
    _, best_row = max(valid, key=lambda ir: (ir[1]["score"], -ir[0]))
    return OproResult(
        best=best_row["solution"],
        best_score=best_row["score"],
        trace=trace,
        proposals=len(trace),
        evaluations=len(cache),
        invalid=sum(r["solution"] is None for r in trace),
        duplicates=sum(r["duplicate"] for r in trace),
        seconds=timing,
    )


# ----------------------------------------------------------------------------------------------------------------
# reproduce opro: tune a cached linear probe
