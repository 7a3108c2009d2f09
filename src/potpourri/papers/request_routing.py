"""``potpourri reproduce request-routing``: plain-language requests → toolkit calls, SmolLM2 vs keywords.

Not a paper's method: the talk's other closing question ("will most models become interactive with the help of an
LLM?") asked of SmolLM2-135M-Instruct. The router (``vlm/router.py``) decodes greedily under a grammar of the
toolkit's calls, so its output always parses; the question is whether it is the *right* call. Scored by exact call
(verb and arguments) on the 105 held-out phrasings of ``vlm/requests_heldout.jsonl`` (committed before the router),
against the keyword baseline. The prompt variants were chosen on the 20 ``DEV_REQUESTS`` below, not on the
held-out file; all variants are reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from potpourri.core.training import TrainOptions

__all__ = ["DEV_REQUESTS", "RoutingConfig", "reproduce_routing", "run"]

# the tuning set of the prompt (disjoint from the held-out file; a test checks)
DEV_REQUESTS = (
    ("Are there scratches on these?", "find(kind=scratch)"), ("which ones have holes in them", "find(kind=hole)"),
    ("any stains at all?", "find(kind=stain)"), ("show the three worst cracks", "worst(k=3, kind=crack)"),
    ("top five parts with dents", "worst(k=5, kind=dent)"), ("the single worst image", "worst(k=1, kind=any)"),
    ("how many specks of dust are there", "count(kind=contamination)"),
    ("count the cracks please", "count(kind=crack)"),
    ("segment the dents", "segment(kind=dent)"), ("outline the scratch", "segment(kind=scratch)"),
    ("describe the stain", "describe(kind=stain)"), ("what does the hole look like", "describe(kind=hole)"),
    ("what's your favourite colour", "refuse()"), ("shut down the server", "refuse()"),
    ("is this part broken?", "find(kind=any)"), ("how many defects", "count(kind=any)"),
    ("highlight the dirt", "segment(kind=contamination)"),
    ("give me the two most scuffed parts", "worst(k=2, kind=scratch)"),
    ("find me some rust", "refuse()"), ("describe any defect you see", "describe(kind=any)"),
)  # fmt: skip


@dataclass
class RoutingConfig:
    lm: str = "smollm2_135m"
    variants: tuple[str, ...] = ("chat", "chat+calibrated", "plain+calibrated")  # "chat" is LMRouter's default
    limit: int = 0  # score only the first N phrasings of each set (0: all)


def reproduce_routing(cfg: RoutingConfig, out: str | None = None, *, quick: bool = False):
    """Route the dev and held-out phrasings with the keyword baseline and each LM variant; write results.md."""
    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run
    from potpourri.vlm.router import Call, KeywordRouter, LMRouter, load_heldout_requests, routing_accuracy

    started = time.perf_counter()
    run = new_run("reproduce-request-routing", out, config=asdict(cfg), seed=0)
    sets = {"dev": [(t, Call.parse(c)) for t, c in DEV_REQUESTS], "held-out": load_heldout_requests()}
    if cfg.limit:
        sets = {name: rows[: cfg.limit] for name, rows in sets.items()}
    lm = create_model(cfg.lm, pretrained=True).eval()
    routers = {"keywords (baseline)": KeywordRouter().route}
    for variant in cfg.variants:
        router = LMRouter(lm, chat_template=variant.startswith("chat"), calibrate=variant.endswith("calibrated"))
        routers[f"{cfg.lm} {variant}"] = router.route
    rows, seconds = [], {}
    for name, route in routers.items():
        tick = time.perf_counter()
        scores = {split: routing_accuracy(route, pairs) for split, pairs in sets.items()}
        seconds[name] = time.perf_counter() - tick
        rows.append({"router": name, **{f"{s}_{m}": scores[s][m] for s in sets for m in ("exact", "verb")},
                     "per_verb": scores["held-out"]["per_verb"], "calls": scores["held-out"]["calls"]})  # fmt: skip
    verbs = list(rows[0]["per_verb"])
    lines = [
        f"Plain-language routing: exact call (verb + arguments) on {len(sets['held-out'])} held-out phrasings and "
        f"{len(sets['dev'])} dev phrasings (the prompt was chosen on dev){'; QUICK smoke run' if quick else ''}. "
        "Greedy decoding under the call grammar; deterministic (no sampling).",
        "",
        "| router | held-out exact | held-out verb | dev exact | dev verb | s / request |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['router']} | {r['held-out_exact']:.3f} | {r['held-out_verb']:.3f} | {r['dev_exact']:.3f} | "
            f"{r['dev_verb']:.3f} | {seconds[r['router']] / sum(map(len, sets.values())):.2f} |"
            for r in rows
        ),
        "",
        "Held-out exact accuracy per expected verb:",
        "",
        "| router | " + " | ".join(verbs) + " |",
        "|---|" + "---|" * len(verbs),
        *(f"| {r['router']} | " + " | ".join(f"{r['per_verb'][v]:.2f}" for v in verbs) + " |" for r in rows),
        "",
        f"Total {time.perf_counter() - started:.0f} s.",
    ]
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary({"rows": rows, "requests": {s: [t for t, _ in p] for s, p in sets.items()}})
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None):
    """``potpourri reproduce request-routing`` (or its smoke run: 3 phrasings per set, the default variant)."""
    cfg = RoutingConfig(variants=("chat",), limit=3) if quick else RoutingConfig()
    return reproduce_routing(cfg, out, quick=quick)
