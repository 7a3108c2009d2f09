"""One plain training loop for every adaptation strategy (nanoGPT-like, read it top to bottom).

AdamW or SGD(+momentum), cosine schedule with linear warm-up, gradient clipping, label smoothing, optional EMA,
``--device`` and ``--precision`` (fp32, bf16, fp16 with a GradScaler), a progress bar, ``metrics.csv`` per epoch.
The repeated parts (backward, clipping, NaN stop, atomic checkpoints with every RNG, resume) are
``core.training.Trainer``'s; ``resume=True`` continues mid-epoch and ends with the same weights on CPU as an
uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from potpourri.core.distributed import join
from potpourri.core.errors import PotpourriError
from potpourri.core.io import save_state_dict_atomic
from potpourri.core.runs import Run, new_run
from potpourri.core.training import (
    EMA,
    NonFiniteLoss,
    Trainer,
    TrainOptions,
    epoch_batches,
    iter_batches,
    lr_at,
    resolve_device,
)
from potpourri.tune.strategies import Plan, apply_bn_policy, recalibrate_bn

__all__ = ["TuneConfig", "TuneResult", "augment_batch", "evaluate", "fit", "lr_at", "train"]

# config keys that may change between a run and its resumption; all others must match
_RESUMABLE_CHANGES = {"epochs", "progress", "device", "precision", "num_workers", "checkpoint_every"}


@dataclass
class TuneConfig:
    """Every knob of the loop; the strategy decides who trains, this decides how."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str | None = None  # adamw | sgd; None: the strategy's default
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # e.g. 0.999; evaluation then uses the EMA weights
    bn: str = "eval"  # eval | train | recalibrate (see strategies.apply_bn_policy)
    augment: bool = False  # random flips and quarter turns of each training image (square inputs)
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: only at epoch ends
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16
    progress: bool = True


@dataclass
class TuneResult:
    """What a training run produced."""

    model: nn.Module
    history: list[dict[str, Any]]
    plan: dict[str, Any]
    steps: int
    seconds: float
    run_path: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def val_acc(self) -> float | None:
        return self.final.get("val_acc")


# ----------------------------------------------------------------------------------------------------------------
# schedule, data order, EMA


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


# ----------------------------------------------------------------------------------------------------------------
# the loop


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``(B, C, S, S)`` under one of the 8 symmetries of the square (flip, then 0-3 quarter turns)."""
    if images.shape[-1] != images.shape[-2]:
        raise PotpourriError(f"augment needs square inputs, got {tuple(images.shape[-2:])}")
    flips = torch.rand(len(images), generator=generator) < 0.5
    turns = torch.randint(0, 4, (len(images),), generator=generator)
    out = [
        torch.rot90(x.flip(-1) if f else x, int(k), dims=(-2, -1)) for x, f, k in zip(images, flips, turns, strict=True)
    ]
    return torch.stack(out)


def _make_optimizer(plan: Plan, cfg: TuneConfig) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(plan.param_groups, lr=cfg.lr, momentum=plan.momentum)
    return torch.optim.AdamW(plan.param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` in eval mode."""
    from potpourri.core.training import autocast

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    batches = epoch_batches(len(data), batch_size, seed=0, epoch=0, shuffle=False, drop_last=False)
    for images, labels in iter_batches(data, batches, 0):
        images, labels = images.to(device), labels.to(device)
        with autocast(device, precision):
            logits = model(images)  # (B, K)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}


