"""What every training loop shares: the lr schedule, seeded epoch batches, EMA, device and precision, RNG state,
atomic resumable checkpoints (``last.json`` written last) and ``Trainer``, the one helper every loop steps through.

A loop stays plain PyTorch; ``Trainer`` owns only the repeated parts::

    trainer = Trainer(model, optimizer, total_steps=steps, options=options, folder=run.path / "checkpoints")
    for step in trainer.steps():          # resumes from the last checkpoint with ``options.resume``
        x, y = batch_for(step)            # draw from generators registered with the trainer
        with trainer.autocast():
            loss = loss_fn(model(x.to(trainer.device)), y.to(trainer.device))
        trainer.update(loss)              # NaN stop, backward (GradScaler for fp16), clip, step, EMA, checkpoint
    trainer.finish()
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from potpourri.core.distributed import ProcessGroup, join
from potpourri.core.errors import PotpourriError
from potpourri.core.io import atomic_write_bytes, kill_point, save_state_dict_atomic
from potpourri.core.syncbn import synchronise_batchnorm

T = TypeVar("T")


def lr_at(step: int, *, base: float, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool) -> list:
    """Index batches of one epoch; a function of (seed, epoch) only, so a resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)) if shuffle else None
    order = order.tolist() if order is not None else list(range(n))
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def iter_batches(data: Dataset, batches: list, num_workers: int) -> Iterator:
    if isinstance(data, TensorDataset):  # cached features: index tensors directly, no per-item collation
        for idx in batches:
            index = torch.as_tensor(idx)
            yield tuple(t[index] for t in data.tensors)
        return
    yield from DataLoader(data, batch_sampler=batches, num_workers=num_workers)


