"""``potpourri reproduce clip-small``: a CLIP-style model trained here (timm ViT + MiniLM-L6), zero-shot on surfaces
it never saw.

Training data: DS-Synth *train* crops of three surfaces (brick, grass, gravel) with their captions, a close-up of
every defect with its words, and the clutter set. Evaluation: DS-Synth *test* crops of two held-out surfaces (moon,
tissue), never seen in training, and, as the in-distribution reference, test crops of the training surfaces. Arms:
MiniLM frozen vs its last layer tuned, and the untrained model as a control. Re-running the same command with the
same ``--out`` resumes an arm from its checkpoint, or reuses an arm that finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run, new_run, seed_everything
from potpourri.core.training import TrainOptions
from potpourri.data.captions import CaptionPairs, clutter_pairs, concat_pairs, synth_pairs
from potpourri.models.clip_small import DEFAULT_CONFIG, WEIGHTS_FILE, SmallClip, load_small_clip
from potpourri.vlm.clip import (
    ClipTrainConfig,
    embed_images,
    retrieval,
    save_small_clip,
    train_small_clip,
    zero_shot_classification,
)

__all__ = ["ClipSmallConfig", "clip_model_folder", "clip_run_for_seed", "clip_surfaces", "reproduce_clip_small", "run",
           "tiny_clip"]  # fmt: skip


@dataclass
class ClipSmallConfig:
    """Every knob of ``reproduce clip-small``."""

    train_surfaces: tuple[str, ...] = ("brick", "grass", "gravel")
    held_out: tuple[str, ...] = ("moon", "tissue")
    image_size: int = 128
    train_per_kind: int = 60  # images per kind (good, six defects, multi) and training surface
    clutter: int = 600
    test_per_kind: int = 20
    vision: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG["vision"]))
    text: dict[str, Any] = field(default_factory=dict)  # MiniLM overrides (the quick run shrinks a random one)
    text_pretrained: bool = True
    embed_dim: int = 256
    text_arms: tuple[int, ...] = (0, 1)  # tuned MiniLM layers, one trained model per value
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    progress: bool = True
    checkpoint_every: int = 100  # steps; a killed run loses at most this many


def model_config(cfg: ClipSmallConfig, tuned_text_layers: int) -> dict[str, Any]:
    return {"vision": cfg.vision, "text": cfg.text, "embed_dim": cfg.embed_dim, "tuned_text_layers": tuned_text_layers,
            "text_pretrained": cfg.text_pretrained}  # fmt: skip


def build_model(cfg: ClipSmallConfig, tuned_text_layers: int) -> SmallClip:
    from potpourri.core.registry import create_model

    seed_everything(cfg.train.seed)
    config = model_config(cfg, tuned_text_layers)
    config.pop("text_pretrained")
    return create_model("clip_vit_tiny_minilm", text_pretrained=cfg.text_pretrained, **config)


def model_card(cfg: ClipSmallConfig, arm: int, train: CaptionPairs, losses: list[float], scores: dict) -> str:
    sources = {s: train.sources.count(s) for s in ("image", "crop", "clutter")}
    held, seen = scores["held_out"], scores["seen"]
    return "\n".join(
        [
            f"# clip_vit_tiny_minilm — tuned MiniLM layers: {arm}",
            "",
            f"Image tower: timm ViT {cfg.vision}, trained from scratch. Text tower: MiniLM-L6 "
            f"({'pretrained all-MiniLM-L6-v2' if cfg.text_pretrained else 'random'}), frozen except its last {arm} "
            f"layer(s). Joint space {cfg.embed_dim}-d, learned temperature. Input: {cfg.image_size} px RGB, "
            "x/127.5 - 1.",
            "",
            "## Data",
            f"- DS-Synth train split of {', '.join(cfg.train_surfaces)}: {sources['image']} images with captions, "
            f"{sources['crop']} defect close-ups with the defect's words; clutter set: {sources['clutter']} images "
            f"({len(set(train.captions))} distinct captions).",
            f"- Never seen: the surfaces {', '.join(cfg.held_out)} (all numbers below marked held-out are zero-shot "
            "with respect to them); the DS-Synth test split of any surface.",
            "",
            "## Training",
            f"- {cfg.train.steps} steps, batch {cfg.train.batch_size}, AdamW lr {cfg.train.lr} (tuned text layers "
            f"{cfg.train.text_lr}), wd {cfg.train.weight_decay}, warm-up {cfg.train.warmup}, cosine; seed "
            f"{cfg.train.seed}; loss {losses[0]:.3f} → {sum(losses[-20:]) / len(losses[-20:]):.3f} "
            "(mean of the last 20).",
            "",
            "## What it can do (measured)",
            f"- Zero-shot 7-way defect classification on held-out surfaces: {held['classification']['accuracy']:.3f} "
            f"(chance {held['classification']['chance']:.3f}); on the training surfaces' test split "
            f"{seen['classification']['accuracy']:.3f}.",
            f"- Image→caption R@1 on held-out surfaces {held['retrieval']['i2t_r1']:.3f} (chance "
            f"{held['retrieval']['i2t_r1_chance']:.3f}); caption→image R@1 {held['retrieval']['t2i_r1']:.3f} "
            f"(chance {held['retrieval']['t2i_r1_chance']:.3f}).",
            "",
            "## What it cannot do",
            "- It knows nothing beyond DS-Synth's five textures, its six procedural defect types, its caption grammar "
            "and the clutter shapes; it is not a general CLIP and was never compared with one.",
            "- Held-out surfaces carry the same procedural defect types as training: zero-shot here means an unseen "
            "texture, not an unseen kind of defect.",
            "",
        ]
    )


def _arm(cfg: ClipSmallConfig, arm: int, train: CaptionPairs, folder: Path, options: TrainOptions):
    """Train one arm into ``folder`` (resuming from its checkpoints), or load it when it already finished."""
    config = model_config(cfg, arm)
    done = folder / WEIGHTS_FILE
    if done.is_file() and (folder / "train.json").is_file():
        record = json.loads((folder / "train.json").read_text())
        if record["model"] == config and record["train"] == asdict(cfg.train):
            return load_small_clip(folder), record["losses"], 0.0
    model = build_model(cfg, arm)
    checkpoints = folder / "checkpoints"
    resume = (checkpoints / "last.json").is_file()
    start = time.perf_counter()
    losses = train_small_clip(model, train, cfg.train, options=replace(options, resume=resume, progress=cfg.progress,
                                                  checkpoint_every=options.checkpoint_every or cfg.checkpoint_every),
                              folder=checkpoints)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"model": config, "train": asdict(cfg.train), "losses": losses}))
    return model, losses, time.perf_counter() - start


def reproduce_clip_small(cfg: ClipSmallConfig, *, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train every text arm, evaluate zero-shot on held-out surfaces; writes ``results.md`` and ``summary.json``.

    Example:
        run = reproduce_clip_small(ClipSmallConfig(text_arms=(0,))); print((run.path / "results.md").read_text())
    """
    started = time.perf_counter()
    options = options or TrainOptions(progress=False)
    overlap = set(cfg.train_surfaces) & set(cfg.held_out)
    if overlap:
        from potpourri.core.errors import PotpourriError

        raise PotpourriError(f"surfaces {sorted(overlap)} are both trained on and held out; zero-shot needs them apart")
    run = new_run("reproduce-clip-small", out, config=asdict(cfg), seed=cfg.train.seed)
    size, seed = cfg.image_size, cfg.train.seed
    train = concat_pairs(synth_pairs(cfg.train_surfaces, "train", cfg.train_per_kind, size=size, seed=seed),
                         clutter_pairs(cfg.clutter, size=size, seed=seed))  # fmt: skip
    tests = {"held_out": synth_pairs(cfg.held_out, "test", cfg.test_per_kind, size=size, seed=seed, crops=False),
             "seen": synth_pairs(cfg.train_surfaces, "test", cfg.test_per_kind, size=size, seed=seed,
                                 crops=False)}  # fmt: skip

    def evaluate(model: SmallClip) -> dict[str, Any]:
        model.eval()
        return {name: {"classification": zero_shot_classification(model, pairs), "retrieval": retrieval(model, pairs)}
                for name, pairs in tests.items()}  # fmt: skip

    rows: dict[str, dict[str, Any]] = {"untrained (random ViT, frozen MiniLM)": evaluate(build_model(cfg, 0))}
    arms: dict[int, dict[str, Any]] = {}
    for arm in cfg.text_arms:
        folder = run.path / f"text-tuned-{arm}"
        model, losses, seconds = _arm(cfg, arm, train, folder, options)
        scores = evaluate(model)
        saved = {**model_config(cfg, arm), "trained_on": list(cfg.train_surfaces), "held_out": list(cfg.held_out)}
        save_small_clip(model, folder, saved, model_card(cfg, arm, train, losses, scores))
        reloaded = load_small_clip(folder)
        probe = tests["held_out"].images[:4]
        reload_diff = float((embed_images(reloaded, probe) - embed_images(model, probe)).abs().max())
        arms[arm] = {"folder": str(folder), "scores": scores, "loss_first": losses[0], "loss_last": losses[-1],
                     "train_s": round(seconds, 1), "reload_max_diff": reload_diff}  # fmt: skip
        rows[f"trained, MiniLM last {arm} layer(s) tuned" if arm else "trained, MiniLM frozen"] = scores
        run.log_metrics({"arm": arm, "loss_first": losses[0], "loss_last": losses[-1], "train_s": seconds})
    # the model other experiments use: the arm best on the training surfaces' test split (held-out surfaces unused)
    chosen = max(arms, key=lambda a: arms[a]["scores"]["seen"]["classification"]["accuracy"])
    held = arms[chosen]["scores"]["held_out"]
    verdict = {
        "zero_shot_above_chance": held["classification"]["accuracy"] > held["classification"]["chance"],
        "i2t_above_chance": held["retrieval"]["i2t_r1"] > held["retrieval"]["i2t_r1_chance"],
        "t2i_above_chance": held["retrieval"]["t2i_r1"] > held["retrieval"]["t2i_r1_chance"],
        "chosen_text_arm": chosen,
    }
    lines = [
        f"# A CLIP-style model trained here: ViT {cfg.vision.get('embed_dim')}-wide x {cfg.vision.get('depth')} + "
        f"MiniLM-L6 ({cfg.image_size} px)",
        "",
        f"Trained on DS-Synth train crops of {', '.join(cfg.train_surfaces)} ({len(train)} pairs incl. close-ups and "
        f"{cfg.clutter} clutter images), {cfg.train.steps} steps, seed {seed}. **Held-out** = DS-Synth test crops of "
        f"{', '.join(cfg.held_out)}, surfaces never seen in training (zero-shot w.r.t. them); **seen** = test crops "
        f"of the training surfaces. Classification: 7 classes, one sentence each; retrieval: whole images vs the "
        f"distinct captions of that set.",
        "",
        "| model | set | 7-way acc | chance | i2t R@1 | chance | i2t R@5 | i2t names the kind | chance | t2i R@1 | "
        "chance |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scores in rows.items():
        for split in ("held_out", "seen"):
            c, r = scores[split]["classification"], scores[split]["retrieval"]
            lines.append(f"| {name} | {split.replace('_', '-')} | {c['accuracy']:.3f} | {c['chance']:.3f} | "
                         f"{r['i2t_r1']:.3f} | {r['i2t_r1_chance']:.3f} | {r['i2t_r5']:.3f} | {r['i2t_kind']:.3f} | "
                         f"{r['i2t_kind_chance']:.3f} | {r['t2i_r1']:.3f} | {r['t2i_r1_chance']:.3f} |")  # fmt: skip
    total = time.perf_counter() - started
    lines += ["", f"Model used downstream (best on the seen surfaces): text arm {chosen}, `{arms[chosen]['folder']}`.",
              f"Verdict: {json.dumps(verdict)}. Total {total / 60:.1f} min on {torch.get_num_threads()} "
              "thread(s)."]  # fmt: skip
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary({"config": asdict(cfg), "rows": rows, "arms": {str(a): v for a, v in arms.items()},
                       "verdict": verdict, "model_folder": arms[chosen]["folder"], "train_pairs": len(train),
                       "seconds": total})  # fmt: skip
    return run


QUICK = ClipSmallConfig(
    image_size=32, train_per_kind=1, clutter=8, test_per_kind=1,
    vision={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    text={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    text_pretrained=False, embed_dim=16, train=ClipTrainConfig(steps=3, batch_size=8, warmup=1), progress=False,
)  # fmt: skip


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0) -> Run:
    """``potpourri reproduce clip-small``: the full study, or a seconds-long smoke run of the same code path;
    ``seed`` seeds the data, the initialisation and the batches."""
    cfg = QUICK if quick else ClipSmallConfig()
    return reproduce_clip_small(replace(cfg, train=replace(cfg.train, seed=seed)), out=out, options=options)


# ----------------------------------------------------------------------------------------------- for the papers that
# use the model: find it (a run or a model folder), check it is zero-shot for their surfaces, or make a tiny one
def clip_surfaces(model_folder: Path) -> list[str] | None:
    """The surfaces a saved clip was trained on: its ``config.json`` or, for older folders, its run's config."""
    import yaml

    trained_on = json.loads((model_folder / "config.json").read_text()).get("trained_on")
    if trained_on:
        return list(trained_on)
    config = model_folder.parent / "config.yaml"
    return list(yaml.safe_load(config.read_text()).get("train_surfaces") or []) or None if config.is_file() else None


def clip_run_for_seed(seed: int) -> str:
    """Where ``reproduce anomalyclip --seed S`` looks for its towers: the ``reproduce clip-small --seed S`` run,
    ``runs/clip-small`` for seed 0 and ``runs/clip-small-seedS`` otherwise."""
    return "runs/clip-small" if seed == 0 else f"runs/clip-small-seed{seed}"


def clip_model_folder(path: str | Path, *, seed: int = 0, held_out: tuple[str, ...] = ()) -> Path:
    """The model folder of a ``reproduce clip-small`` run (its chosen arm) or a model folder itself; one clear error
    when there is none, or when it was trained on one of the ``held_out`` surfaces (then not zero-shot for them)."""
    folder = Path(path)
    if (folder / "summary.json").is_file() and not (folder / "config.json").is_file():
        folder = Path(json.loads((folder / "summary.json").read_text())["model_folder"])
    if not (folder / "config.json").is_file():
        raise PotpourriError(f"no trained clip in '{folder}'; run `potpourri reproduce clip-small --seed {seed} "
                             f"--out {path}` first")  # fmt: skip
    trained_on = clip_surfaces(folder)
    if trained_on and set(trained_on) & set(held_out):
        raise PotpourriError(f"the clip in '{folder}' was trained on {trained_on}: not zero-shot for {list(held_out)}")
    return folder


def tiny_clip(folder: Path) -> Path:
    """A random tiny clip written as a model folder (quick runs: the same loading path, meaningless numbers)."""
    from potpourri.vlm.clip import save_small_clip

    save_small_clip(build_model(QUICK, 0), folder, {**model_config(QUICK, 0), "trained_on": list(QUICK.train_surfaces)},
                    "# random tiny clip (quick run)\n")  # fmt: skip
    return folder
