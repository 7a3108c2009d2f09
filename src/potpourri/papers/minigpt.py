"""``reproduce minigpt4`` / ``reproduce minigpt-v2``: MiniGPT-4 vs MiniGPT-v2, the curriculum, the LLM's share.

Every arm is a ``vlm.minigpt.run_phased`` run on the same DS-Synth data (brick; yes/no, list, caption instructions)
with the same total step budget, evaluated after each stage by the same ``vlm.train.score`` + caption ROUGE-L/BLEU-1:

* ``minigpt4``: MiniGPT-4 (Q-Former + one linear, frozen LM; the Q-Former is NOT pretrained here, it trains in
  stage 1 on captions) vs plain MiniGPT-v2 (projection, then projection + LoRA), each also with a random-weight LM;
* ``minigpt-v2``: MiniGPT-v2's three stages (broad captions + region phrases, multi-task, instruction tuning) vs the
  plain two-stage recipe with the same steps, and the curriculum with a random-weight LM.

The full runs use SmolLM2-135M + EfficientNet-Lite0 (about 5-10 s per step on one CPU thread); ``--quick`` runs a tiny
random LLaMA and a random test encoder for a few steps: the same code path, numbers not meaningful.

Example:
    potpourri reproduce minigpt4 --quick
"""

from __future__ import annotations

import json
from typing import Any

from potpourri.core.runs import Run, new_run
from potpourri.core.training import TrainOptions

__all__ = ["base_config", "compare", "run_minigpt4", "run_minigpt_v2"]

SHOWN = ("yesno_acc", "list_f1", "caption_recall", "caption_rouge_l", "caption_bleu1")


def base_config(quick: bool, seed: int = 0) -> dict[str, Any]:
    """The ``vlm train`` options every arm shares (the arms change ``arch``, ``curriculum``, ``random_lm``, steps)."""
    cfg = dict(
        lm="smollm2_135m", encoder="efficientnet_lite0", pretrained=True, image_size=128, categories=["brick"],
        n_train=140, n_test=35, kinds="yesno,list,caption", task_identifiers=True, merge="1x4", vision_norm=True,
        feature_index=-1, position=False, lora_targets="q_proj,v_proj", lora_rank=8, lora_alpha=16.0, lr=1e-3,
        lora_lr=2e-4, batch_size=8, max_new_tokens=48, checkpoint_every=50, seed=seed, num_queries=32,
        steps=150, lora_steps=150, stage3_steps=0, arch="minigpt-v2", curriculum=False, random_lm=False,
        eval_each_stage=True,
    )  # fmt: skip
    if quick:
        cfg.update(lm="tiny", encoder="test_efficientnet", pretrained=False, image_size=64, n_train=7, n_test=3,
                   batch_size=4, max_new_tokens=6, steps=2, lora_steps=2, num_queries=4)  # fmt: skip
    return cfg


def compare(arms: dict[str, dict[str, Any]], out: str | None, options: TrainOptions | None, title: str) -> Run:
    """Run each arm (a ``vlm train`` config) into ``out/<arm>``; write a per-stage table to ``results.md``."""
    from potpourri.vlm.minigpt import run_phased

    run = new_run("reproduce-minigpt", out, config={"arms": arms}, seed=next(iter(arms.values()))["seed"])
    options = options or TrainOptions(progress=False)
    rows, summaries = [], {}
    for name, cfg in arms.items():
        summary = run_phased(cfg, str(run.path / name), options=options).read_summary()
        summaries[name] = summary
        for stage in summary["stages"]:
            values = " | ".join(f"{stage['model'].get(k, float('nan')):.3f}" for k in SHOWN)
            rows.append(f"| {name} | {stage['name']} ({stage['steps']}) | {values} |")
        base = summary["question_only_baseline"]
    values = " | ".join(f"{base.get(k, float('nan')):.3f}" for k in SHOWN)
    rows.append(f"| question-only baseline | — | {values} |")
    lines = [f"# {title}", "", f"| arm | after stage (steps) | {' | '.join(SHOWN)} |",
             "|---|---|" + "---|" * len(SHOWN), *rows, ""]  # fmt: skip
    (run.path / "results.md").write_text("\n".join(lines))
    run.write_summary({"arms": {k: {"stages": v["stages"], "seconds": v["seconds"]} for k, v in summaries.items()}})
    (run.path / "arms.json").write_text(json.dumps(arms, indent=1))
    return run


def run_minigpt4(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """MiniGPT-4 vs MiniGPT-v2 (same data and total steps), each with the real and a random-weight LM."""
    cfg = base_config(quick, seed)
    arms = {
        "minigpt4": {**cfg, "arch": "minigpt4"},
        "minigpt4_random_lm": {**cfg, "arch": "minigpt4", "random_lm": True},
        "minigpt-v2": dict(cfg),
        "minigpt-v2_random_lm": {**cfg, "random_lm": True},
    }
    return compare(arms, out, options, "MiniGPT-4 vs MiniGPT-v2 on DS-Synth (Q-Former trained here, not pretrained)")


def run_minigpt_v2(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """MiniGPT-v2's three-stage curriculum vs the plain two stages with the same total steps, + a random-weight LM."""
    cfg = base_config(quick, seed)
    third = cfg["steps"] // 2
    curriculum = {**cfg, "curriculum": True, "steps": cfg["steps"] - third // 2,
                  "lora_steps": cfg["lora_steps"] - (third - third // 2), "stage3_steps": third}  # fmt: skip
    if quick:
        curriculum.update(steps=2, lora_steps=1, stage3_steps=1)
    arms = {
        "curriculum": curriculum,
        "curriculum_random_lm": {**curriculum, "random_lm": True},
        "two-stage": dict(cfg),
    }
    return compare(arms, out, options, "MiniGPT-v2: three-stage curriculum vs two stages, same total steps")