class EMA:
    """Exponential moving average of the trainable parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange live and EMA weights (call twice to swap back)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            live = params[name].detach().clone()
            params[name].copy_(shadow)
            shadow.copy_(live)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def load_checkpoint(folder: Path, *, model: nn.Module) -> dict[str, Any]:
    """Load the model weights of ``folder/last.json``'s checkpoint into ``model`` (no optimizer, no RNG); returns
    the checkpoint record. ``Trainer(..., options=TrainOptions(resume=True))`` restores everything."""
    from safetensors.torch import load_file

    last = Path(folder) / "last.json"
    if not last.is_file():
        raise PotpourriError(f"no checkpoint in '{folder}'")
    record = json.loads(last.read_text())
    weights = load_file(str(Path(folder) / f"{record['tag']}.safetensors"))
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("ema.", "module."))})
    return record


# ----------------------------------------------------------------------------------------------------------------
# device and precision

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device; CUDA on a machine without it is one clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise PotpourriError(f"--device '{name}' is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise PotpourriError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise PotpourriError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 …)")
    if not index and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        index = os.environ["LOCAL_RANK"]
    if index:
        torch.cuda.set_device(int(index))
        return torch.device("cuda", int(index))
    return torch.device("cuda")


def choose_device(name: str) -> torch.device:
    """Alias of ``resolve_device`` (older name)."""
    return resolve_device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run: fp16 autocast needs CUDA; bf16 on CUDA needs bf16 support."""
    if precision not in PRECISIONS:
        raise PotpourriError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise PotpourriError("--precision fp16 needs a CUDA device; use --precision bf16 (or fp32) on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PotpourriError("--precision bf16: this GPU has no bf16 support; use --precision fp16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


# ----------------------------------------------------------------------------------------------------------------
# the helper every loop steps through


class NonFiniteLoss(PotpourriError):
    """The loss became NaN or infinite; the last good checkpoint is kept and nothing after it is written."""


@dataclass
class TrainOptions:
    """How a loop runs (not what it learns): device, precision, clipping, checkpoints, resume, best/early stop."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    grad_clip: float | None = None  # max global gradient norm; None or 0: off
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end (and at each ``report``)
    resume: bool = False  # continue from ``folder/last.json``
    progress: bool = True
    patience: int | None = None  # early stop after this many ``report`` calls without improvement
    mode: str = "max"  # whether a larger or smaller reported metric is better
    sync_bn: bool = False  # under torchrun: batch-norm statistics over every process's batch (core.syncbn)


def _generator_state(gen: torch.Generator | np.random.Generator) -> Any:
    return gen.get_state() if isinstance(gen, torch.Generator) else gen.bit_generator.state


class Trainer:
    """The repeated parts of a training loop: device, autocast, backward with clipping (and a GradScaler for fp16),
    NaN stop, EMA, progress bar, atomic checkpoints with every RNG the loop registered, resume, best checkpoint and
    early stopping. ``modules``, ``optimizers``, ``schedulers`` and ``generators`` beyond the first model and
    optimizer are checkpointed too, so a resumed loop ends bitwise where an uninterrupted one does (on CPU).

    Under torchrun it is data-parallel without changing the loop: rank 0's weights go to every process, gradients
    are averaged over processes before clipping (each process's loss is the mean of its own batch: equal batches
    make that the global mean), a non-finite loss on any process stops all, and only rank 0 writes checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        total_steps: int,
        options: TrainOptions | None = None,
        folder: str | os.PathLike | None = None,
        ema: EMA | None = None,
        params: list[nn.Parameter] | None = None,
        modules: dict[str, nn.Module] | None = None,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedulers: dict[str, Any] | None = None,
        generators: dict[str, torch.Generator | np.random.Generator] | None = None,
        desc: str = "train",
    ) -> None:
        self.options = options or TrainOptions()
        self.device = resolve_device(self.options.device)
        check_precision(self.options.precision, self.device)
        self.group: ProcessGroup = join(self.device)  # rank 0 of 1 outside torchrun
        if self.options.sync_bn and self.group.distributed:  # the same parameters, statistics of the global batch
            model = synchronise_batchnorm(model)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.folder = Path(folder) if folder is not None else None
        self.ema = ema
        if ema is not None:  # an EMA built before the trainer follows the model to its device
            ema.shadow = {k: v.to(self.device) for k, v in ema.shadow.items()}
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.modules = {k: m.to(self.device) for k, m in (modules or {}).items()}
        self.optimizers = {**({"main": optimizer} if optimizer is not None else {}), **(optimizers or {})}
        self.schedulers = dict(schedulers or {})
        self.generators = dict(generators or {})
        self.desc = desc
        self.step = 0
        self.state: dict[str, Any] = {}  # the loop's own JSON-able state (history, running sums); checkpointed
        self.best: float | None = None
        self.stale = 0  # reports since the best one
        self.last_checkpoint: Path | None = None
        self.scaler = torch.amp.GradScaler("cuda") if self.options.precision == "fp16" else None
        self._bar: Any = None
        self._broadcast_from_main()
        if self.options.resume:
            self.group.barrier()  # every process is up before any reads rank 0's checkpoint
            self.restore()

    # -- the loop's side ------------------------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """The step indices still to run (from the resumed step), with a progress bar."""
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.total_steps, initial=self.step, desc=self.desc, unit="step", disable=not self.options.progress
        )
        try:
            while self.step < self.total_steps:
                before = self.step
                yield self.step
                if self.step == before:
                    raise PotpourriError(f"{self.desc}: a step of the loop ended without trainer.update(loss)")
        finally:
            self._bar.close()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of ``options.precision`` on this device."""
        return autocast(self.device, self.options.precision)

    def update(self, loss: torch.Tensor, **postfix: Any) -> float:
        """Stop on a non-finite loss, else backward, clip, step every optimizer, EMA, count the step, checkpoint.

        The checkpoint is written inside this call, so record the step's own state (``trainer.state``: running
        sums, logs) before calling it; what a loop changes afterwards belongs to the next step."""
        # the mean over processes: a NaN anywhere reaches every process, so all stop together and none waits in a
        # collective for a stopped one
        value = self.mean_over_processes(loss.detach().float().item())
        if not math.isfinite(value):
            kept = (
                f"last good checkpoint kept: {self.last_checkpoint}"
                if self.last_checkpoint
                else ("no checkpoint was written yet")
            )
            raise NonFiniteLoss(
                f"{self.desc}: loss became {value} at step {self.step + 1}; stopped, {kept}; lower the learning "
                "rate or clip gradients"
            )
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self._average_gradients()  # before unscaling: every process then sees the same inf/NaN check
            for opt in self.optimizers.values():
                self.scaler.unscale_(opt)
        else:
            loss.backward()
            self._average_gradients()
        if self.options.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.grad_clip)
        for opt in self.optimizers.values():
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for scheduler in self.schedulers.values():
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{value:.4f}", **postfix)
        every = self.options.checkpoint_every
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.checkpoint()
        kill_point(self.step)
        return value

    # -- processes (torchrun) -------------------------------------------------------------------------------------

    def shard(self, batch: Sequence[T]) -> tuple[Sequence[T], float]:
        """This process's slice ``batch[rank::world]`` of a global batch, and the factor that turns the mean loss of
        the slice into its share of the global batch's mean: ``trainer.update(loss * factor)`` (1.0 in one process).

        Example:
            local, share = trainer.shard(batch); trainer.update(loss_fn(model(x[local]), y[local]) * share)
        """
        if not self.group.distributed:
            return batch, 1.0
        if len(batch) < self.group.world:
            raise PotpourriError(
                f"a batch of {len(batch)} cannot feed {self.group.world} processes; raise --batch-size to at least "
                f"{self.group.world}"
            )
        local = batch[self.group.rank :: self.group.world]
        return local, len(local) * self.group.world / len(batch)

    def unshard(self, local: torch.Tensor) -> torch.Tensor:
        """The global batch, in its order, from every process's ``shard`` slice (``local`` holds the rows of
        ``batch[rank::world]``); differentiable for this process's rows (``ProcessGroup.gather_rows``: when every
        process computes the same loss of the whole batch, e.g. contrastive negatives, the averaged gradients are the
        one-process gradient of that loss). ``local`` itself in one process."""
        if not self.group.distributed:
            return local
        lengths, world = self.group.all_gather_object(len(local)), self.group.world
        total = sum(lengths)
        if lengths != [len(range(r, total, world)) for r in range(world)]:
            raise PotpourriError(f"unshard: slices of {lengths} rows are not batch[rank::{world}]")
        positions = torch.cat([torch.arange(total)[r::world] for r in range(world)])  # batch position of each row
        return self.group.gather_rows(local)[positions.argsort().to(local.device)]

    def mean_over_processes(self, value: float) -> float:
        """The mean of a number over processes (itself in one process): a loss to log or compare."""
        return self.sums_over_processes({"value": value})["value"] / self.group.world

    def sums_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Each number summed over processes in one all-reduce (the numbers themselves in one process)."""
        if not self.group.distributed or not values:
            return dict(values)
        packed = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(packed)
        return dict(zip(values, packed.tolist(), strict=True))

    def total_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over processes, outside autograd (itself in one process): e.g. a loss's normaliser that
        counts the whole global batch, so sharded losses add up to the one-process loss."""
        if not self.group.distributed:
            return value
        total = value.detach().to(self._comm_device(), torch.float64).clone()
        torch.distributed.all_reduce(total)
        return total.to(value.device, value.dtype)

    def _comm_device(self) -> torch.device:
        """Where collectives run: nccl moves CUDA tensors only."""
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def _broadcast_from_main(self) -> None:
        """Start every process from rank 0's parameters and buffers (as DistributedDataParallel does)."""
        if not self.group.distributed:
            return
        for module in [self.model, *self.modules.values()]:
            for tensor in [*module.parameters(), *module.buffers()]:
                shared = tensor.detach().to(self._comm_device())
                torch.distributed.broadcast(shared, src=0)
                tensor.copy_(shared)

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """Average the gradients of ``params`` over processes in one flat buffer; a gradient one process lacks
        counts as zeros there (so every process steps the same parameters)."""
        if not self.group.distributed:
            return
        device = self._comm_device()
        present = torch.tensor([float(p.grad is not None) for p in self.params], device=device)
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        params = [p for p, has in zip(self.params, present.tolist(), strict=True) if has]
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(device, torch.float32) for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.group.world
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def report(self, metric: float) -> bool:
        """Record a validation metric: keep ``best.safetensors`` when it improves; True when early stopping says so."""
        better = self.best is None or (metric > self.best if self.options.mode == "max" else metric < self.best)
        if better:
            self.best, self.stale = float(metric), 0
            if self.folder is not None and self.group.is_main:
                save_state_dict_atomic(self.model.state_dict(), self.folder / "best.safetensors")
                best = {"step": self.step, "metric": metric}
                atomic_write_bytes(self.folder / "best.json", json.dumps(best).encode())
        else:
            self.stale += 1
        if self.folder is not None:
            self.checkpoint()
        return self.options.patience is not None and self.stale >= self.options.patience

    def finish(self) -> None:
        """Write the final checkpoint (a resumed finished loop then restores instead of retraining)."""
        if self.folder is not None:
            self.checkpoint()

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoint(self) -> Path | None:
        """Write every registered state atomically; ``last.json`` last, then older files go (rank 0 only)."""
        if self.folder is None or not self.group.is_main:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        tag = f"step{self.step:08d}"
        weights = dict(self.model.state_dict())
        if self.ema is not None:
            weights.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        for name, module in self.modules.items():
            weights.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
        save_state_dict_atomic(weights, self.folder / f"{tag}.safetensors", metadata={"step": str(self.step)})

        tensors, record = {}, {"step": self.step, "tag": tag, "state": self.state, "best": self.best}
        record.update(stale=self.stale, optimizers={}, schedulers={}, generators={})
        for name, opt in self.optimizers.items():
            optim = opt.state_dict()
            scalars = {}
            for index, slots in optim["state"].items():
                for key, value in slots.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"opt.{name}.{index}.{key}"] = value
                    else:
                        scalars[f"{index}.{key}"] = value
            record["optimizers"][name] = {"param_groups": optim["param_groups"], "scalars": scalars}
        for name, scheduler in self.schedulers.items():
            record["schedulers"][name] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        for name, gen in self.generators.items():
            if isinstance(gen, torch.Generator):
                tensors[f"gen.{name}"] = gen.get_state()
            else:
                record["generators"][name] = gen.bit_generator.state
        if self.scaler is not None:
            record["scaler"] = {k: v for k, v in self.scaler.state_dict().items() if not isinstance(v, torch.Tensor)}
        rng_tensors, record["rng"] = rng_state()
        save_state_dict_atomic({**tensors, **rng_tensors}, self.folder / f"{tag}.optim.safetensors")
        atomic_write_bytes(self.folder / "last.json", json.dumps(record).encode())
        for old in self.folder.glob("step*.safetensors"):
            if not old.name.startswith(tag + "."):
                old.unlink(missing_ok=True)
        self.last_checkpoint = self.folder / f"{tag}.safetensors"
        return self.last_checkpoint

    def restore(self) -> None:
        """Load the state of ``folder/last.json`` into everything registered (one clear error when there is none)."""
        from safetensors.torch import load_file

        if self.folder is None or not (self.folder / "last.json").is_file():
            raise PotpourriError(f"no checkpoint to resume in '{self.folder}'; run without --resume first")
        record = json.loads((self.folder / "last.json").read_text())
        if "optimizers" not in record:
            raise PotpourriError(
                f"'{self.folder}' holds a checkpoint of an older potpourri that cannot be resumed; start a new --out"
            )
        weights = load_file(str(self.folder / f"{record['tag']}.safetensors"), device=str(self.device))
        self.model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("ema.", "module."))})
        if self.ema is not None:
            self.ema.shadow = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
        for name, module in self.modules.items():
            prefix = f"module.{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        extra = load_file(str(self.folder / f"{record['tag']}.optim.safetensors"))
        for name, opt in self.optimizers.items():
            saved = record["optimizers"][name]
            slots: dict[int, dict[str, Any]] = {}
            prefix = f"opt.{name}."
            for key, value in extra.items():
                if key.startswith(prefix):
                    index, slot = key[len(prefix) :].split(".", 1)
                    slots.setdefault(int(index), {})[slot] = value
            for key, value in saved["scalars"].items():
                index, slot = key.split(".", 1)
                slots.setdefault(int(index), {})[slot] = value
            opt.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict({**scheduler.state_dict(), **record["schedulers"][name]})
        for name, gen in self.generators.items():
            if isinstance(gen, torch.Generator):
                gen.set_state(extra[f"gen.{name}"])
            else:
                gen.bit_generator.state = record["generators"][name]
        if self.scaler is not None and "scaler" in record:
            self.scaler.load_state_dict({**self.scaler.state_dict(), **record["scaler"]})
        set_rng_state(extra, record["rng"])
        self.step, self.state, self.best, self.stale = record["step"], record["state"], record["best"], record["stale"]
        self.last_checkpoint = self.folder / f"{record['tag']}.safetensors"