def train(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    plan: Plan,
    cfg: TuneConfig,
    *,
    run: Run | str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> TuneResult:
    """Train the parameters ``plan`` left trainable; write checkpoints and metrics into ``run`` when given.

    Under ``torchrun`` each process trains on its slice of every global batch (DistributedDataParallel), rank 0
    evaluates and writes; a global batch smaller than the number of processes is skipped.

    Example:
        plan = get_strategy("linear").prepare(model, lr=1e-2); result = train(model, train, val, plan, TuneConfig())
    """
    device = resolve_device(cfg.device)
    dist = join(device)
    run_path = None if run is None else run.path if isinstance(run, Run) else Path(run)
    if run_path is None or not dist.is_main:
        run = None  # only rank 0 writes run files
    elif not isinstance(run, Run):
        run = new_run("tune", run_path)
    if resume and run_path is None:
        raise PotpourriError("resume needs a run folder; pass --out DIR of the run to resume")

    def global_batches(epoch: int) -> list[list[int]]:
        batches = epoch_batches(
            len(train_data), cfg.batch_size, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle, drop_last=cfg.drop_last
        )
        return [b for b in batches if len(b) >= dist.world]

    steps_per_epoch = len(global_batches(0))
    if steps_per_epoch == 0:
        raise PotpourriError(f"batch size {cfg.batch_size} leaves no batch of {len(train_data)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    config = asdict(cfg)
    model.to(device)
    optimizer = _make_optimizer(plan, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    options = TrainOptions(
        device=str(device),
        precision=cfg.precision,
        grad_clip=cfg.grad_clip,
        checkpoint_every=0,  # mid-epoch checkpoints below, epoch ends always
        resume=resume,
        progress=False,  # one bar per epoch below
    )
    ckpt_dir = run_path / "checkpoints" if run_path is not None else None  # rank 0 writes, every rank resumes
    augment_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)  # checkpointed with the trainer
    trainer = Trainer(model, optimizer, total_steps=total_steps, options=options, folder=ckpt_dir, ema=ema,
                      generators={"augment": augment_gen}, desc="tune")  # fmt: skip

    state: dict[str, Any] = trainer.state
    if resume:
        changed = [k for k, v in config.items() if k not in _RESUMABLE_CHANGES and state["config"].get(k) != v]
        if changed:
            key = changed[0]
            raise PotpourriError(
                f"cannot resume with {key}={config[key]!r}: the run used {state['config'].get(key)!r}; "
                "use the same setting or start a new --out"
            )
        if run is not None:  # metrics.csv restarts from the checkpoint's history (no duplicate rows)
            run = Run(run.path)
            for row in state["history"]:
                run.log_metrics(row)
    else:
        state.update(epoch=0, sums=[0.0, 0, 0], history=[], config=config)
        if run is not None:
            run.write_config({**config, **plan.describe(), "world_size": dist.world})
            run.write_env(cfg.seed)

    started = time.perf_counter()
    from tqdm.auto import tqdm

    step = trainer.step
    lr = lr_at(step, base=cfg.lr, total=total_steps, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            batches = global_batches(epoch)
            done = step - epoch * steps_per_epoch  # batches of this epoch a resumed run already trained on
            shards = [b[dist.rank :: dist.world] for b in batches[done:]]  # this process's slice of each batch
            model.train()
            apply_bn_policy(model, cfg.bn)
            desc = f"epoch {epoch + 1}/{cfg.epochs}"
            bar = tqdm(total=len(batches), initial=done, desc=desc, disable=not (cfg.progress and dist.is_main))
            epoch_start = time.perf_counter()
            for index, (images, labels) in enumerate(iter_batches(train_data, shards, cfg.num_workers), done):
                if cfg.augment:
                    images = augment_batch(images, augment_gen)
                images, labels = images.to(device), labels.to(device)
                lr = lr_at(step, base=cfg.lr, total=total_steps, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                with trainer.autocast():
                    logits = model(images)  # (B, K)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                # global sums of loss, correct, seen: the same on every process, so all stop together on NaN
                stats = torch.tensor(
                    [loss.item() * labels.numel(), (logits.argmax(1) == labels).sum().item(), labels.numel()],
                    dtype=torch.float64,
                    device=device,
                )
                if dist.world > 1:
                    torch.distributed.all_reduce(stats)
                if not math.isfinite(stats[0].item()):
                    bar.close()
                    last = trainer.last_checkpoint
                    kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written yet"
                    raise NonFiniteLoss(
                        f"loss became {stats[0].item() / stats[2].item()} at epoch {epoch + 1} step {step + 1}; "
                        f"stopped, {kept}; lower --lr or set --grad-clip"
                    )
                state["sums"] = [a + b for a, b in zip(state["sums"], stats.tolist(), strict=True)]
                # the trainer averages gradients over processes; weighting by slice size makes that the global mean
                trainer.update(loss * (labels.numel() * dist.world / len(batches[index])))
                step = trainer.step
                bar.update(1)
                bar.set_postfix(loss=f"{stats[0].item() / stats[2].item():.4f}", lr=f"{lr:.2e}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch != 0:
                    trainer.checkpoint()
                if on_step is not None:
                    on_step(step, model)
            bar.close()

            if cfg.bn == "recalibrate":  # every process sees all data, so all keep the same BN statistics
                order = epoch_batches(len(train_data), cfg.batch_size, seed=0, epoch=0, shuffle=False, drop_last=False)
                recalibrate_bn(model, iter_batches(train_data, order, cfg.num_workers))
            loss_sum, correct, seen = state["sums"]
            row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": lr,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
            }
            if val_data is not None and dist.is_main:
                if ema is not None:
                    ema.swap(model)
                metrics = evaluate(
                    model, val_data, batch_size=max(cfg.batch_size, 64), device=device, precision=cfg.precision
                )
                if ema is not None:
                    ema.swap(model)
                row.update(val_loss=metrics["loss"], val_acc=metrics["acc"])
            row["epoch_s"] = round(time.perf_counter() - epoch_start, 4)
            state.update(epoch=epoch + 1, sums=[0.0, 0, 0])
            state["history"].append(row)
            trainer.checkpoint()
            if run is not None:
                run.log_metrics(row)
    finally:
        dist.destroy()

    if ema is not None:  # the result carries the EMA weights, as evaluated
        ema.swap(model)
    seconds = time.perf_counter() - started
    final = dict(state["history"][-1]) if state["history"] else {}
    result = TuneResult(model, state["history"], plan.describe(), step, seconds, run_path, final)
    if run is not None:
        save_state_dict_atomic(model.state_dict(), run.path / "model.safetensors", metadata={"step": str(step)})
        run.write_summary(
            {**final, **plan.describe(), "steps": step, "train_seconds": round(seconds, 3), "world_size": dist.world}
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# the Python entry point


def labels_of(data: Dataset) -> torch.Tensor | None:
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    targets = getattr(data, "targets", None)
    return torch.as_tensor(targets) if targets is not None else None


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None = None,
    strategy: str = "linear",
    *,
    blocks: list[str] | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    cache_features: bool | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    **config: Any,
) -> TuneResult:
    """Adapt ``model`` to ``train_data`` with a named strategy through the one loop; ``config`` fills TuneConfig.

    Example:
        result = fit(model, train_set, val_set, strategy="subtuning", blocks=["blocks.5.0"], epochs=5, lr=1e-3)
    """
    from potpourri.tune.features import extract_features, head_module
    from potpourri.tune.strategies import get_strategy

    known = set(TuneConfig.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise PotpourriError(f"unknown training option '{unknown[0]}'; valid options: {', '.join(sorted(known))}")
    cfg = TuneConfig(**config)
    labels = labels_of(train_data)
    if labels is not None and labels.unique().numel() < 2:
        raise PotpourriError(f"training data has a single class ({labels[0].item()}); a classifier needs at least 2")
    kwargs = dict(strategy_kwargs or {})
    if blocks is not None:
        if strategy not in ("subtuning", "siamese-subtuning"):
            raise PotpourriError(
                f"blocks= only applies to strategies 'subtuning' and 'siamese-subtuning', not '{strategy}'"
            )
        kwargs["blocks"] = list(blocks)
    plan = get_strategy(strategy, **kwargs).prepare(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer
    )
    if cache_features is None:
        cache_features = strategy == "linear" and not cfg.augment  # augmented images cannot use cached features
    if cache_features and cfg.augment:
        raise PotpourriError("augment changes every image: it cannot be combined with cache_features")
    if not cache_features:
        return train(model, train_data, val_data, plan, cfg, run=out, resume=resume)
    if strategy not in ("linear", "subtuning"):
        raise PotpourriError(f"cache_features only applies to strategies 'linear' and 'subtuning', not '{strategy}'")
    device = resolve_device(cfg.device)
    batch = max(cfg.batch_size, 64)
    if strategy == "subtuning":
        trained, cached_train, cached_val = _cached_prefix(model, train_data, val_data, plan, cfg, batch, device)
    else:
        trained = head_module(model, plan.block_map["head"])
        cached_train, cached_val = (
            None if data is None else extract_features(model, data, trained, batch_size=batch, device=device)
            for data in (train_data, val_data)
        )
    result = train(trained, cached_train, cached_val, plan, cfg, run=out, resume=resume)
    result.model = model
    if result.run_path is not None and int(os.environ.get("RANK", "0")) == 0:  # the whole model, not the part trained
        save_state_dict_atomic(model.state_dict(), result.run_path / "model.safetensors", {"step": str(result.steps)})
    return result


def _cached_prefix(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    plan: Plan,
    cfg: TuneConfig,
    batch_size: int,
    device: torch.device,
) -> tuple[nn.Module, TensorDataset, TensorDataset | None]:
    """SubTuning on cached frozen-prefix activations: the suffix from the first tuned block, and the activations
    crossing into it for the train (and val) images; the prefix runs once per image.

    Exact when BN is in eval mode (the prefix is then a fixed function); the same updates as training the model.
    """
    from potpourri.tune.features import SuffixModel, cached_inputs
    from potpourri.tune.multitask import BlockProgram

    if cfg.bn != "eval":
        raise PotpourriError(f"cache_features needs bn='eval' (a frozen prefix must not change); got bn='{cfg.bn}'")
    if not isinstance(train_data, TensorDataset) or (val_data is not None and not isinstance(val_data, TensorDataset)):
        raise PotpourriError("cache_features for subtuning needs TensorDataset inputs (images, labels)")
    program = BlockProgram(model, plan.block_map)
    start = program.branch_point(plan.trainable_entries or ["head"])
    cached = [
        None
        if data is None
        else TensorDataset(
            cached_inputs(model, program, data.tensors[0], [start], batch_size=batch_size, device=device)[start],
            data.tensors[1],
        )
        for data in (train_data, val_data)
    ]
    return SuffixModel(model, program, start), cached[0], cached[1]
